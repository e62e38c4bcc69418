//! HTTPS endpoints end to end: a real edge, a real agent, a real upstream,
//! driven by curl, openssl and a Rust client.

use std::time::Duration;

use bytes::Bytes;
use postern_agent::Agent;
use postern_tests::{
    HttpUpstream, HttpsClient, ScriptedUpstream, TestEdge, curl, openssl_s_client, websocket_echo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn http_tunnel(name: &str, domain: &str, port: u16) -> String {
    format!("  {name}:\n    proto: http\n    addr: {port}\n    domain: {domain}\n")
}

#[tokio::test]
async fn http1_and_http2_through_an_https_endpoint_with_forwarding_headers() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, status) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    assert_eq!(
        status.tunnels,
        vec![("web".to_string(), edge.https_url("app.example.test", ""))]
    );
    let ca = edge.ca_pem();
    for (flag, want_version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = curl(&[
            flag,
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &edge.resolve("app.example.test"),
            "-w",
            "\n%{http_code} %{http_version}",
            &edge.https_url("app.example.test", "/echo?x=1"),
        ])
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.ends_with(&format!("200 {want_version}")), "{text}");
        assert!(
            text.starts_with("GET /echo?x=1 HTTP/1.1"),
            "the upstream always gets HTTP/1.1: {text}"
        );
        let seen = upstream.last("/echo");
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        let host = format!("app.example.test:{}", edge.addrs.https.port());
        assert_eq!(seen.headers["host"], host.as_str(), "Host is preserved");
        assert_eq!(seen.headers["x-forwarded-host"], host.as_str());
    }
}

#[tokio::test]
async fn plain_http_listener_routes_by_host_too() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let http = edge.addrs.http.unwrap();
    let out = curl(&["-H", "Host: app.example.test", &format!("http://{http}/")]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from upstream");
    assert_eq!(upstream.last("/").headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn spoofed_reserved_and_hop_by_hop_headers_never_reach_the_upstream() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    // HTTP/1.1: HTTP/2 has no Connection header for curl to send.
    let out = curl(&[
        "--http1.1",
        "--cacert",
        edge.ca_pem().to_str().unwrap(),
        "--resolve",
        &edge.resolve("app.example.test"),
        "-H",
        "Ngrok-Mtls-Subject-Cn: admin",
        "-H",
        "ngrok_auth_user_email: boss@example.test",
        "-H",
        "Connection: keep-alive, x-secret-hop",
        "-H",
        "x-secret-hop: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        &edge.https_url("app.example.test", "/echo"),
    ])
    .await;
    assert!(out.status.success());
    let seen = upstream.last("/echo");
    for name in seen.headers.keys() {
        assert!(
            !postern_ingress::is_reserved_header(name.as_str()),
            "{name} reached the upstream"
        );
    }
    assert!(
        !seen.headers.contains_key("x-secret-hop"),
        "a header named by Connection is hop-by-hop"
    );
    assert!(!seen.headers.contains_key("keep-alive"));
    assert_eq!(
        seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1",
        "the edge appends the real peer to a client's X-Forwarded-For"
    );
}

#[tokio::test]
async fn unknown_host_gets_404_unknown_sni_is_refused_and_both_are_counted() {
    let edge = TestEdge::start().await;
    let http = edge.addrs.http.unwrap();
    let out = curl(&[
        "-i",
        "-H",
        "Host: nobody.example.test",
        &format!("http://{http}/"),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 404"), "{text}");
    assert!(
        text.contains("ngrok-error-code: err_postern_3200"),
        "{text}"
    );

    let unknown = openssl_s_client(
        edge.addrs.https,
        &["-servername", "nobody.example.test"],
        b"",
    )
    .await;
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("unrecognized name") || err.contains("alert number 112"),
        "{err}"
    );
    assert_eq!(edge.stat("tls_unknown_sni"), 1);

    // Without SNI the edge presents its default certificate (for its base
    // domain) and routes by Host; nothing is bound here, so 404.
    let no_sni = openssl_s_client(
        edge.addrs.https,
        &[
            "-noservername",
            "-quiet",
            "-CAfile",
            edge.ca_pem().to_str().unwrap(),
            "-verify_hostname",
            "example.test",
            "-verify_return_error",
        ],
        b"GET / HTTP/1.1\r\nHost: nobody.example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&no_sni.stdout).to_lowercase();
    assert!(
        text.starts_with("http/1.1 404"),
        "{text} {}",
        String::from_utf8_lossy(&no_sni.stderr)
    );
    assert!(text.contains("err_postern_3200"), "{text}");
    assert_eq!(edge.stat("tls_no_sni"), 1);

    // Not TLS at all on the TLS port: closed, counted, nothing else.
    let mut raw = tokio::net::TcpStream::connect(edge.addrs.https)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf))
        .await
        .expect("the edge closes a non-TLS connection")
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(edge.stat("tls_bad_client_hello"), 1);
}

#[tokio::test]
async fn most_specific_domain_wins_between_wildcard_and_exact() {
    let edge = TestEdge::start().await;
    let wild = HttpUpstream::start().await;
    let exact = HttpUpstream::start().await;
    let tunnels = format!(
        "{}{}",
        http_tunnel("wild", "'*.wild.example.test'", wild.port()),
        http_tunnel("exact", "app.wild.example.test", exact.port())
    );
    let (_agent, status) = edge.agent(&tunnels).await;
    assert_eq!(
        status.tunnels[0].1,
        edge.https_url("*.wild.example.test", "")
    );
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for (host, path, want) in [
        ("app.wild.example.test", "/a", &exact),
        ("other.wild.example.test", "/b", &wild),
        ("deep.er.wild.example.test", "/c", &wild),
    ] {
        let r = client.get(host, path).await.unwrap();
        assert_eq!(r.status, 200, "{host}");
        want.last(path);
    }
    assert!(wild.requests().iter().all(|r| r.path != "/a"));
    assert!(
        exact
            .requests()
            .iter()
            .all(|r| r.path != "/b" && r.path != "/c")
    );
    let r = client.get("example.test", "/").await;
    assert!(
        r.is_err(),
        "the wildcard does not cover its own suffix (no route, TLS refused)"
    );
}

#[tokio::test]
async fn host_that_differs_from_sni_is_misdirected() {
    let edge = TestEdge::start().await;
    let a = HttpUpstream::start().await;
    let b = HttpUpstream::start().await;
    let tunnels = format!(
        "{}{}",
        http_tunnel("a", "a.example.test", a.port()),
        http_tunnel("b", "b.example.test", b.port())
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let out = curl(&[
        "-i",
        "--cacert",
        edge.ca_pem().to_str().unwrap(),
        "--resolve",
        &edge.resolve("a.example.test"),
        "-H",
        "Host: b.example.test",
        &edge.https_url("a.example.test", "/x"),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.starts_with("http/1.1 421") || text.starts_with("http/2 421"),
        "{text}"
    );
    assert!(text.contains("err_postern_9001"), "{text}");
    assert!(b.requests().is_empty(), "b's upstream saw nothing");
}

#[tokio::test]
async fn websocket_echo_through_an_https_endpoint() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("ws", "ws.example.test", upstream.port()))
        .await;
    let mut ws = websocket_echo(edge.addrs.https, &edge.ca_pem(), "ws.example.test").await;
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn two_hundred_concurrent_requests_over_one_agent() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .get("app.example.test", &format!("/slow/{}", i % 50))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let response = task.await.unwrap().expect("request completes");
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.body, "slow done");
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(upstream.requests().len(), 200);
}

#[tokio::test]
async fn a_stalled_download_does_not_stall_other_connections_of_the_same_agent() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "app.example.test", upstream.port()))
        .await;
    // Three visitors start 300 MB downloads and never read them: their
    // streams fill their flow-control windows and stop.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut tls = HttpsClient::new(edge.addrs.https, &edge.ca_pem())
            .connect("app.example.test")
            .await
            .unwrap();
        tls.write_all(b"GET /bytes/300000000 HTTP/1.1\r\nHost: app.example.test\r\n\r\n")
            .await
            .unwrap();
        stalled.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everyone else is still served.
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for i in 0..20 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.get("app.example.test", &format!("/n{i}")),
        )
        .await
        .expect("not stalled behind the slow visitors")
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        client.get("app.example.test", "/bytes/5000000"),
    )
    .await
    .expect("a second big download flows")
    .unwrap();
    assert_eq!(r.body.len(), 5_000_000);
    drop(stalled);
}

#[tokio::test]
async fn upstream_down_gives_502_with_the_agents_code() {
    let edge = TestEdge::start().await;
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (_agent, _) = edge
        .agent(&http_tunnel("web", "down.example.test", port))
        .await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let r = client.get("down.example.test", "/").await.unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["ngrok-error-code"], "ERR_POSTERN_8012");
    // Request bodies are fine with it too.
    let r = client
        .request(
            "down.example.test",
            "POST",
            "/",
            Bytes::from_static(b"payload"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 502);
}

/// An edge, an agent whose HTTP tunnel at `host` to `port` pipes bytes
/// (inspection off), and a client of the edge's HTTPS listener.
async fn uninspected(host: &str, port: u16) -> (TestEdge, Agent, HttpsClient) {
    let edge = TestEdge::start().await;
    let tunnel = format!("{}    inspect: false\n", http_tunnel("web", host, port));
    let (agent, _) = edge.agent(&tunnel).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    (edge, agent, client)
}

/// The scripted upstream's answers, by request target.
fn framings(line: &str) -> (&'static [u8], bool) {
    match line.split(' ').nth(1).unwrap_or_default() {
        "/plain" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", true),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            true,
        ),
        "/interim" => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            true,
        ),
        "/old" => (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", false),
        "/conflict" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            true,
        ),
        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", false),
        // Keep-alive by its headers, closed right after.
        "/close-after" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", true),
    }
}

#[tokio::test]
async fn responses_of_every_framing_come_through_and_their_streams_are_reused() {
    let upstream = ScriptedUpstream::start(framings).await;
    let host = "framing.example.test";
    // A new visitor connection each time: only the edge's pool of data
    // streams can carry a stream from one request to the next.
    let (_edge, _agent, client) = uninspected(host, upstream.addr.port()).await;
    for _ in 0..5 {
        let r = client.get(host, "/plain").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    }
    assert_eq!(upstream.connections(), 1, "one stream served all five");

    let r = client
        .request(host, "HEAD", "/head", Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "1000");
    assert!(r.body.is_empty());
    let r = client.get(host, "/chunked").await.unwrap();
    assert_eq!(r.text(), "hello world");
    let r = client.get(host, "/interim").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    assert_eq!(
        upstream.connections(),
        1,
        "after a HEAD, a chunked body and an interim response the stream is still in use"
    );

    let r = client.get(host, "/old").await.unwrap();
    assert_eq!(r.text(), "until the end");
    let r = client.get(host, "/plain").await.unwrap();
    assert_eq!(r.text(), "ok");
    assert_eq!(
        upstream.connections(),
        2,
        "a body read until the upstream closed ends its stream"
    );

    let r = client.get(host, "/conflict").await.unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["ngrok-error-code"], "ERR_POSTERN_3004");
    let cut = client.get(host, "/short").await;
    assert!(
        cut.is_err(),
        "a body cut short is not passed off as whole: {cut:?}"
    );
    let r = client.get(host, "/plain").await.unwrap();
    assert_eq!(r.text(), "ok");
}

#[tokio::test]
async fn a_stream_whose_upstream_closed_after_answering_is_not_used_again() {
    let upstream = ScriptedUpstream::start(framings).await;
    let host = "stale.example.test";
    let (_edge, _agent, client) = uninspected(host, upstream.addr.port()).await;
    // Each answer to /close-after says keep-alive and then closes, so the
    // edge parks a stream that is ending; the request after it finds the
    // end while taking the stream out, or gets no answer on it and is
    // sent again on a new one. Either way the visitor gets its answer.
    for round in 0..20 {
        for path in ["/close-after", "/plain"] {
            let r = client.get(host, path).await.unwrap();
            assert_eq!(
                (r.status.as_u16(), r.text().as_str()),
                (200, "ok"),
                "round {round}, {path}"
            );
        }
    }
    assert!(
        upstream.connections() >= 20,
        "every closed connection was replaced: {}",
        upstream.connections()
    );
}

#[tokio::test]
async fn request_bodies_of_known_and_unknown_length_reach_the_upstream_whole() {
    let upstream = HttpUpstream::start().await;
    let host = "bodies.example.test";
    let (edge, _agent, client) = uninspected(host, upstream.port()).await;
    // With Content-Length, sent as it comes.
    let big = Bytes::from(vec![b'b'; 5_000_000]);
    let r = client.request(host, "POST", "/count", big).await.unwrap();
    assert_eq!(r.text(), "5000000");
    assert_eq!(upstream.last("/count").headers["content-length"], "5000000");
    // Chunked by the visitor, chunked to the upstream.
    let ca = edge.ca_pem();
    let out = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &edge.resolve(host),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "hello, chunked world",
        &edge.https_url(host, "/count"),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "20");
    let seen = upstream.last("/count");
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert!(!seen.headers.contains_key("content-length"));
    // Several bodies in turn on one kept stream.
    for n in [1usize, 70_000, 3] {
        let r = client
            .request(host, "PUT", "/count", Bytes::from(vec![b'x'; n]))
            .await
            .unwrap();
        assert_eq!(r.text(), n.to_string());
    }
}
