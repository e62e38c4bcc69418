//! Agent sessions: authtokens, ACLs, duplicate binds, reconnecting after the
//! edge restarts.

use std::time::Duration;

use postern_tests::{ACL_TOKEN, HttpUpstream, HttpsClient, TestEdge, eventually};

fn http_tunnel(domain: &str, port: u16) -> String {
    format!("  web:\n    proto: http\n    addr: {port}\n    domain: {domain}\n")
}

#[tokio::test]
async fn acl_allows_its_names_and_refuses_others_with_a_code() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_ok, _) = edge
        .agent_with(
            ACL_TOKEN,
            &http_tunnel("app.customer1.example.test", upstream.port()),
        )
        .await
        .expect("inside *.customer1.example.test");
    for domain in [
        "app.other.example.test",
        "'*.example.test'",
        "customer1.example.test",
    ] {
        let err = edge
            .agent_with(ACL_TOKEN, &http_tunnel(domain, upstream.port()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ERR_POSTERN_316"), "{domain}: {err}");
        assert!(err.contains("does not permit binding"), "{err}");
    }
    let tcp_ok = "  db:\n    proto: tcp\n    addr: 1\n    remote_addr: 127.0.0.1:29500\n";
    edge.agent_with(ACL_TOKEN, tcp_ok)
        .await
        .expect("port 29500 is allowed");
    let tcp_no = "  db:\n    proto: tcp\n    addr: 1\n    remote_addr: 127.0.0.1:29501\n";
    let err = edge
        .agent_with(ACL_TOKEN, tcp_no)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_308"), "{err}");
}

#[tokio::test]
async fn a_domain_bound_by_another_agent_is_refused() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_first, _) = edge
        .agent(&http_tunnel("dup.example.test", upstream.port()))
        .await;
    let err = edge
        .agent_with(
            &edge.token,
            &http_tunnel("DUP.example.test.", upstream.port()),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_334"), "{err}");
    assert!(err.contains("already bound"), "{err}");
}

#[tokio::test]
async fn a_bad_authtoken_stops_the_agent_with_a_code() {
    let edge = TestEdge::start().await;
    let err = edge
        .agent_with("not-a-real-token", &http_tunnel("x.example.test", 1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_107"), "{err}");
    let err = edge
        .agent_with("has spaces in it", &http_tunnel("x.example.test", 1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_105"), "{err}");
}

#[tokio::test]
async fn unbinding_on_shutdown_frees_the_name_at_once() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (agent, _) = edge
        .agent(&http_tunnel("bye.example.test", upstream.port()))
        .await;
    agent.shutdown().await.unwrap();
    let (_again, _) = edge
        .agent_with(
            &edge.token,
            &http_tunnel("bye.example.test", upstream.port()),
        )
        .await
        .expect("the name is free again");
}

#[tokio::test]
async fn the_agent_reconnects_and_rebinds_after_the_edge_restarts() {
    let mut edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (agent, first) = edge
        .agent(&http_tunnel("back.example.test", upstream.port()))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(
        client.get("back.example.test", "/1").await.unwrap().status,
        200
    );

    edge.restart().await;
    let mut status = agent.status();
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.online && s.session_id != first.session_id),
    )
    .await
    .expect("online again with a new session")
    .unwrap();
    eventually(10, "traffic flows again", || {
        let client = client.clone();
        async move {
            client
                .get("back.example.test", "/2")
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await;
    assert!(agent.status().borrow().reconnects >= 1);
}
