//! The real `postern-edge` and `postern` binaries as processes: killing an
//! agent mid-request, 1 GiB bodies without buffering, draining on SIGTERM,
//! and the CLI.

use std::time::{Duration, Instant};

use postern_tests::{
    ACL_TOKEN, HttpUpstream, HttpsClient, Spawned, TempDir, TestEdge, binary, curl, read_rss_kib,
    stream_each_way,
};
use tokio::process::Command;

fn agent(edge: &TestEdge, args: &[&str]) -> Spawned {
    let mut command = Command::new(binary("postern"));
    command.args(args).args(edge.agent_args(&edge.token));
    Spawned::spawn(&mut command)
}

#[tokio::test]
async fn agent_killed_mid_request_gives_502_at_once_and_a_new_agent_serves() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let mut first = agent(&edge, &["http", &port, "--domain", "kill.example.test"]);
    first.wait_for_line("Forwarding", 20).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            (
                client.get("kill.example.test", "/slow/60000").await,
                started.elapsed(),
            )
        })
    };
    postern_tests::eventually(10, "the slow request reached the upstream", || async {
        upstream.requests().iter().any(|r| r.path == "/slow/60000")
    })
    .await;
    let killed_at = Instant::now();
    first.kill().await;
    let (response, _) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the client is answered long before the upstream's 60 s")
        .unwrap();
    let response = response.expect("an HTTP answer, not a dropped connection");
    assert_eq!(response.status, 502);
    assert_eq!(response.headers["ngrok-error-code"], "ERR_POSTERN_3210");
    println!("502 after the kill in {:?}", killed_at.elapsed());

    let mut second = agent(&edge, &["http", &port, "--domain", "kill.example.test"]);
    second.wait_for_line("Forwarding", 20).await;
    let r = client.get("kill.example.test", "/after").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from upstream");
}

#[tokio::test]
async fn one_gib_each_way_streams_through_without_the_edge_holding_it() {
    const GIB: u64 = 1 << 30;
    let mut edge = TestEdge::start_process().await;
    let upstream = HttpUpstream::start().await;
    let mut agent = agent(
        &edge,
        &[
            "http",
            &upstream.port().to_string(),
            "--domain",
            "big.example.test",
        ],
    );
    agent.wait_for_line("Forwarding", 20).await;
    let url = edge.https_url("big.example.test", "");
    let resolve = edge.resolve("big.example.test");
    stream_each_way(&url, &edge.ca_pem(), &resolve, GIB).await;

    let (rss, peak) = read_rss_kib(edge.process().pid());
    println!("edge RSS after 2 GiB: {rss} KiB, peak {peak} KiB");
    assert!(
        peak < 200 * 1024,
        "the edge peaked at {peak} KiB: it must stream, not buffer 1 GiB"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let mut edge = TestEdge::start_process().await;
    let upstream = HttpUpstream::start().await;
    let mut agent = agent(
        &edge,
        &[
            "http",
            &upstream.port().to_string(),
            "--domain",
            "drain.example.test",
        ],
    );
    agent.wait_for_line("Forwarding", 20).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.get("drain.example.test", "/slow/1500").await })
    };
    postern_tests::eventually(10, "the request reached the upstream", || async {
        upstream.requests().iter().any(|r| r.path == "/slow/1500")
    })
    .await;
    let status = edge.process().terminate().await;
    assert!(
        status.success(),
        "the edge exits cleanly after draining: {status:?}"
    );
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "slow done");
    assert!(
        tokio::net::TcpStream::connect(edge.addrs.https)
            .await
            .is_err(),
        "nothing listens after the drain"
    );
}

#[tokio::test]
async fn start_merges_config_files_and_refusals_print_the_code() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("agent-config");
    let a = dir.path().join("a.yml");
    let b = dir.path().join("b.yml");
    std::fs::write(
        &a,
        "version: \"2\"\nauthtoken: wrong-token-overridden\nconsole_ui: false\ntunnels:\n  web:\n    proto: http\n    addr: 1\n    domain: merged.example.test\n    inspect: false\n  other:\n    proto: tcp\n    addr: 2\n",
    )
    .unwrap();
    std::fs::write(
        &b,
        format!("tunnels:\n  web:\n    addr: {}\n", upstream.port()),
    )
    .unwrap();
    let mut start = Spawned::spawn(
        Command::new(binary("postern"))
            .args(["start", "web", "--config"])
            .arg(&a)
            .arg("--config")
            .arg(&b)
            .args(edge.agent_args(&edge.token)),
    );
    let line = start.wait_for_line("Forwarding", 20).await;
    assert!(line.contains("https://merged.example.test:"), "{line}");
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(
        client.get("merged.example.test", "/").await.unwrap().status,
        200
    );
    let forwarding = start
        .drain_lines()
        .iter()
        .filter(|l| l.contains("Forwarding"))
        .count();
    assert_eq!(
        forwarding, 1,
        "only the named tunnel starts: {:?}",
        start.seen
    );

    let refused = Command::new(binary("postern"))
        .args(["http", "1", "--domain", "app.elsewhere.example.test"])
        .args(edge.agent_args(ACL_TOKEN))
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("ERR_POSTERN_316"), "{stderr}");
    assert!(stderr.contains("app.elsewhere.example.test"), "{stderr}");

    let bad_config = Command::new(binary("postern"))
        .args(["http", "1", "--proxy-proto", "7"])
        .args(edge.agent_args(&edge.token))
        .output()
        .await
        .unwrap();
    assert_eq!(bad_config.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad_config.stderr);
    assert!(stderr.contains("proxy_proto"), "{stderr}");
}

#[tokio::test]
async fn a_frozen_agent_is_dropped_after_the_heartbeat_tolerance_and_recovers() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let mut frozen = agent(
        &edge,
        &[
            "http",
            &upstream.port().to_string(),
            "--domain",
            "hb.example.test",
        ],
    );
    frozen.wait_for_line("Forwarding", 20).await;
    let http = edge.addrs.http.unwrap();
    let get = || async move {
        let out = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: hb.example.test",
            &format!("http://{http}/"),
        ])
        .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get().await, "200");
    let pid = frozen.pid().to_string();
    Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .await
        .unwrap();
    let stopped = Instant::now();
    // The test edge's tolerance is 3 s: the endpoint goes offline after it.
    postern_tests::eventually(15, "the edge drops the silent agent", || async {
        get().await == "404"
    })
    .await;
    let detected = stopped.elapsed();
    println!("silent agent dropped after {detected:?}");
    assert!(
        detected >= Duration::from_secs(2),
        "not before the tolerance: {detected:?}"
    );
    Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .await
        .unwrap();
    postern_tests::eventually(20, "the agent reconnects and rebinds", || async {
        get().await == "200"
    })
    .await;
}
