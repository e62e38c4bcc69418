//! `/metrics` counts exactly the traffic sent (edge and agent), `/readyz`
//! turns not-ready during a drain, and one trace runs from the client
//! through the edge and the agent to the upstream.

use std::{collections::HashMap, net::SocketAddr};

use postern_tests::{
    ACL_TOKEN, HttpUpstream, HttpsClient, OtlpReceiver, ReceivedSpan, Spawned, TcpEcho, TempDir,
    TestEdge, binary, curl, eventually, openssl_s_client, url_of,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Scrapes and parses `/metrics` into `name{labels}` → value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let out = curl(&["-f", &format!("http://{addr}/metrics")]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut values = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        values.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    values
}

fn get(values: &HashMap<String, f64>, key: &str) -> f64 {
    values.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_exactly_the_traffic_sent() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let echo = TcpEcho::start(false).await;
    let tunnels = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: m.example.test\n  db:\n    proto: tcp\n    addr: {}\n",
        upstream.port(),
        echo.addr.port()
    );
    let (_agent, status) = edge.agent(&tunnels).await;
    let metrics = edge.addrs.metrics.unwrap();
    let before = scrape(metrics).await;
    let endpoint_id = |url: &str| {
        edge.edge()
            .endpoints()
            .into_iter()
            .find(|e| e.public_url == url)
            .map(|e| e.id.clone())
            .expect("bound")
    };
    let endpoint = endpoint_id(&url_of(&status, "web"));

    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for i in 0..7 {
        assert_eq!(
            client
                .get("m.example.test", &format!("/{i}"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let http = edge.addrs.http.unwrap();
    for _ in 0..3 {
        curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-H",
            "Host: nobody.example.test",
            &format!("http://{http}/"),
        ])
        .await;
    }
    let tcp: SocketAddr = url_of(&status, "db")
        .strip_prefix("tcp://")
        .unwrap()
        .parse()
        .unwrap();
    let mut conn = TcpStream::connect(tcp).await.unwrap();
    conn.write_all(b"0123456789").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await.unwrap();
    openssl_s_client(
        edge.addrs.https,
        &["-servername", "unknown.example.test"],
        b"",
    )
    .await;

    let tcp_endpoint = endpoint_id(&url_of(&status, "db"));
    let done = || async {
        let after = scrape(metrics).await;
        let requests =
            format!("postern_http_requests_total{{code=2xx,decision=none,endpoint={endpoint}}}");
        let conns =
            format!("postern_connections_total{{decision=none,endpoint={tcp_endpoint},proto=tcp}}");
        (get(&after, &requests) - get(&before, &requests) == 7.0 && get(&after, &conns) == 1.0)
            .then_some(after)
    };
    let mut after = None;
    for _ in 0..100 {
        if let Some(a) = done().await {
            after = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let after = after.expect("the counters reach the traffic sent");
    let delta = |key: &str| get(&after, key) - get(&before, key);
    assert_eq!(
        delta("postern_http_requests_total{code=4xx,decision=none,endpoint=none}"),
        3.0
    );
    assert_eq!(
        delta(&format!(
            "postern_http_request_duration_seconds_count{{endpoint={endpoint}}}"
        )),
        7.0
    );
    assert_eq!(
        delta(&format!(
            "postern_connection_bytes_total{{decision=none,direction=in,endpoint={tcp_endpoint},proto=tcp}}"
        )),
        10.0
    );
    assert_eq!(
        delta(&format!(
            "postern_connection_bytes_total{{decision=none,direction=out,endpoint={tcp_endpoint},proto=tcp}}"
        )),
        10.0
    );
    assert_eq!(
        delta("postern_tls_handshake_failures_total{reason=unknown_sni}"),
        1.0
    );
    assert_eq!(get(&after, "postern_agent_sessions{region=us}"), 1.0);
    assert_eq!(
        delta("postern_agent_sessions_opened_total{region=us}"),
        0.0,
        "the agent connected before the first scrape"
    );
    assert_eq!(
        get(&after, "postern_agent_sessions_opened_total{region=us}"),
        1.0
    );

    // A bad token and a bind the token's ACL forbids: counted by code.
    let refused = |m: &HashMap<String, f64>, prefix: &str| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(edge.agent_with("not-a-token", &tunnels).await.is_err());
    let forbidden = "  x:\n    proto: http\n    addr: 9\n    domain: elsewhere.example.test\n";
    assert!(edge.agent_with(ACL_TOKEN, forbidden).await.is_err());
    let last = scrape(metrics).await;
    assert_eq!(
        refused(&last, "postern_agent_sessions_refused_total{code=")
            - refused(&after, "postern_agent_sessions_refused_total{code="),
        1.0
    );
    assert_eq!(
        get(&last, "postern_binds_refused_total{code=ERR_POSTERN_316}")
            - get(&after, "postern_binds_refused_total{code=ERR_POSTERN_316}"),
        1.0
    );
    for key in after.keys() {
        assert!(
            !key.contains("127.0.0.1") && !key.contains("path="),
            "unbounded label in {key}"
        );
    }
}

#[tokio::test]
async fn readyz_turns_not_ready_during_a_drain() {
    let mut edge = TestEdge::start_process().await;
    let upstream = HttpUpstream::start().await;
    let metrics = edge.addrs.metrics.unwrap();
    let code = |path: &'static str| async move {
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{metrics}{path}"),
        ])
        .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code("/healthz").await, "200");
    assert_eq!(code("/readyz").await, "200");
    let mut agent = postern_tests::Spawned::spawn(
        tokio::process::Command::new(postern_tests::binary("postern"))
            .args([
                "http",
                &upstream.port().to_string(),
                "--domain",
                "drain.example.test",
            ])
            .args(edge.agent_args(&edge.token)),
    );
    agent.wait_for_line("Forwarding", 20).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let slow = tokio::spawn(async move { client.get("drain.example.test", "/slow/2000").await });
    postern_tests::eventually(10, "the request is in flight", || async {
        upstream.requests().iter().any(|r| r.path == "/slow/2000")
    })
    .await;
    let pid = edge.process().pid().to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    postern_tests::eventually(5, "/readyz says not ready while draining", || async {
        code("/readyz").await == "503"
    })
    .await;
    assert_eq!(code("/healthz").await, "200", "alive while draining");
    assert_eq!(
        slow.await.unwrap().unwrap().status,
        200,
        "the in-flight request finished"
    );
}

async fn tcp_round_trip(addr: SocketAddr, bytes: &[u8]) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, bytes);
}

#[tokio::test]
async fn agent_metrics_count_sessions_reconnects_and_tunnel_traffic() {
    let mut edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let echo = TcpEcho::start(false).await;
    let tunnels = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: am.example.test\n  db:\n    proto: tcp\n    addr: {}\nweb_addr: 127.0.0.1:0\n",
        upstream.port(),
        echo.addr.port()
    );
    let (agent, status) = edge.agent(&tunnels).await;
    let api = agent.web_addr().expect("the agent API listens");
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for i in 0..3 {
        let response = client.get("am.example.test", &format!("/{i}")).await;
        assert_eq!(response.unwrap().status, 200);
    }
    let tcp: SocketAddr = url_of(&status, "db")
        .strip_prefix("tcp://")
        .unwrap()
        .parse()
        .unwrap();
    tcp_round_trip(tcp, b"0123456789").await;

    let mut m = HashMap::new();
    for _ in 0..100 {
        m = scrape(api).await;
        if get(
            &m,
            "postern_agent_tunnel_bytes_total{direction=out,tunnel=db}",
        ) == 10.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(&m, "postern_agent_session_up{region=us}"), 1.0);
    assert_eq!(get(&m, "postern_agent_reconnects_total{}"), 0.0);
    assert_eq!(get(&m, "postern_agent_tunnel_up{tunnel=web}"), 1.0);
    assert_eq!(
        get(&m, "postern_agent_tunnel_http_requests_total{tunnel=web}"),
        3.0
    );
    assert_eq!(
        get(&m, "postern_agent_tunnel_connections_total{tunnel=db}"),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "postern_agent_tunnel_bytes_total{direction=in,tunnel=db}"
        ),
        10.0
    );
    assert_eq!(
        get(
            &m,
            "postern_agent_tunnel_bytes_total{direction=out,tunnel=db}"
        ),
        10.0
    );
    assert_eq!(
        get(&m, "postern_agent_tunnel_open_connections{tunnel=db}"),
        0.0
    );

    // The edge goes away and comes back: reconnects counted, online again.
    edge.restart().await;
    eventually(30, "the agent reconnects and says so", || async {
        let m = scrape(api).await;
        get(&m, "postern_agent_reconnects_total{}") >= 1.0
            && get(&m, "postern_agent_session_up{region=us}") == 1.0
    })
    .await;
    agent.shutdown().await.unwrap();
}

/// The span of `service` named `name` in trace `trace_id`.
fn find<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    name: &str,
    trace_id: &str,
) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && s.trace_id == trace_id)
}

#[tokio::test]
async fn one_trace_runs_from_the_client_through_edge_and_agent_to_the_upstream() {
    let otlp = OtlpReceiver::start().await;
    let edge = TestEdge::start_process_with(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"edge-under-test\"\n",
        otlp.endpoint()
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let echo = TcpEcho::start(false).await;
    let dir = TempDir::new("trace-agent");
    let config = dir.path().join("agent.yml");
    std::fs::write(
        &config,
        edge.agent_yaml(
            &edge.token,
            &format!(
                "  web:\n    proto: http\n    addr: {}\n    domain: trace.example.test\n  db:\n    proto: tcp\n    addr: {}\nweb_addr: 127.0.0.1:0\n",
                upstream.port(),
                echo.addr.port()
            ),
        ),
    )
    .unwrap();
    let mut agent = Spawned::spawn(
        tokio::process::Command::new(binary("postern"))
            .args(["start", "--all", "--config"])
            .arg(&config)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
            .env("OTEL_SERVICE_NAME", "agent-under-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    );
    let line = agent.wait_for_line("tcp://", 20).await;
    let tcp_port: u16 = line
        .split("tcp://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .expect("the TCP tunnel's address");

    // An HTTP request that carries the client's trace context.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("traceparent: 00-{trace_id}-{client_span}-01");
    let status = edge
        .https_status("trace.example.test", "/traced", &["-H", &traceparent])
        .await;
    assert_eq!(status, "200");
    // A TCP connection: the edge's span travels in the stream's open frame.
    tcp_round_trip(SocketAddr::from(([127, 0, 0, 1], tcp_port)), b"ping").await;

    // The edge exports on its default schedule (5 s), the agent sooner.
    let mut spans = Vec::new();
    eventually(30, "the edge's and the agent's spans arrive", || {
        spans = otlp.spans();
        let tcp_done = spans.iter().any(|c| {
            c.service == "edge-under-test"
                && c.name == "connection"
                && spans.iter().any(|s| {
                    s.service == "agent-under-test"
                        && s.name == "stream"
                        && s.trace_id == c.trace_id
                })
        });
        let done = find(&spans, "edge-under-test", "request", trace_id).is_some()
            && find(&spans, "agent-under-test", "request", trace_id).is_some()
            && tcp_done;
        async move { done }
    })
    .await;

    // Client → edge → agent → upstream, each the parent of the next.
    let edge_request = find(&spans, "edge-under-test", "request", trace_id).unwrap();
    assert_eq!(edge_request.parent_span_id, client_span);
    assert_eq!(edge_request.attributes["http.response.status_code"], "200");
    assert_eq!(edge_request.attributes["decision"], "none");
    assert!(edge_request.attributes["endpoint.id"].starts_with("ep_"));
    let agent_request = find(&spans, "agent-under-test", "request", trace_id).unwrap();
    assert_eq!(agent_request.parent_span_id, edge_request.span_id);
    let received = upstream
        .requests()
        .into_iter()
        .find(|r| r.path == "/traced")
        .expect("the upstream got the request");
    assert_eq!(
        received.headers["traceparent"],
        format!("00-{trace_id}-{}-01", agent_request.span_id).as_str()
    );

    // TCP: the agent's stream span is a child of the edge's connection span.
    let connection = spans
        .iter()
        .find(|s| s.service == "edge-under-test" && s.name == "connection")
        .unwrap();
    assert_eq!(connection.attributes["proto"], "tcp");
    assert_eq!(connection.attributes["bytes.in"], "4");
    let stream = find(&spans, "agent-under-test", "stream", &connection.trace_id).unwrap();
    assert_eq!(stream.parent_span_id, connection.span_id);
    assert_eq!(stream.attributes["tunnel"], "db");

    // No secret reaches a span.
    for span in &spans {
        for value in span.attributes.values() {
            assert!(!value.contains(&edge.token), "a token in {span:?}");
        }
    }
}

/// The Kubernetes manifests carry a config the edge accepts, and their
/// probes ask its metrics listener for /healthz and /readyz.
#[test]
fn the_kubernetes_manifests_probe_health_on_the_metrics_listener() {
    use serde::Deserialize;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/postern-edge.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).unwrap())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("a {k}"))
    };
    let toml = kind("ConfigMap")["data"]["edge.toml"].as_str().unwrap();
    let dir = postern_tests::TempDir::new("k8s-config");
    let toml = postern_tests::with_mounted_secrets(toml, dir.path());
    let config = postern_edge::EdgeConfig::from_toml(&toml).expect("the manifest's config loads");
    let metrics = config.listen.metrics.expect("a metrics listener");
    assert!(
        metrics.ip().is_unspecified(),
        "the kubelet reaches the probes on the pod's address"
    );
    let container = &kind("StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let port = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .expect("a metrics port");
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(metrics.port()))
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(
            container[probe]["httpGet"]["port"].as_str(),
            Some("metrics")
        );
    }
    let grace = kind("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace > config.drain_grace.as_secs(),
        "the drain fits the grace period"
    );
}

/// `--log-format json` writes one JSON object per line, with the event's
/// fields, and never the authtoken.
#[tokio::test]
async fn json_logs_are_one_object_per_line_without_secrets() {
    use tokio::io::AsyncBufReadExt;
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let mut agent = tokio::process::Command::new(binary("postern"))
        .args([
            "http",
            &upstream.port().to_string(),
            "--domain",
            "json.example.test",
            "--log-format",
            "json",
        ])
        .args(edge.agent_args(&edge.token))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let online = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let value: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            seen.push(line);
            if value["fields"]["message"] == "session online" {
                return value;
            }
        }
        panic!("stderr closed before the session came online: {seen:?}");
    })
    .await
    .expect("the agent logs that it is online");
    assert_eq!(online["level"], "INFO");
    assert!(
        online["fields"]["session.id"]
            .as_str()
            .is_some_and(|id| id.starts_with("ts_")),
        "{online}"
    );
    assert_eq!(online["fields"]["region"], "us");
    for line in &seen {
        assert!(
            !line.contains(&edge.token),
            "the authtoken in a log line: {line}"
        );
    }
}
