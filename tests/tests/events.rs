//! Events end to end: a real edge publishing to a real Kafka-protocol
//! broker (tansu), read back by an independent consumer (Python
//! confluent-kafka) and by `postern events tail`; every event checked
//! field by field and against `events/schemas/`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use postern_tests::{
    Broker, Consumed, HttpUpstream, HttpsClient, KafkaTlsFront, TcpEcho, TempDir, TestCa, TestEdge,
    TlsUpstream, assert_schema_valid, binary, consume, consume_with, eventually, http1_get_all,
    kafka_subscription, topic, topic_template, url_of,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HTTP: &str = "http_request_complete.v0";
const TCP: &str = "tcp_connection_closed.v0";

fn topics(template: &str) -> Vec<String> {
    vec![topic(template, HTTP), topic(template, TCP)]
}

async fn create_topics(broker: &Broker, template: &str) {
    for t in topics(template) {
        assert!(broker.create_topic(&t).await, "creating {t}");
    }
}

fn http_tunnel(name: &str, domain: &str, port: u16) -> String {
    format!("  {name}:\n    proto: http\n    addr: {port}\n    domain: {domain}\n")
}

/// Checks what every event must satisfy, and returns it.
fn checked(c: &Consumed, template: &str) -> Value {
    let v = &c.value;
    assert_schema_valid(v);
    let event_type = v["event_type"].as_str().unwrap();
    assert_eq!(c.topic, topic(template, event_type), "one topic per type");
    assert!(v["principal"].is_null());
    let object = &v["object"];
    assert_eq!(object["postern"]["node_id"], "test-edge");
    assert_eq!(object["postern"]["region"], "us");
    assert_eq!(object["conn"]["client_ip"], "127.0.0.1");
    assert_eq!(object["conn"]["server_ip"], "127.0.0.1");
    let key = object["conn"]["server_name"]
        .as_str()
        .or(object["postern"]["endpoint_id"].as_str());
    assert_eq!(
        c.key.as_deref(),
        key,
        "keyed by the endpoint host (TCP: endpoint id)"
    );
    v.clone()
}

/// What the consumer reads once it holds `n` messages, or after 60 s.
async fn consume_at_least(
    brokers: &str,
    topics: &[String],
    extra: &[&str],
    n: usize,
) -> Vec<Consumed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let consumed = consume_with(brokers, topics, extra).await;
        if consumed.len() >= n || Instant::now() > deadline {
            return consumed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The request paths of `consumed`, each event [`checked`].
fn checked_paths(consumed: &[Consumed], template: &str) -> BTreeSet<String> {
    consumed
        .iter()
        .map(|c| {
            let v = checked(c, template);
            v["object"]["http"]["request"]["url"]["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn status(v: &Value) -> u64 {
    v["object"]["http"]["response"]["status_code"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn every_request_and_connection_is_one_event_in_kafka() {
    let broker = Broker::start().await;
    let template = topic_template("traffic");
    create_topics(&broker, &template).await;
    let edge = TestEdge::start_with(&kafka_subscription(
        "traffic",
        &broker.addr(),
        &template,
        "",
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let secure = TlsUpstream::start(&["secure.example.test"]).await;
    let echo = TcpEcho::start(false).await;
    let tunnels = format!(
        "{}{}  sec:\n    proto: tls\n    addr: {}\n    domain: secure.example.test\n  db:\n    proto: tcp\n    addr: {}\n",
        http_tunnel("web", "app.example.test", upstream.port()),
        http_tunnel("down", "down.example.test", Broker::unused_port()),
        secure.addr.port(),
        echo.addr.port(),
    );
    let (_agent, status_) = edge.agent(&tunnels).await;

    // HTTPS, 200.
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let ok = client.get("app.example.test", "/hello?x=1").await.unwrap();
    assert_eq!(ok.status, 200);
    // Plain HTTP to a host nobody serves: 404.
    let http = edge.addrs.http.unwrap();
    let missing = http1_get_all(http, "nobody.example.test", &["/missing".into()], 1).await;
    assert_eq!(missing, vec![Some(http::StatusCode::NOT_FOUND)]);
    // TLS for one endpoint, Host for another: 421.
    let misdirected = edge
        .https_status(
            "app.example.test",
            "/other",
            &["--http1.1", "-H", "Host: down.example.test"],
        )
        .await;
    assert_eq!(misdirected, "421");
    // The agent cannot reach the upstream: 502.
    let bad = client.get("down.example.test", "/x").await.unwrap();
    assert_eq!(bad.status, 502);
    let bad_code = bad.headers["ngrok-error-code"]
        .to_str()
        .unwrap()
        .to_string();
    // A TLS endpoint (passthrough) and a TCP endpoint.
    let tls = HttpsClient::with_ca_pem(edge.addrs.https, secure.ca_pem.as_bytes());
    assert_eq!(
        tls.get("secure.example.test", "/").await.unwrap().status,
        200
    );
    let tcp_addr: SocketAddr = url_of(&status_, "db")
        .strip_prefix("tcp://")
        .unwrap()
        .parse()
        .unwrap();
    let mut conn = TcpStream::connect(tcp_addr).await.unwrap();
    conn.write_all(&[7u8; 1000]).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), 1000);

    eventually(30, "six events delivered", || async {
        edge.stat("events_delivered") == 6
    })
    .await;
    let consumed = consume(&broker.addr(), &topics(&template)).await;
    assert_eq!(consumed.len(), 6, "one event each: {consumed:#?}");
    let events: Vec<Value> = consumed.iter().map(|c| checked(c, &template)).collect();
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|v| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
    let find = |pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .find(|v| pred(v))
            .unwrap_or_else(|| panic!("no such event in {events:#?}"))
    };
    let https_port = edge.addrs.https.port();

    let v = find(&|v| v["event_type"] == HTTP && status(v) == 200);
    let o = &v["object"];
    assert_eq!(o["conn"]["server_name"], "app.example.test");
    assert_eq!(o["conn"]["server_port"], https_port);
    let request = &o["http"]["request"];
    assert_eq!(request["method"], "GET");
    assert_eq!(request["version"], "HTTP/1.1");
    assert_eq!(request["url"]["path"], "/hello");
    assert_eq!(request["url"]["query"], "x=1");
    assert_eq!(request["url"]["scheme"], "https");
    assert_eq!(request["url"]["raw"], "https://app.example.test/hello?x=1");
    assert_eq!(
        o["http"]["response"]["body_length"],
        ok.body.len() as u64,
        "the bytes the visitor got"
    );
    assert_eq!(o["tls"]["version"], "TLSv1.3");
    assert!(
        o["postern"]["endpoint_id"]
            .as_str()
            .unwrap()
            .starts_with("ep_")
    );
    assert!(
        o["postern"]["agent_session_id"]
            .as_str()
            .unwrap()
            .starts_with("ts_")
    );
    assert!(o["postern"].get("error_code").is_none());

    let v = find(&|v| v["event_type"] == HTTP && status(v) == 404);
    let o = &v["object"];
    assert_eq!(o["conn"]["server_name"], "nobody.example.test");
    assert_eq!(o["conn"]["server_port"], http.port());
    assert_eq!(o["http"]["request"]["url"]["scheme"], "http");
    assert_eq!(o["http"]["request"]["url"]["path"], "/missing");
    assert_eq!(
        o["postern"]["error_code"],
        postern_proto::ErrorCode::ENDPOINT_OFFLINE.id()
    );
    assert!(
        o["postern"].get("endpoint_id").is_none(),
        "no endpoint served it"
    );
    assert!(o.get("tls").is_none());

    let v = find(&|v| v["event_type"] == HTTP && status(v) == 421);
    let o = &v["object"];
    assert_eq!(o["conn"]["server_name"], "down.example.test");
    assert_eq!(o["http"]["request"]["url"]["path"], "/other");
    assert_eq!(
        o["postern"]["error_code"],
        postern_proto::ErrorCode::MISDIRECTED_REQUEST.id()
    );

    let v = find(&|v| v["event_type"] == HTTP && status(v) == 502);
    let o = &v["object"];
    assert_eq!(o["conn"]["server_name"], "down.example.test");
    assert_eq!(o["postern"]["error_code"], bad_code.as_str());
    assert!(
        o["postern"]["endpoint_id"]
            .as_str()
            .unwrap()
            .starts_with("ep_")
    );

    let v = find(&|v| v["event_type"] == TCP && v["object"]["postern"]["endpoint_proto"] == "tls");
    let o = &v["object"];
    assert_eq!(o["conn"]["server_name"], "secure.example.test");
    assert_eq!(o["conn"]["server_port"], https_port);
    assert!(o["conn"]["bytes_in"].as_u64().unwrap() > 0);
    assert!(o["conn"]["bytes_out"].as_u64().unwrap() > 0);
    assert!(o["conn"]["start_ts"].as_str().unwrap() <= o["conn"]["end_ts"].as_str().unwrap());
    assert!(o["postern"]["endpoint_id"].is_string());

    let v = find(&|v| v["event_type"] == TCP && v["object"]["postern"]["endpoint_proto"] == "tcp");
    let o = &v["object"];
    assert_eq!(o["conn"]["bytes_in"], 1000);
    assert_eq!(o["conn"]["bytes_out"], 1000);
    assert_eq!(o["conn"]["server_port"], tcp_addr.port());
    assert!(o["conn"].get("server_name").is_none());
    assert!(o["conn"]["start_ts"].as_str().unwrap() <= o["conn"]["end_ts"].as_str().unwrap());
    assert!(o["postern"].get("error_code").is_none());
}

#[tokio::test]
async fn a_broker_outage_loses_nothing_and_duplicates_nothing() {
    const N: usize = 2000;
    const QUEUE: u64 = 500;
    let mut broker = Broker::start().await;
    let template = topic_template("outage");
    create_topics(&broker, &template).await;
    let edge = TestEdge::start_with(&format!(
        "[events.limits]\nmemory_queue_events = {QUEUE}\n{}",
        kafka_subscription("outage", &broker.addr(), &template, "")
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let http = edge.addrs.http.unwrap();
    let warm_up = http1_get_all(http, "app.example.test", &["/warm-up".into()], 1).await;
    assert_eq!(warm_up, vec![Some(http::StatusCode::OK)]);
    eventually(20, "the warm-up event delivered", || async {
        edge.stat("events_delivered") == 1
    })
    .await;

    broker.stop().await;
    let started = Instant::now();
    let paths: Vec<String> = (0..N).map(|i| format!("/outage/{i}")).collect();
    let statuses = http1_get_all(http, "app.example.test", &paths, 8).await;
    let request_time = started.elapsed();
    assert!(
        statuses.iter().all(|s| *s == Some(http::StatusCode::OK)),
        "requests succeed while Kafka is down"
    );
    eventually(30, "every event spooled", || async {
        edge.stat("events_spooled") == N as u64 + 1
    })
    .await;
    assert_eq!(
        edge.stat("events_delivered"),
        1,
        "nothing delivered while down"
    );
    assert_eq!(edge.stat("events_spool_events"), N as u64);
    let spool_bytes = edge.stat("events_spool_bytes");
    let queue_peak = edge.stat("events_queue_peak_events");
    assert!(
        queue_peak <= QUEUE,
        "the memory queue stays under its cap: {queue_peak}"
    );
    assert_eq!(edge.stat("events_dropped"), 0);

    // tansu keeps topics in memory: the restarted broker has none. They are
    // created again; if the edge's producer got there first the broker
    // created them itself (auto-create), and either way the events wait in
    // the spool until the topic takes them.
    broker.restart().await;
    for t in topics(&template) {
        broker.create_topic(&t).await;
    }
    eventually(
        120,
        "every event delivered after the broker returned",
        || async { edge.stat("events_delivered") == N as u64 + 1 },
    )
    .await;
    let recovered = started.elapsed();
    let consumed = consume(&broker.addr(), &topics(&template)).await;
    // The warm-up event was in the broker's memory and went with it.
    assert_eq!(consumed.len(), N, "exactly {N} events arrive");
    let mut ids = BTreeSet::new();
    let mut seen_paths = BTreeSet::new();
    for c in &consumed {
        let v = checked(c, &template);
        assert!(
            ids.insert(v["event_id"].as_str().unwrap().to_string()),
            "an event arrived twice"
        );
        seen_paths.insert(
            v["object"]["http"]["request"]["url"]["path"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        assert_eq!(status(&v), 200);
    }
    assert_eq!(seen_paths, paths.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(edge.stat("events_dropped"), 0);
    assert_eq!(edge.stat("events_spool_events"), 0);
    println!(
        "outage: {N} requests in {request_time:?} with Kafka down, spool {spool_bytes} bytes ({} per event), \
         memory queue peak {queue_peak} events, all delivered {recovered:?} after the outage began",
        spool_bytes / N as u64
    );
}

#[tokio::test]
async fn events_spooled_while_the_broker_is_down_survive_an_edge_restart() {
    let port = Broker::unused_port();
    let brokers = format!("127.0.0.1:{port}");
    let template = topic_template("restart");
    let mut edge = TestEdge::start_process_with(&format!(
        "[events]\nflush_timeout = \"1s\"\n{}",
        kafka_subscription("spooled", &brokers, &template, "")
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let paths: Vec<String> = (0..25).map(|i| format!("/before-restart/{i}")).collect();
    let statuses = http1_get_all(edge.addrs.http.unwrap(), "app.example.test", &paths, 4).await;
    assert!(statuses.iter().all(|s| *s == Some(http::StatusCode::OK)));
    let stopping = Instant::now();
    let exit = edge.process().terminate().await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the flush is bounded"
    );
    let spool = edge.dir.path().join("events-spool/spooled");
    let spooled: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        spooled > 0,
        "the first run's events are in {}",
        spool.display()
    );

    let broker = Broker::start_on(port).await;
    create_topics(&broker, &template).await;
    edge.restart_process().await;
    let consumed = consume_at_least(&brokers, &topics(&template), &[], paths.len()).await;
    assert_eq!(
        consumed.len(),
        paths.len(),
        "the first run's events, once each"
    );
    assert_eq!(
        checked_paths(&consumed, &template),
        paths.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(edge.process().terminate().await.success());
}

#[tokio::test]
async fn past_the_limits_events_are_dropped_and_counted_and_requests_go_on() {
    let edge = TestEdge::start_with(&format!(
        "[events]\nflush_timeout = \"200ms\"\n[events.limits]\nmemory_queue_events = 2\nspool_events = 20\n{}",
        kafka_subscription(
            "tiny",
            &format!("127.0.0.1:{}", Broker::unused_port()),
            &topic_template("tiny"),
            ""
        )
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let paths: Vec<String> = (0..300).map(|i| format!("/many/{i}")).collect();
    let statuses = http1_get_all(edge.addrs.http.unwrap(), "app.example.test", &paths, 8).await;
    assert!(
        statuses.iter().all(|s| *s == Some(http::StatusCode::OK)),
        "every request succeeds"
    );
    // Each event is spooled or dropped; the spool holds at most 20.
    eventually(20, "every event accounted for", || async {
        edge.stat("events_spooled") + edge.stat("events_dropped") == 300
    })
    .await;
    assert_eq!(edge.stat("events_spooled"), 20);
    assert_eq!(edge.stat("events_dropped"), 280);
    assert!(edge.stat("events_queue_peak_events") <= 2);
    assert_eq!(edge.stat("events_delivered"), 0);
}

#[tokio::test]
async fn a_filter_lets_only_its_host_through() {
    let broker = Broker::start().await;
    let only_a = topic_template("only-a");
    let all = topic_template("all");
    create_topics(&broker, &only_a).await;
    create_topics(&broker, &all).await;
    let edge = TestEdge::start_with(&format!(
        "{}{}",
        kafka_subscription(
            "only-a",
            &broker.addr(),
            &only_a,
            r#", filter = 'ev.conn.server_name == "a.example.test"'"#
        ),
        kafka_subscription("all", &broker.addr(), &all, "")
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let tunnels = format!(
        "{}{}",
        http_tunnel("a", "a.example.test", upstream.port()),
        http_tunnel("b", "b.example.test", upstream.port())
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let http = edge.addrs.http.unwrap();
    let paths: Vec<String> = (0..3).map(|i| format!("/{i}")).collect();
    for host in ["a.example.test", "b.example.test"] {
        let statuses = http1_get_all(http, host, &paths, 1).await;
        assert!(statuses.iter().all(|s| *s == Some(http::StatusCode::OK)));
    }
    eventually(20, "9 events delivered", || async {
        edge.stat("events_delivered") == 9
    })
    .await;
    assert_eq!(edge.stat("events_filtered"), 3, "b's 3 left out of only-a");
    let filtered = consume(&broker.addr(), &topics(&only_a)).await;
    assert_eq!(filtered.len(), 3);
    for c in &filtered {
        assert_eq!(
            checked(c, &only_a)["object"]["conn"]["server_name"],
            "a.example.test"
        );
    }
    let everything = consume(&broker.addr(), &topics(&all)).await;
    let hosts: Vec<String> = everything
        .iter()
        .map(|c| {
            checked(c, &all)["object"]["conn"]["server_name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(hosts.len(), 6);
    assert_eq!(hosts.iter().filter(|h| *h == "b.example.test").count(), 3);
}

#[tokio::test]
async fn a_field_selection_keeps_only_the_named_fields() {
    let broker = Broker::start().await;
    let template = topic_template("fields");
    create_topics(&broker, &template).await;
    let edge = TestEdge::start_with(&kafka_subscription(
        "fields",
        &broker.addr(),
        &template,
        r#", fields = ["conn.server_name", "http.response.status_code", "postern.endpoint_id"]"#,
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let statuses = http1_get_all(
        edge.addrs.http.unwrap(),
        "app.example.test",
        &["/f".into()],
        1,
    )
    .await;
    assert_eq!(statuses, vec![Some(http::StatusCode::OK)]);
    eventually(20, "the event delivered", || async {
        edge.stat("events_delivered") == 1
    })
    .await;
    let consumed = consume(&broker.addr(), &topics(&template)).await;
    assert_eq!(consumed.len(), 1);
    let v = &consumed[0].value;
    assert_schema_valid(v);
    let endpoint_id = v["object"]["postern"]["endpoint_id"].as_str().unwrap();
    assert!(endpoint_id.starts_with("ep_"));
    assert_eq!(
        v["object"],
        serde_json::json!({
            "conn": {"server_name": "app.example.test"},
            "http": {"response": {"status_code": 200}},
            "postern": {"endpoint_id": endpoint_id},
        })
    );
    for field in ["event_id", "event_type", "event_timestamp"] {
        assert!(v[field].is_string(), "the envelope is kept: {field}");
    }
    assert_eq!(consumed[0].key.as_deref(), Some("app.example.test"));
}

/// `postern events tail` with a consumer group: a filter, `--max-events`,
/// and a second run in the same group that resumes after the first.
#[tokio::test]
async fn postern_events_tail_prints_events_as_json_lines() {
    let broker = Broker::start().await;
    let template = topic_template("tail");
    create_topics(&broker, &template).await;
    let edge =
        TestEdge::start_with(&kafka_subscription("tail", &broker.addr(), &template, "")).await;
    let upstream = HttpUpstream::start().await;
    let tunnels = format!(
        "{}{}",
        http_tunnel("a", "a.example.test", upstream.port()),
        http_tunnel("b", "b.example.test", upstream.port())
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let http = edge.addrs.http.unwrap();
    let paths: Vec<String> = (0..2).map(|i| format!("/tail/{i}")).collect();
    for host in ["a.example.test", "b.example.test"] {
        http1_get_all(http, host, &paths, 1).await;
    }
    eventually(20, "4 events delivered", || async {
        edge.stat("events_delivered") == 4
    })
    .await;
    let tail = |group: &str, extra: &[&str]| {
        let mut command = tokio::process::Command::new(binary("postern"));
        command.args([
            "events",
            "tail",
            "--brokers",
            &broker.addr(),
            "--topic",
            &topic(&template, HTTP),
            "--from-beginning",
            "--group",
            group,
            "-X",
            "session.timeout.ms=2000",
            "-X",
            "heartbeat.interval.ms=300",
        ]);
        command.args(extra);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(60), command.output())
                .await
                .expect("tail exits after --max-events")
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("one JSON event per line"))
                .collect::<Vec<_>>()
        }
    };
    let first = tail("tail-test", &["--max-events", "4"]).await;
    assert_eq!(first.len(), 4);
    for v in &first {
        assert_schema_valid(v);
    }
    // The group committed its offsets: the same group sees only what is new.
    http1_get_all(http, "b.example.test", &["/tail/new".into()], 1).await;
    eventually(20, "the new event delivered", || async {
        edge.stat("events_delivered") == 5
    })
    .await;
    let second = tail("tail-test", &["--max-events", "1"]).await;
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0]["object"]["http"]["request"]["url"]["path"],
        "/tail/new"
    );
    // A filter, in a new group that starts from the beginning.
    let filtered = tail(
        "tail-filter",
        &[
            "--filter",
            r#"ev.conn.server_name == "a.example.test""#,
            "--max-events",
            "2",
        ],
    )
    .await;
    assert_eq!(filtered.len(), 2);
    for v in &filtered {
        assert_eq!(v["object"]["conn"]["server_name"], "a.example.test");
    }
}

/// `postern-edge --dev` writes every event to `<data_dir>/events.jsonl`.
#[tokio::test]
async fn dev_mode_writes_events_as_json_lines() {
    postern_tests::init();
    let dir = postern_tests::TempDir::new("dev-events");
    let setup = postern_edge::dev_config(dir.path()).unwrap();
    let listeners = postern_edge::Listeners {
        agent: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        https: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: None,
        metrics: None,
        node_link: None,
        ngrok_agent: None,
        ssh: None,
    };
    let edge = postern_edge::Edge::start(setup.config, listeners)
        .await
        .unwrap();
    let http = edge.addresses().http.unwrap();
    let statuses = http1_get_all(http, "nobody.postern.localhost", &["/dev".into()], 1).await;
    assert_eq!(statuses, vec![Some(http::StatusCode::NOT_FOUND)]);
    edge.shutdown().await.unwrap();
    let text = std::fs::read_to_string(dir.path().join(postern_edge::DEV_EVENTS_FILE)).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1);
    assert_schema_valid(&events[0]);
    assert_eq!(events[0]["object"]["http"]["response"]["status_code"], 404);
    assert_eq!(
        events[0]["object"]["conn"]["server_name"],
        "nobody.postern.localhost"
    );
}

/// Kafka over TLS with a client certificate (the front in
/// `KafkaTlsFront` stands for a broker's TLS listener): the edge checks
/// the broker's certificate against `ssl_ca_location`, presents its own,
/// and every event arrives once. Beside it, a subscription trusting
/// another CA and one with no client certificate deliver nothing: their
/// events wait in their spools.
#[tokio::test]
async fn kafka_over_tls_checks_the_broker_and_presents_a_client_certificate() {
    let pki = TempDir::new("kafka-tls");
    let ca = TestCa::root("kafka test CA");
    let ca_file = pki.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let other_ca = pki.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::root("another CA").pem).unwrap();
    let (cert, key) = ca
        .client("postern-edge", &[], &[], (-1, 1))
        .write(pki.path(), "client", &[]);

    let port = Broker::unused_port();
    let front = KafkaTlsFront::start(&ca, format!("127.0.0.1:{port}")).await;
    let broker = Broker::start_advertising(port, &front.addr.to_string()).await;
    let brokers = front.addr.to_string();
    let tls = |ca: &std::path::Path, client: bool| {
        let mut lines = format!(
            "security_protocol = \"ssl\"\nssl_ca_location = \"{}\"\n",
            ca.display()
        );
        if client {
            lines += &format!(
                "ssl_certificate_location = \"{}\"\nssl_key_location = \"{}\"\n",
                cert.display(),
                key.display()
            );
        }
        lines
    };
    let mut config = String::new();
    let mut templates = Vec::new();
    for (id, ca, client) in [
        ("good", ca_file.as_path(), true),
        ("wrong-ca", other_ca.as_path(), true),
        ("no-client-cert", ca_file.as_path(), false),
    ] {
        let template = topic_template(id);
        create_topics(&broker, &template).await;
        config += &kafka_subscription(id, &brokers, &template, "");
        config += &tls(ca, client);
        templates.push(template);
    }
    let edge = TestEdge::start_with(&config).await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let paths: Vec<String> = (0..20).map(|i| format!("/over-tls/{i}")).collect();
    let statuses = http1_get_all(edge.addrs.http.unwrap(), "app.example.test", &paths, 4).await;
    assert!(statuses.iter().all(|s| *s == Some(http::StatusCode::OK)));

    let consumer_tls = [
        "--tls-ca",
        ca_file.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let consumed =
        consume_at_least(&brokers, &topics(&templates[0]), &consumer_tls, paths.len()).await;
    assert_eq!(consumed.len(), paths.len(), "every event once, over TLS");
    assert_eq!(
        checked_paths(&consumed, &templates[0]),
        paths.iter().cloned().collect::<BTreeSet<_>>()
    );

    // The refused ones: nothing in their topics, their events still in
    // their spools (the good one's are delivered and committed).
    for (id, template) in ["wrong-ca", "no-client-cert"]
        .into_iter()
        .zip(&templates[1..])
    {
        let none = consume_with(&brokers, &topics(template), &consumer_tls).await;
        assert!(none.is_empty(), "{id}: {none:?}");
    }
    let n = paths.len() as u64;
    eventually(10, "the good subscription's spool is committed", || async {
        edge.stat("events_spool_events") == 2 * n
    })
    .await;
    assert_eq!(edge.stat("events_delivered"), n);
    assert_eq!(edge.stat("events_dropped"), 0);
}
