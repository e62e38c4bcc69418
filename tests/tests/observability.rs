//! `/metrics` counts exactly the traffic sent, `/readyz` turns not-ready
//! during a drain.

use std::{collections::HashMap, net::SocketAddr};

use postern_tests::{HttpUpstream, HttpsClient, TcpEcho, TestEdge, curl, openssl_s_client, url_of};
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
