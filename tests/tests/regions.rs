//! Routing across regions with real nodes on loopback (us, eu, ap, each
//! with its gossip socket and its mutual-TLS link between nodes): a visitor
//! at one node reaches an agent connected to another; pooled endpoints in
//! two regions share the traffic and fail over; reserved domains, bot users
//! and agent ingresses written at one node bind agents at the others; a
//! killed node's agents move to the other node of their region.

use std::time::{Duration, Instant};

use postern_tests::{
    API_KEY, EVENTS_TO_FILE, HttpUpstream, HttpsClient, Spawned, TestEdge, binary,
    cluster::{Run, TestCluster},
    eventually,
};
use serde_json::Value;
use tokio::process::Command;

const HOST: &str = "app.customer1.example.test";
const JSON: &str = "Content-Type: application/json";
fn http_tunnel(port: u16, extra: &str) -> String {
    format!("  web:\n    proto: http\n    addr: {port}\n    domain: {HOST}\n{extra}")
}

/// The node's events so far from the `EVENTS_TO_FILE` subscription.
fn events(edge: &TestEdge) -> Vec<Value> {
    edge.file_events("events.jsonl")
}

/// Whether one of `events` is of a request for `path`.
fn has_path(events: &[Value], path: &str) -> bool {
    events
        .iter()
        .any(|e| e["object"]["http"]["request"]["url"]["path"] == path)
}

/// `POST` at `edge`, expecting 201; the object.
async fn create(edge: &TestEdge, path: &str, body: &str) -> Value {
    let (status, created) = edge.api("POST", path, Some((JSON, body)), API_KEY).await;
    assert_eq!(status, 201, "POST {path} {body}: {created}");
    created
}

/// Waits until `GET path` answers 200 at every node of `nodes`.
async fn visible_at(nodes: &[TestEdge], path: &str) {
    for edge in nodes {
        eventually(30, &format!("{path} at {:?}", edge.addrs.admin), || async {
            edge.api("GET", path, None, API_KEY).await.0 == 200
        })
        .await;
    }
}

/// The endpoints `edge` routes for `HOST`, as `(region, node_id)`.
async fn serving(edge: &TestEdge) -> Vec<(String, String)> {
    let (status, list) = edge.api("GET", "/endpoints", None, API_KEY).await;
    assert_eq!(status, 200, "{list}");
    let mut found: Vec<(String, String)> = list["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["public_url"].as_str().is_some_and(|u| u.contains(HOST)))
        .map(|e| {
            (
                e["region"].as_str().unwrap().to_string(),
                e["node_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

async fn until_serving(edge: &TestEdge, want: &[(&str, &str)]) -> Duration {
    let start = Instant::now();
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(r, n)| (r.to_string(), n.to_string()))
        .collect();
    eventually(30, &format!("{HOST} served by {want:?}"), || async {
        serving(edge).await == want
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_ap_serves_a_request_arriving_at_us_and_the_event_names_both_nodes() {
    let cluster = TestCluster::start_with(EVENTS_TO_FILE).await;
    let (us, ap) = (cluster.us(), &cluster.nodes[2]);
    let upstream = HttpUpstream::start().await;
    let (agent, status) = ap.agent(&http_tunnel(upstream.port(), "")).await;
    assert_eq!(status.region, "ap");

    let took = until_serving(us, &[("ap", "edge-ap-1")]).await;
    println!("an endpoint bound at ap was routable at us after {took:?}");
    let client = HttpsClient::new(us.addrs.https, &us.ca_pem());
    let response = client.get(HOST, "/from-us").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "hello from upstream");
    assert_eq!(upstream.last("/from-us").method, "GET");

    // One event, at the node that took the request, naming both nodes.
    eventually(10, "the event at us", || async {
        events(us)
            .iter()
            .any(|e| e["object"]["http"]["request"]["url"]["path"] == "/from-us")
    })
    .await;
    let event = events(us)
        .into_iter()
        .find(|e| e["object"]["http"]["request"]["url"]["path"] == "/from-us")
        .unwrap();
    let postern = &event["object"]["postern"];
    assert_eq!(postern["region"], "us", "{event}");
    assert_eq!(postern["node_id"], "edge-us-1");
    assert_eq!(postern["serving_region"], "ap");
    assert_eq!(postern["serving_node_id"], "edge-ap-1");
    assert_eq!(postern["agent_session_id"], status.session_id.as_str());
    assert!(
        !events(ap)
            .iter()
            .any(|e| e["object"]["http"]["request"]["url"]["path"] == "/from-us"),
        "the serving node only relays: the event is recorded once"
    );

    // The session is listed at every node, with where it is connected.
    let (_, sessions) = cluster.nodes[1]
        .api(
            "GET",
            &format!("/tunnel_sessions/{}", status.session_id),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(sessions["region"], "ap", "{sessions}");
    assert_eq!(sessions["node_id"], "edge-ap-1");

    // Stopped through the API of another node (us asks ap over the link
    // between nodes); the agent exits with the reason, and the session is
    // gone from every node.
    let stop = format!("/tunnel_sessions/{}/stop", status.session_id);
    let (code, _) = us
        .api("POST", "/tunnel_sessions/ts_nope/stop", None, API_KEY)
        .await;
    assert_eq!(code, 404);
    let (code, answer) = us.api("POST", &stop, None, API_KEY).await;
    assert_eq!(code, 204, "{answer}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the agent stops");
    let error = format!("{:#}", stopped.expect_err("with the reason"));
    assert!(error.contains("ERR_POSTERN_9012"), "{error}");
    let session = format!("/tunnel_sessions/{}", status.session_id);
    eventually(30, "the stopped session gone at eu", || async {
        cluster.nodes[1].api("GET", &session, None, API_KEY).await.0 == 404
    })
    .await;
    let (code, _) = us.api("POST", &stop, None, API_KEY).await;
    assert_eq!(code, 404, "stopped already");
}

fn agent_process(edge: &TestEdge, port: u16, extra: &[&str]) -> Spawned {
    let mut command = Command::new(binary("postern"));
    command
        .args(["http", &port.to_string(), "--domain", HOST])
        .args(extra)
        .args(edge.agent_args(&edge.token));
    Spawned::spawn(&mut command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_endpoint_in_two_regions_shares_the_traffic_and_a_killed_agent_moves_it_all() {
    let cluster = TestCluster::start().await;
    let (us, eu, ap) = (cluster.us(), &cluster.nodes[1], &cluster.nodes[2]);
    let (at_eu, at_ap) = (HttpUpstream::start().await, HttpUpstream::start().await);
    let mut eu_agent = agent_process(eu, at_eu.port(), &["--pooling-enabled"]);
    eu_agent.wait_for_line("Forwarding", 20).await;
    until_serving(ap, &[("eu", "edge-eu-1")]).await;

    // Without pooling the name is taken, wherever the other agent is.
    let Err(refused) = ap
        .agent_with(&ap.token, &http_tunnel(at_ap.port(), ""))
        .await
    else {
        panic!("a second, unpooled agent took a pooled name");
    };
    let refused = format!("{refused:#}");
    assert!(refused.contains("ERR_POSTERN_334"), "{refused}");
    assert!(refused.contains("pooling"), "{refused}");

    let pooled = "    pooling_enabled: true\n";
    let (_ap_agent, _) = ap.agent(&http_tunnel(at_ap.port(), pooled)).await;
    until_serving(us, &[("ap", "edge-ap-1"), ("eu", "edge-eu-1")]).await;

    let client = HttpsClient::new(us.addrs.https, &us.ca_pem());
    for i in 0..20 {
        let r = client.get(HOST, &format!("/both/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (n_eu, n_ap) = (at_eu.requests().len(), at_ap.requests().len());
    assert_eq!(n_eu + n_ap, 20);
    assert!(n_eu >= 5 && n_ap >= 5, "both serve: eu {n_eu}, ap {n_ap}");

    // SIGKILL: no unbind. Every request from now on is served by ap, the
    // first ones by failing over while eu's endpoint is still routed.
    eu_agent.kill().await;
    for i in 0..20 {
        let r = client.get(HOST, &format!("/after/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "request {i} after the kill: {}", r.text());
    }
    assert_eq!(
        at_eu.requests().len(),
        n_eu,
        "nothing reached the killed agent"
    );
    assert_eq!(at_ap.requests().len(), n_ap + 20);
    let took = until_serving(us, &[("ap", "edge-ap-1")]).await;
    println!("the killed agent's endpoint left us's pool {took:?} after the last request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_reserved_at_eu_restricts_binds_at_ap_to_its_owner() {
    let cluster = TestCluster::start().await;
    let (us, eu, ap) = (cluster.us(), &cluster.nodes[1], &cluster.nodes[2]);
    let bot = create(eu, "/bot_users", r#"{"name": "customer1 agents"}"#).await;
    let bot_id = bot["id"].as_str().unwrap();
    assert!(bot_id.starts_with("bot_"), "{bot}");
    let reservation =
        format!(r#"{{"domain": "*.customer1.example.test", "owner_id": "{bot_id}"}}"#);
    let reserved = create(eu, "/reserved_domains", &reservation).await;
    let reserved_id = reserved["id"].as_str().unwrap();
    assert_eq!(reserved["domain"], "*.customer1.example.test");
    visible_at(&cluster.nodes, &format!("/reserved_domains/{reserved_id}")).await;

    // Bad input: 400, a code, and the field named.
    for (body, code, field) in [
        (
            r#"{"domain": "a..example.test"}"#,
            "ERR_POSTERN_326",
            "domain",
        ),
        (r#"{}"#, "ERR_POSTERN_9400", "domain"),
        (
            r#"{"domain": "x.customer1.example.test"}"#,
            "ERR_POSTERN_320",
            "domain",
        ),
        (
            r#"{"domain": "a.example.test", "owner_id": "bot_nope"}"#,
            "ERR_POSTERN_9400",
            "owner_id",
        ),
        (
            r#"{"domian": "a.example.test"}"#,
            "ERR_POSTERN_9400",
            "domian",
        ),
    ] {
        let (status, error) = us
            .api("POST", "/reserved_domains", Some((JSON, body)), API_KEY)
            .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error_code"], code, "{body}: {error}");
        assert!(
            error["msg"].as_str().unwrap().contains(field),
            "{body}: {error}"
        );
    }

    let credential = create(
        eu,
        "/credentials",
        &format!(r#"{{"owner_id": "{bot_id}"}}"#),
    )
    .await;
    let token = credential["token"].as_str().unwrap().to_string();
    visible_at(
        &cluster.nodes,
        &format!("/credentials/{}", credential["id"].as_str().unwrap()),
    )
    .await;

    let upstream = HttpUpstream::start().await;
    let Err(refused) = ap
        .agent_with(&ap.token, &http_tunnel(upstream.port(), ""))
        .await
    else {
        panic!("a token of no owner bound a reserved name");
    };
    let refused = format!("{refused:#}");
    assert!(refused.contains("ERR_POSTERN_320"), "{refused}");
    assert!(refused.contains(reserved_id), "{refused}");
    let (owner_agent, _) = ap
        .agent_with(&token, &http_tunnel(upstream.port(), ""))
        .await
        .expect("the owner's credential binds under its reservation at ap");
    owner_agent.shutdown().await.unwrap();

    // Released at us: anyone may bind it again at ap.
    let (status, _) = us
        .api(
            "DELETE",
            &format!("/reserved_domains/{reserved_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(status, 204);
    eventually(30, "the release at ap", || async {
        ap.api(
            "GET",
            &format!("/reserved_domains/{reserved_id}"),
            None,
            API_KEY,
        )
        .await
        .0 == 404
    })
    .await;
    ap.agent_with(&ap.token, &http_tunnel(upstream.port(), ""))
        .await
        .expect("a released name binds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ingress_made_at_us_has_three_region_domains_and_agents_connect_to_each() {
    let cluster = TestCluster::start().await;
    let us = cluster.us();
    let bot = create(us, "/bot_users", r#"{"name": "acme"}"#).await;
    let bot_id = bot["id"].as_str().unwrap();
    let credential = create(
        us,
        "/credentials",
        &format!(r#"{{"owner_id": "{bot_id}"}}"#),
    )
    .await;
    let token = credential["token"].as_str().unwrap();
    let body = format!(r#"{{"domain": "connect.acme.test", "owner_id": "{bot_id}"}}"#);
    let ingress = create(us, "/agent_ingresses", &body).await;
    assert_eq!(
        ingress["region_domains"],
        serde_json::json!([
            "tunnel.ap.connect.acme.test",
            "tunnel.eu.connect.acme.test",
            "tunnel.us.connect.acme.test"
        ]),
        "{ingress}"
    );
    let (status, error) = us
        .api(
            "POST",
            "/agent_ingresses",
            Some((JSON, r#"{"domain": "connect.acme.test"}"#)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["msg"].as_str().unwrap().starts_with("domain: "),
        "{error}"
    );

    let ca = us.dir.path().join("agent-ingress-ca.pem");
    std::fs::write(&ca, ingress["certificate_authority_pem"].as_str().unwrap()).unwrap();
    visible_at(
        &cluster.nodes,
        &format!("/agent_ingresses/{}", ingress["id"].as_str().unwrap()),
    )
    .await;
    let credential_path = format!("/credentials/{}", credential["id"].as_str().unwrap());
    visible_at(&cluster.nodes, &credential_path).await;
    let upstream = HttpUpstream::start().await;
    for (i, edge) in cluster.nodes.iter().enumerate() {
        let region = ["us", "eu", "ap"][i];
        let name = format!("tunnel.{region}.connect.acme.test");
        let tunnel = format!(
            "  web{i}:\n    proto: http\n    addr: {}\n    domain: {region}.acme.example.test\n",
            upstream.port()
        );
        let (agent, status) = edge
            .agent_through(token, &name, &ca, &tunnel)
            .await
            .unwrap_or_else(|e| panic!("an agent through {name}: {e:#}"));
        assert_eq!(status.region, region);
        agent.shutdown().await.unwrap();
    }
    // A token of no owner may not use the owner's ingress.
    let eu = &cluster.nodes[1];
    let Err(refused) = eu
        .agent_through(
            &eu.token,
            "tunnel.eu.connect.acme.test",
            &ca,
            &http_tunnel(upstream.port(), ""),
        )
        .await
    else {
        panic!("another owner's token used the ingress");
    };
    let refused = format!("{refused:#}");
    assert!(refused.contains("ERR_POSTERN_122"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_fast_and_its_agent_moves_to_the_other_node_of_its_region() {
    let specs = [
        ("edge-us-1", "us", Run::InProcess),
        ("edge-ap-1", "ap", Run::Binary),
        ("edge-ap-2", "ap", Run::InProcess),
    ];
    let mut cluster = TestCluster::start_nodes(&specs, "").await;
    let us = &cluster.nodes[0];
    // What lets an agent move between the nodes of a region: a credential
    // and an agent ingress, both valid at every node.
    let credential = create(us, "/credentials", "{}").await;
    let ingress = create(us, "/agent_ingresses", r#"{"domain": "connect.acme.test"}"#).await;
    let ca = us.dir.path().join("agent-ingress-ca.pem");
    std::fs::write(&ca, ingress["certificate_authority_pem"].as_str().unwrap()).unwrap();
    let ingress_path = format!("/agent_ingresses/{}", ingress["id"].as_str().unwrap());
    visible_at(&cluster.nodes, &ingress_path).await;
    let credential_path = format!("/credentials/{}", credential["id"].as_str().unwrap());
    visible_at(&cluster.nodes, &credential_path).await;
    let ap_1 = cluster.nodes[1].addrs.agent.to_string();
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let mut agent = Spawned::spawn(Command::new(binary("postern")).args([
        "http",
        &port,
        "--domain",
        HOST,
        "--authtoken",
        credential["token"].as_str().unwrap(),
        "--server-addr",
        &ap_1,
        "--tls-server-name",
        "tunnel.ap.connect.acme.test",
        "--root-cas",
        ca.to_str().unwrap(),
    ]));
    agent.wait_for_line("Forwarding", 20).await;
    until_serving(us, &[("ap", "edge-ap-1")]).await;
    let client = HttpsClient::new(us.addrs.https, &us.ca_pem());
    assert_eq!(client.get(HOST, "/before").await.unwrap().status, 200);

    let killed_at = Instant::now();
    cluster.nodes[1].process().kill().await;
    let us = &cluster.nodes[0];
    // Until the agent is back, each request is answered at once: 200 once
    // it is, a 5xx with an error code before; never a hang.
    let mut failures = Vec::new();
    let back = loop {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), client.get(HOST, "/during"))
            .await
            .expect("an answer within 5 s, not a hang");
        match answer {
            Ok(r) if r.status == 200 => break killed_at.elapsed(),
            Ok(r) => {
                assert!(
                    r.status == 502 || r.status == 503 || r.status == 404,
                    "{}: {}",
                    r.status,
                    r.text()
                );
                let code = r.headers["ngrok-error-code"].to_str().unwrap().to_string();
                failures.push((code, started.elapsed()));
            }
            // Once no node serves the name, TLS is refused by SNI.
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("UnrecognisedName"), "{e}");
                failures.push((e, started.elapsed()));
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "not back after 60 s: {} failures, the last {:?}",
            failures.len(),
            failures.last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut kinds: Vec<&str> = failures.iter().map(|f| f.0.as_str()).collect();
    kinds.dedup();
    println!(
        "node killed: served again after {back:?}; {} answers in between, in turn: {kinds:?}",
        failures.len()
    );
    let slowest = failures.iter().map(|f| f.1).max().unwrap_or_default();
    assert!(slowest < Duration::from_secs(5), "{failures:?}");
    until_serving(us, &[("ap", "edge-ap-2")]).await;
    assert_eq!(client.get(HOST, "/after").await.unwrap().status, 200);
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_subscription_made_at_eu_runs_at_every_node_until_deleted_at_ap() {
    let cluster = TestCluster::start_with(EVENTS_TO_FILE).await;
    let (us, eu, ap) = (cluster.us(), &cluster.nodes[1], &cluster.nodes[2]);
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = us.agent(&http_tunnel(upstream.port(), "")).await;
    until_serving(eu, &[("us", "edge-us-1")]).await;

    // Bad input: 400 naming the field, and nothing is stored.
    let source = r#"{"type": "http_request_complete.v0"}"#;
    let file = r#"{"file": {"path": "traffic.jsonl"}}"#;
    for (body, field) in [
        (format!(r#"{{"destination": {file}}}"#), "sources"),
        (
            format!(
                r#"{{"sources": [{{"type": "http_request_complete.v0", "filter": "ev.nope == 1"}}], "destination": {file}}}"#
            ),
            "sources[0].filter",
        ),
        (
            format!(
                r#"{{"sources": [{source}], "destination": {{"file": {{"path": "../cas.json"}}}}}}"#
            ),
            "destination.file.path",
        ),
        (
            format!(r#"{{"sources": [{source}], "destination_ids": ["ed_1"]}}"#),
            "destination_ids",
        ),
        (format!(r#"{{"sources": [{source}]}}"#), "destination"),
    ] {
        let (status, answer) = eu
            .api("POST", "/event_subscriptions", Some((JSON, &body)), API_KEY)
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error_code"], "ERR_POSTERN_9400", "{answer}");
        let msg = answer["msg"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg} should name {field}");
    }
    let (_, list) = eu.api("GET", "/event_subscriptions", None, API_KEY).await;
    assert_eq!(list["event_subscriptions"], serde_json::json!([]), "{list}");

    // Made at eu, with a field selection; a Kafka one's password is sealed
    // in gossip and never shown.
    let created = create(
        eu,
        "/event_subscriptions",
        &format!(
            r#"{{"description": "traffic", "sources": [{{"type": "http_request_complete.v0", "fields": ["http.request.url.path", "http.response.status_code"]}}], "destination": {file}}}"#
        ),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("esb_"), "{created}");
    assert_eq!(created["uri"], format!("/event_subscriptions/{id}"));
    let kafka = create(
        eu,
        "/event_subscriptions",
        &format!(
            r#"{{"sources": [{source}], "destination": {{"kafka": {{"brokers": ["127.0.0.1:9"], "security_protocol": "sasl_plaintext", "sasl_mechanism": "PLAIN", "sasl_username": "postern", "sasl_password": "hunter2-secret"}}}}}}"#
        ),
    )
    .await;
    let kafka_id = kafka["id"].as_str().unwrap().to_string();
    visible_at(&cluster.nodes, &format!("/event_subscriptions/{kafka_id}")).await;
    for edge in &cluster.nodes {
        let (_, shown) = edge
            .api(
                "GET",
                &format!("/event_subscriptions/{kafka_id}"),
                None,
                API_KEY,
            )
            .await;
        assert_eq!(shown["destination"]["kafka"]["sasl_password"], "********");
        assert!(!shown.to_string().contains("hunter2"), "{shown}");
    }
    let snapshot = std::fs::read_dir(ap.dir.path())
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .any(|bytes| String::from_utf8_lossy(&bytes).contains("hunter2"));
    assert!(!snapshot, "ap's files hold the password in the clear");
    let (status, _) = us
        .api(
            "DELETE",
            &format!("/event_subscriptions/{kafka_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(status, 204);

    // Each node records its own requests in <data_dir>/event-files/.
    for (edge, path) in [(us, "/at-us"), (eu, "/at-eu")] {
        let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
        eventually(30, &format!("{path} in {id}'s file"), || async {
            let response = client.get(HOST, path).await.unwrap();
            assert_eq!(response.status, 200, "{}", response.text());
            has_path(&edge.file_events("event-files/traffic.jsonl"), path)
        })
        .await;
        let event = edge.file_events("event-files/traffic.jsonl").remove(0);
        assert_eq!(event["event_type"], "http_request_complete.v0", "{event}");
        assert_eq!(event["object"]["http"]["response"]["status_code"], 200);
        assert!(
            event["object"]["conn"].is_null(),
            "fields not selected: {event}"
        );
    }

    // Changed at us, seen at ap; deleted at ap, it stops at us.
    let (status, patched) = us
        .api(
            "PATCH",
            &format!("/event_subscriptions/{id}"),
            Some((JSON, r#"{"description": "traffic, renamed"}"#)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    eventually(30, "the new description at ap", || async {
        let (_, shown) = ap
            .api("GET", &format!("/event_subscriptions/{id}"), None, API_KEY)
            .await;
        shown["description"] == "traffic, renamed"
    })
    .await;
    let (status, _) = ap
        .api(
            "DELETE",
            &format!("/event_subscriptions/{id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(status, 204);
    let client = HttpsClient::new(us.addrs.https, &us.ca_pem());
    let mut n = 0;
    eventually(
        30,
        "us no longer writes to the deleted subscription",
        || {
            n += 1;
            let path = format!("/after-delete-{n}");
            let client = &client;
            async move {
                client.get(HOST, &path).await.unwrap();
                // The edge config's subscription takes every request; the same
                // writer writes both files in one pass.
                eventually(10, &format!("{path} in events.jsonl"), || async {
                    has_path(&events(us), &path)
                })
                .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                !has_path(&us.file_events("event-files/traffic.jsonl"), &path)
            }
        },
    )
    .await;
    assert!(
        has_path(&us.file_events("event-files/traffic.jsonl"), "/at-us"),
        "the file stays"
    );
}
