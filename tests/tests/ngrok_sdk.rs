//! ngrok's own Rust SDK (the `ngrok` crate) against a Postern edge's ngrok
//! agent ingress: unchanged but for its server address and CA.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use ngrok::{
    Session,
    config::{ForwarderBuilder, TunnelBuilder},
    prelude::EndpointInfo,
    session::ConnectError,
};
use postern_tests::{
    ACL_TOKEN, API_KEY, DOMAIN, HttpUpstream, HttpsClient, TcpEcho, TcpRelay, TestCa, TestEdge,
    TlsUpstream, eventually, grpc_client, grpc_expected, grpc_server, websocket_to_tcp_echo,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `expect_err` for the SDK's results, whose success types are not `Debug`.
trait Refused<E> {
    fn refused(self, what: &str) -> E;
}

impl<T, E> Refused<E> for Result<T, E> {
    fn refused(self, what: &str) -> E {
        match self {
            Ok(_) => panic!("expected a refusal: {what}"),
            Err(e) => e,
        }
    }
}

/// A session builder pointed at `edge`'s ngrok agent ingress.
fn builder(edge: &TestEdge, token: &str) -> ngrok::session::SessionBuilder {
    let addr = edge.addrs.ngrok_agent.expect("ngrok agent listener");
    builder_at(
        addr.port(),
        std::fs::read(edge.ca_pem()).expect("dev CA"),
        token,
    )
}

/// A session builder for `127.0.0.1:<port>`, trusting the CAs of `ca_pem`:
/// the two options that point an SDK at Postern.
fn builder_at(port: u16, ca_pem: Vec<u8>, token: &str) -> ngrok::session::SessionBuilder {
    let mut builder = Session::builder();
    builder
        .authtoken(token)
        .server_addr(format!("127.0.0.1:{port}"))
        .expect("a server address")
        .ca_cert(Bytes::from(ca_pem));
    builder
}

async fn session(edge: &TestEdge) -> Session {
    builder(edge, &edge.token)
        .connect()
        .await
        .expect("the SDK connects")
}

fn url(to: std::net::SocketAddr, scheme: &str) -> url::Url {
    url::Url::parse(&format!("{scheme}://{to}")).unwrap()
}

/// Binds an HTTP endpoint on `host` that forwards to `upstream`.
async fn forward_http(
    session: &Session,
    host: &str,
    upstream: &HttpUpstream,
) -> ngrok::forwarder::Forwarder<ngrok::tunnel::HttpTunnel> {
    session
        .http_endpoint()
        .domain(host)
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the bind succeeds")
}

/// Waits until `edge` answers `https://<host>/` with 200.
async fn until_served(edge: &TestEdge, host: &str, what: &str) {
    eventually(20, what, || async move {
        edge.https_status(host, "/", &[]).await == "200"
    })
    .await;
}

#[tokio::test]
async fn an_http_endpoint_with_a_domain_serves_the_sdk_answer() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let session = session(&edge).await;
    let host = format!("sdk.{DOMAIN}");
    let fwd = forward_http(&session, &host, &upstream).await;
    assert_eq!(fwd.url(), edge.https_url(&host, ""));
    let (status, _, body) = edge.fetch(&host, "/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "hello from upstream"));
    // The SDK's forwarder passed the request on as the edge sent it.
    let (status, _, echo) = edge.fetch(&host, "/echo", &[]).await;
    assert_eq!(status, 200);
    assert!(echo.contains(&format!("host: {host}")), "{echo}");
}

#[tokio::test]
async fn tcp_and_tls_endpoints_carry_bytes() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let session = session(&edge).await;
    let tcp = session
        .tcp_endpoint()
        .listen_and_forward(url(echo.addr, "tcp"))
        .await
        .expect("the TCP bind succeeds");
    let public = tcp.url().strip_prefix("tcp://").unwrap().to_string();
    let mut conn = TcpStream::connect(&public).await.unwrap();
    conn.write_all(b"ping over ngrok").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ping over ngrok");

    // TLS passthrough: the upstream terminates, the edge routes by SNI.
    let name = format!("tls-sdk.{DOMAIN}");
    let upstream = TlsUpstream::start(&[&name]).await;
    let tls = session
        .tls_endpoint()
        .domain(&name)
        .verify_upstream_tls(false)
        .listen_and_forward(url(upstream.addr, "tls"))
        .await
        .expect("the TLS bind succeeds");
    assert_eq!(
        tls.url(),
        format!("tls://{name}:{}", edge.addrs.https.port())
    );
    let client = HttpsClient::with_ca_pem(edge.addrs.https, upstream.ca_pem.as_bytes());
    let answer = client
        .get(&name, "/")
        .await
        .expect("through the TLS endpoint");
    assert_eq!(answer.text(), format!("tls-upstream {name}"));
}

#[tokio::test]
async fn a_wrong_token_gets_the_error_code() {
    let edge = TestEdge::start().await;
    let err = builder(&edge, "not-a-token")
        .connect()
        .await
        .refused("an unknown token is refused");
    let ConnectError::Auth(auth) = &err else {
        panic!("not an auth error: {err}");
    };
    assert_eq!(ngrok::Error::error_code(auth), Some("ERR_NGROK_107"));
    assert!(
        ngrok::Error::msg(auth).contains("ERR_POSTERN_107"),
        "{}",
        ngrok::Error::msg(auth)
    );
}

#[tokio::test]
async fn the_tokens_bind_acl_applies() {
    let edge = TestEdge::start().await;
    let session = builder(&edge, ACL_TOKEN).connect().await.unwrap();
    let err = session
        .http_endpoint()
        .domain(format!("other.{DOMAIN}"))
        .listen()
        .await
        .refused("a name outside the ACL is refused");
    assert_eq!(ngrok::Error::error_code(&err), Some("ERR_NGROK_316"));
    let ok = session
        .http_endpoint()
        .domain(format!("app.customer1.{DOMAIN}"))
        .listen()
        .await
        .expect("a name inside the ACL binds");
    assert!(ok.url().contains("app.customer1"));
}

#[tokio::test]
async fn mutual_tls_cas_in_the_bind_are_enforced() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let ca = TestCa::root("sdk clients");
    let client = ca.client("visitor", &[], &[], (-1, 30));
    let (cert, key) = client.write(edge.dir.path(), "visitor", &[]);
    let session = session(&edge).await;
    let host = format!("mtls-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&host)
        .mutual_tlsca(Bytes::from(ca.pem.clone()))
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the bind with CAs succeeds");
    let without = edge.curl_mtls(&host, None, &[]).await;
    assert!(
        !String::from_utf8_lossy(&without.stdout).contains("200"),
        "served without a certificate"
    );
    assert!(
        !without.status.success()
            || !String::from_utf8_lossy(&without.stdout).contains("GET /echo")
    );
    let with = edge.curl_mtls(&host, Some((&cert, &key)), &[]).await;
    assert!(
        String::from_utf8_lossy(&with.stdout).contains("GET /echo"),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
}

/// HTTP modules and a traffic policy in the SDK's bind are enforced at the
/// edge: basic auth, request and response headers, the policy's action,
/// an IP restriction.
#[tokio::test]
async fn modules_and_a_traffic_policy_in_the_bind_are_enforced() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let session = session(&edge).await;
    let host = format!("modules-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&host)
        .basic_auth("visitor", "a long password")
        .request_header("X-From-Sdk", "yes")
        .response_header("X-Sdk-Answer", "1")
        .traffic_policy(
            "on_http_response:\n  - actions:\n      - type: add-headers\n        config:\n          headers:\n            x-policy: from-the-sdk\n",
        )
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the bind with modules succeeds");
    let (status, _, _) = edge.fetch(&host, "/echo", &[]).await;
    assert_eq!(status, 401, "served without credentials");
    let (status, head, body) = edge
        .fetch(&host, "/echo", &["-u", "visitor:a long password"])
        .await;
    assert_eq!(status, 200, "{head}{body}");
    assert!(body.contains("x-from-sdk: yes"), "{body}");
    assert!(head.contains("x-sdk-answer: 1"), "{head}");
    assert!(head.contains("x-policy: from-the-sdk"), "{head}");

    let denied = format!("denied-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&denied)
        .deny_cidr("127.0.0.0/8")
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the bind with an IP restriction succeeds");
    let (status, head, _) = edge.fetch(&denied, "/", &[]).await;
    assert_eq!(status, 403, "{head}");
}

/// The SDK's other HTTP module options, each acting as the same option in
/// a Postern agent's config does (tests/tests/modules.rs).
#[tokio::test]
async fn the_sdks_compression_webhook_user_agent_and_header_options_act() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let session = session(&edge).await;
    let host = format!("options-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&host)
        .compression()
        .circuit_breaker(0.5)
        .webhook_verification("gitlab", "s3cret-token")
        .allow_user_agent("(?i)friendlybot")
        .deny_user_agent("(?i)bot")
        .remove_request_header("x-secret")
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the bind with every option succeeds");
    let good: &[&str] = &[
        "-H",
        "x-gitlab-token: s3cret-token",
        "-H",
        "x-secret: hush",
        "-H",
        "accept-encoding: gzip",
        "--compressed",
    ];
    // The webhook's token is checked before anything is forwarded.
    let (code, head, _) = edge.fetch(&host, "/echo", &[]).await;
    assert_eq!(code, 403, "{head}");
    assert!(head.contains("err_postern_3204"), "{head}");
    // Compressed on the way (curl decodes it), the secret header removed.
    // (The SDK's `host_header_rewrite` is done by its forwarder, not the
    // edge, so it is not tested here.)
    let (code, head, body) = edge.fetch(&host, "/bytes/5000", good).await;
    assert_eq!((code, body.len()), (200, 5000), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let seen = upstream.last("/bytes/5000");
    assert!(!seen.headers.contains_key("x-secret"));
    // The user-agent filter: deny wins unless an allow matches.
    let mut bot = good.to_vec();
    bot.extend(["-A", "EvilBot/1.0"]);
    let (code, head, _) = edge.fetch(&host, "/echo", &bot).await;
    assert_eq!(code, 403);
    assert!(head.contains("err_postern_3211"), "{head}");
    let mut friend = good.to_vec();
    friend.extend(["-A", "FriendlyBot/2.0"]);
    assert_eq!(edge.fetch(&host, "/echo", &friend).await.0, 200);
}

/// Unimplemented options are refused by name, not ignored.
#[tokio::test]
async fn options_postern_does_not_implement_are_refused() {
    let edge = TestEdge::start().await;
    let session = session(&edge).await;
    let err = session
        .http_endpoint()
        .domain(format!("h3.{DOMAIN}"))
        .app_protocol("http3")
        .listen()
        .await
        .refused("app_protocol http3 does not exist");
    assert!(
        ngrok::Error::msg(&err).contains("ForwardsProto \"http3\""),
        "{}",
        ngrok::Error::msg(&err)
    );
    let err = session
        .labeled_tunnel()
        .label("edge", "edghts_1")
        .listen()
        .await
        .refused("labeled tunnels are refused");
    assert!(ngrok::Error::msg(&err).contains("labeled tunnels"));
}

/// `app_protocol("http2")` is Postern's `upstream_protocol: http2`: the
/// edge speaks HTTP/2 (h2c) on each stream and the SDK's forwarder passes
/// it to a cleartext gRPC server as it is, so a real gRPC client's calls of
/// every kind (streams, trailers, statuses, a deadline, 10 MB) go through.
#[tokio::test]
async fn app_protocol_http2_serves_grpc_calls_of_every_kind() {
    let edge = TestEdge::start().await;
    let (_server, port) = grpc_server(None).await;
    let session = session(&edge).await;
    let host = format!("grpc-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&host)
        .app_protocol("http2")
        .listen_and_forward(url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap())
        .await
        .expect("the bind succeeds");
    assert_eq!(grpc_client(&edge, &host).await, grpc_expected());
}

/// `websocket_tcp_conversion()`: the edge answers the WebSocket handshake
/// and carries each message's payload to the SDK, which forwards it to a
/// TCP service as bare bytes.
#[tokio::test]
async fn websocket_tcp_conversion_carries_messages_to_a_tcp_service() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let session = session(&edge).await;
    let host = format!("ws-sdk.{DOMAIN}");
    let _fwd = session
        .http_endpoint()
        .domain(&host)
        .websocket_tcp_conversion()
        .listen_and_forward(url(echo.addr, "tcp"))
        .await
        .expect("the bind succeeds");
    websocket_to_tcp_echo(edge.addrs.https, &edge.ca_pem(), &host).await;
}

/// The event of a request through an SDK has the fields of one through a
/// Postern agent.
#[tokio::test]
async fn events_carry_the_same_fields_as_for_a_postern_agent() {
    let edge = TestEdge::start_with(
        r#"
[[events.subscriptions]]
id = "sdk-test"
sources = [{ type = "http_request_complete.v0" }]
destination = { file = { path = "events.jsonl" } }
"#,
    )
    .await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&format!(
            "  own:\n    proto: http\n    addr: {}\n    domain: own.{DOMAIN}\n",
            upstream.port()
        ))
        .await;
    let session = session(&edge).await;
    let _fwd = forward_http(&session, &format!("sdk-ev.{DOMAIN}"), &upstream).await;
    for host in ["own", "sdk-ev"] {
        let (status, _, _) = edge.fetch(&format!("{host}.{DOMAIN}"), "/", &[]).await;
        assert_eq!(status, 200);
    }
    let events = || {
        std::fs::read_to_string(edge.dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect::<Vec<_>>()
    };
    let host_of = |e: &Value| e["object"]["conn"]["server_name"].to_string();
    eventually(10, "both events", || {
        let n = events().len();
        async move { n >= 2 }
    })
    .await;
    let all = events();
    let own = all
        .iter()
        .find(|e| host_of(e).contains("own."))
        .expect("the agent's event");
    let sdk = all
        .iter()
        .find(|e| host_of(e).contains("sdk-ev."))
        .expect("the SDK's event");
    assert_eq!(paths(own), paths(sdk), "{own:#}\n{sdk:#}");
    assert_eq!(sdk["object"]["http"]["response"]["status_code"], 200);
}

/// Every key path of a JSON value.
fn paths(value: &Value) -> Vec<String> {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                walk(v, format!("{at}.{k}"), out);
            }
        } else {
            out.push(at);
        }
    }
    let mut out = Vec::new();
    walk(value, String::new(), &mut out);
    out.sort();
    out
}

/// 600 visitors at once on one Rust SDK session: the edge holds the
/// excess back, the session survives.
#[tokio::test]
async fn six_hundred_visitors_do_not_kill_a_rust_sdk_session() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let session = session(&edge).await;
    let tcp = session
        .tcp_endpoint()
        .listen_and_forward(url(echo.addr, "tcp"))
        .await
        .unwrap();
    let public = tcp.url().strip_prefix("tcp://").unwrap().to_string();
    let visitors: Vec<_> = (0..600)
        .map(|i| {
            let public = public.clone();
            tokio::spawn(async move {
                let mut conn = TcpStream::connect(&public).await.ok()?;
                let msg = format!("visitor {i}\n");
                conn.write_all(msg.as_bytes()).await.ok()?;
                let mut back = vec![0u8; msg.len()];
                tokio::time::timeout(Duration::from_secs(15), conn.read_exact(&mut back))
                    .await
                    .ok()?
                    .ok()?;
                (back == msg.as_bytes()).then_some(conn)
            })
        })
        .collect();
    let mut held = Vec::new();
    for v in visitors {
        if let Some(conn) = v.await.unwrap() {
            held.push(conn);
        }
    }
    // Every stream still open at once: the cap, not all 600.
    assert!(
        (300..=400).contains(&held.len()),
        "{} visitors served at once",
        held.len()
    );
    drop(held);
    // The same session serves again, without reconnecting.
    let id = session.id();
    eventually(10, "a visitor after the burst", || {
        let public = public.clone();
        async move {
            let Ok(mut conn) = TcpStream::connect(&public).await else {
                return false;
            };
            let _ = conn.write_all(b"again").await;
            let _ = conn.shutdown().await;
            let mut back = Vec::new();
            let _ = conn.read_to_end(&mut back).await;
            back == b"again"
        }
    })
    .await;
    assert_eq!(session.id(), id);
    let metrics = edge.metrics_text().await;
    assert!(
        metrics.contains("postern_agent_sessions_opened_total{region=\"us\"} 1\n"),
        "the SDK reconnected:\n{metrics}"
    );
}

/// A draining edge ends the SDK's session; the SDK reconnects (here
/// through a relay that now leads to another edge) and binds again.
#[tokio::test]
async fn the_edge_draining_moves_the_sdk_to_reconnect() {
    let mut a = TestEdge::start().await;
    let b = TestEdge::start_with(&format!(
        "[[authtokens]]\ntoken = \"{}\"\ndescription = \"a's token\"\n",
        a.token
    ))
    .await;
    let relay = TcpRelay::start(a.addrs.ngrok_agent.unwrap()).await;
    let upstream = HttpUpstream::start().await;
    // The SDK trusts both edges' CAs, as it would a region's.
    let mut pem = std::fs::read(a.ca_pem()).unwrap();
    pem.extend(std::fs::read(b.ca_pem()).unwrap());
    let session = builder_at(relay.addr.port(), pem, &a.token)
        .connect()
        .await
        .unwrap();
    let host = format!("moving.{DOMAIN}");
    let _fwd = forward_http(&session, &host, &upstream).await;
    assert_eq!(a.fetch(&host, "/", &[]).await.0, 200);
    relay.retarget(b.addrs.ngrok_agent.unwrap());
    a.stop().await;
    until_served(&b, &host, "the endpoint back at the other edge").await;
}

/// The SDK reconnects to an edge that restarted, and binds the same name.
#[tokio::test]
async fn the_sdk_reconnects_after_the_edge_restarts() {
    let mut edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let session = session(&edge).await;
    // No domain: a random name under the edge's random_domain_base.
    let random = session
        .http_endpoint()
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("a random name");
    assert!(
        random.url().contains(&format!(".apps.{DOMAIN}")),
        "{}",
        random.url()
    );
    let host = format!("again.{DOMAIN}");
    let _fwd = forward_http(&session, &host, &upstream).await;
    assert_eq!(edge.fetch(&host, "/", &[]).await.0, 200);
    edge.restart().await;
    until_served(&edge, &host, "the endpoint back after the restart").await;
}

/// An SDK session at one region is routable from another.
#[tokio::test]
async fn an_sdk_session_is_routable_across_regions() {
    let cluster = postern_tests::cluster::TestCluster::start().await;
    let (us, eu) = (&cluster.nodes[0], &cluster.nodes[1]);
    let upstream = HttpUpstream::start().await;
    let session = session(us).await;
    let host = format!("far.{DOMAIN}");
    let _fwd = forward_http(&session, &host, &upstream).await;
    until_served(eu, &host, "the SDK's endpoint served at eu").await;
}

/// Pooled, two SDK sessions serve one name: one forwards to an upstream,
/// the other takes each connection, reads the request head and hangs up
/// without an answer. A GET that got no response is sent to the other
/// member (no visitor sees the hang-up); a POST is never sent twice and
/// gets the 502.
#[tokio::test]
async fn an_idempotent_request_without_a_response_goes_to_another_pool_member_and_a_post_does_not()
{
    use futures_util::StreamExt;
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = format!("pool.{DOMAIN}");
    let (good, bad) = (session(&edge).await, session(&edge).await);
    let _fwd = good
        .http_endpoint()
        .domain(&host)
        .pooling_enabled(true)
        .listen_and_forward(url(upstream.addr, "http"))
        .await
        .expect("the first member binds");
    let mut hanging_up = bad
        .http_endpoint()
        .domain(&host)
        .pooling_enabled(true)
        .listen()
        .await
        .expect("the second member binds");
    let saw = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = saw.clone();
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = hanging_up.next().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let method = line.split(' ').next().unwrap_or_default().to_string();
            record.lock().unwrap().push(method);
        }
    });
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());

    // POSTs first: a GET's retry leaves its new connection (to the other
    // member) parked for reuse, and later requests would take it.
    let mut refused = 0;
    for i in 0..10 {
        let body = Bytes::from_static(b"once only");
        let r = client
            .request(&host, "POST", &format!("/post/{i}"), body)
            .await
            .unwrap();
        match r.status.as_u16() {
            200 => {}
            502 => refused += 1,
            other => panic!("POST {i}: {other} {}", r.text()),
        }
    }
    let bad_posts = saw.lock().unwrap().len();
    assert!(refused >= 1, "the hanging-up member was never picked");
    assert_eq!(bad_posts, refused, "each failed POST was sent once only");
    assert!(saw.lock().unwrap().iter().all(|m| m == "POST"));
    assert_eq!(upstream.requests().len(), 10 - refused);

    for i in 0..10 {
        let r = client.get(&host, &format!("/get/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
    }
    let bad_gets = saw.lock().unwrap().len() - bad_posts;
    assert!(bad_gets >= 1, "the hanging-up member was never sent a GET");
    assert_eq!(
        upstream.requests().len(),
        10 - refused + 10,
        "the other member answered every GET"
    );
}

/// ngrok's remote commands through the admin API (and the `postern api`
/// CLI's shape of them): `restart` and `update` run the SDK's handlers, the
/// update's version reaching it; a command the SDK has no handler for
/// (`stop` here) is refused with the SDK's reason, and the session goes on
/// serving; a Postern agent's session takes a stop but no restart.
#[tokio::test]
async fn restart_and_update_reach_the_sdks_handlers_and_a_missing_handler_is_refused() {
    use ngrok::session::{Restart, Update};
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel::<String>();
    let on_update = tx.clone();
    let session = builder(&edge, &edge.token)
        .handle_restart_command(move |_: Restart| {
            let tx = tx.clone();
            async move { tx.send("restart".into()).map_err(|e| e.to_string()) }
        })
        .handle_update_command(move |update: Update| {
            let tx = on_update.clone();
            async move {
                let said = format!("update {} {}", update.version, update.permit_major_version);
                tx.send(said).map_err(|e| e.to_string())
            }
        })
        .connect()
        .await
        .expect("the SDK connects");
    let host = format!("commands.{DOMAIN}");
    let _fwd = forward_http(&session, &host, &upstream).await;
    let (_, listed) = edge.api("GET", "/tunnel_sessions", None, API_KEY).await;
    let id = listed["tunnel_sessions"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let command = |action: &str, body: Option<&'static str>| {
        let (edge, path) = (&edge, format!("/tunnel_sessions/{id}/{action}"));
        async move {
            let body = body.map(|b| ("Content-Type: application/json", b));
            edge.api("POST", &path, body, API_KEY).await
        }
    };

    assert_eq!(command("restart", None).await.0, 204);
    assert_eq!(ran.recv().await.as_deref(), Some("restart"));
    let update = r#"{"version": "3.19.0", "permit_major_version": true}"#;
    assert_eq!(command("update", Some(update)).await.0, 204);
    assert_eq!(ran.recv().await.as_deref(), Some("update 3.19.0 true"));

    let (status, refused) = command("stop", None).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error_code"], "ERR_POSTERN_9021", "{refused}");
    assert!(
        refused["msg"]
            .as_str()
            .unwrap()
            .contains("no defined callback"),
        "the SDK's reason: {refused}"
    );
    let (status, bad) = command("update", Some(r#"{"versoin": "1"}"#)).await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["msg"].as_str().unwrap().contains("versoin"), "{bad}");
    let (status, _, body) = edge.fetch(&host, "/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from upstream"),
        "still serving"
    );

    // A Postern agent: no restart; a stop ends it.
    let (agent, agent_status) = edge
        .agent(&format!(
            "  web:\n    proto: http\n    addr: {}\n    domain: agent-{host}\n",
            upstream.port()
        ))
        .await;
    let path = |action: &str| format!("/tunnel_sessions/{}/{action}", agent_status.session_id);
    let (status, refused) = edge.api("POST", &path("restart"), None, API_KEY).await;
    assert_eq!(
        (status, &refused["error_code"]),
        (400, &"ERR_POSTERN_9021".into()),
        "{refused}"
    );
    assert_eq!(edge.api("POST", &path("stop"), None, API_KEY).await.0, 204);
    let ended = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the stopped agent exits");
    assert!(format!("{:#}", ended.unwrap_err()).contains("ERR_POSTERN_9012"));
}
