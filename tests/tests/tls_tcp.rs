//! TLS endpoints (each `terminate_at`, re-encryption), TCP endpoints and the
//! PROXY headers upstreams receive.

use std::net::SocketAddr;

use postern_net::proxy_header::Version;
use postern_tests::{
    HttpUpstream, HttpsClient, TcpEcho, TempDir, TestEdge, TlsUpstream, openssl_s_client, url_of,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A certificate for `names` from a fresh CA, written as PEM files;
/// returns (dir, crt path, key path, CA PEM).
fn cert_files(names: &[&str]) -> (TempDir, String, String, String) {
    let dir = TempDir::new("certs");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let crt_path = dir.path().join("crt.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&crt_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        dir,
        crt_path.display().to_string(),
        key_path.display().to_string(),
        ca.pem(),
    )
}

#[tokio::test]
async fn terminate_at_upstream_passes_tls_through_untouched() {
    let edge = TestEdge::start().await;
    let upstream = TlsUpstream::start(&["secure.example.test"]).await;
    let tunnel = format!(
        "  s:\n    proto: tls\n    addr: {}\n    domain: secure.example.test\n",
        upstream.addr.port()
    );
    let (_agent, status) = edge.agent(&tunnel).await;
    assert_eq!(
        url_of(&status, "s"),
        format!("tls://secure.example.test:{}", edge.addrs.https.port())
    );
    // The client trusts only the upstream's CA: the edge and the agent never
    // see the plaintext.
    let client = HttpsClient::with_ca_pem(edge.addrs.https, upstream.ca_pem.as_bytes());
    let r = client.get("secure.example.test", "/").await.unwrap();
    assert_eq!(r.text(), "tls-upstream secure.example.test");
}

#[tokio::test]
async fn terminate_at_edge_with_the_edge_certificate_and_openssl() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let tunnel = format!(
        "  t:\n    proto: tls\n    addr: {}\n    domain: t.example.test\n    terminate_at: edge\n",
        upstream.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let out = openssl_s_client(
        edge.addrs.https,
        &[
            "-servername",
            "t.example.test",
            "-CAfile",
            edge.ca_pem().to_str().unwrap(),
            "-quiet",
        ],
        b"GET /plain HTTP/1.1\r\nHost: t.example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from upstream"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = upstream.last("/plain");
    assert!(
        !seen.headers.contains_key("x-forwarded-for"),
        "a TLS endpoint is a byte pipe: no HTTP rewriting"
    );
}

#[tokio::test]
async fn terminate_at_edge_with_the_agents_own_certificate() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_certs, crt, key, ca) = cert_files(&["own.example.test"]);
    let tunnel = format!(
        "  t:\n    proto: tls\n    addr: {}\n    domain: own.example.test\n    crt: {crt}\n    key: {key}\n",
        upstream.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let client = HttpsClient::with_ca_pem(edge.addrs.https, ca.as_bytes());
    assert_eq!(
        client.get("own.example.test", "/").await.unwrap().text(),
        "hello from upstream"
    );
}

#[tokio::test]
async fn terminate_at_agent_keeps_the_key_at_the_agent() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (_certs, crt, key, ca) = cert_files(&["agent.example.test"]);
    let tunnel = format!(
        "  t:\n    proto: tls\n    addr: {}\n    domain: agent.example.test\n    terminate_at: agent\n    crt: {crt}\n    key: {key}\n",
        upstream.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let client = HttpsClient::with_ca_pem(edge.addrs.https, ca.as_bytes());
    assert_eq!(
        client.get("agent.example.test", "/").await.unwrap().text(),
        "hello from upstream"
    );
    // The edge's own CA does not validate this endpoint: it never had the key.
    let edge_ca = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert!(edge_ca.get("agent.example.test", "/").await.is_err());
}

#[tokio::test]
async fn terminate_at_edge_then_reencrypt_to_a_tls_upstream() {
    let edge = TestEdge::start().await;
    let upstream = TlsUpstream::start(&["localhost"]).await;
    let tunnel = format!(
        "  t:\n    proto: tls\n    addr: tls://localhost:{}\n    domain: re.example.test\n    terminate_at: edge\n    upstream_tls_verify: false\n",
        upstream.addr.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let r = client.get("re.example.test", "/").await.unwrap();
    assert_eq!(
        r.text(),
        "tls-upstream localhost",
        "the agent opened its own TLS session to the upstream"
    );
}

#[tokio::test]
async fn tcp_endpoint_pipes_bytes_both_ways_with_half_close() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let tunnel = format!("  db:\n    proto: tcp\n    addr: {}\n", echo.addr.port());
    let (_agent, status) = edge.agent(&tunnel).await;
    let url = url_of(&status, "db");
    let addr: SocketAddr = url.strip_prefix("tcp://").unwrap().parse().unwrap();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    conn.write_all(&payload).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes arrive unchanged and in order");
}

#[tokio::test]
async fn tcp_ports_requested_in_range_or_refused() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let port = 29000 + (std::process::id() % 400) as u16;
    let tunnel = format!(
        "  db:\n    proto: tcp\n    addr: {}\n    remote_addr: 127.0.0.1:{port}\n",
        echo.addr.port()
    );
    let (_agent, status) = edge.agent(&tunnel).await;
    assert_eq!(url_of(&status, "db"), format!("tcp://127.0.0.1:{port}"));
    let outside = format!(
        "  db:\n    proto: tcp\n    addr: {}\n    remote_addr: 127.0.0.1:1234\n",
        echo.addr.port()
    );
    let err = edge.agent_with(&edge.token, &outside).await.unwrap_err();
    assert!(err.to_string().contains("ERR_POSTERN_307"), "{err}");
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_reach_a_tcp_upstream() {
    let edge = TestEdge::start().await;
    for version in [Version::V1, Version::V2] {
        let echo = TcpEcho::start(true).await;
        let n = if version == Version::V1 { 1 } else { 2 };
        let tunnel = format!(
            "  db:\n    proto: tcp\n    addr: {}\n    proxy_proto: {n}\n",
            echo.addr.port()
        );
        let (agent, status) = edge.agent(&tunnel).await;
        let addr: SocketAddr = url_of(&status, "db")
            .strip_prefix("tcp://")
            .unwrap()
            .parse()
            .unwrap();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let client = conn.local_addr().unwrap();
        conn.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            &buf, b"ping",
            "the header is not echoed: the upstream consumed it"
        );
        let headers = echo.proxy_headers();
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].version, version);
        assert_eq!(
            headers[0].source,
            Some(client),
            "the visitor's own address and port"
        );
        assert_eq!(
            headers[0].destination,
            Some(addr),
            "the public address it connected to"
        );
        agent.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn proxy_protocol_on_an_http_endpoint_is_per_visitor_connection() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start_with_proxy_header().await;
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: pp.example.test\n    proxy_proto: 2\n",
        upstream.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for i in 0..3 {
        let r = client
            .get("pp.example.test", &format!("/v{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    let sources: std::collections::HashSet<_> = seen
        .iter()
        .map(|r| r.proxy.unwrap().source.unwrap())
        .collect();
    assert_eq!(
        sources.len(),
        3,
        "each visitor connection has its own upstream connection and header"
    );
    for r in &seen {
        let h = r.proxy.unwrap();
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.source.unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(h.destination.unwrap(), edge.addrs.https);
    }
}

#[tokio::test]
async fn https_upstreams_are_verified_unless_told_otherwise() {
    let edge = TestEdge::start().await;
    let upstream = TlsUpstream::start(&["localhost"]).await;
    let port = upstream.addr.port();
    let tunnels = format!(
        "  strict:\n    proto: http\n    addr: https://localhost:{port}\n    domain: strict.example.test\n\
         \x20 lax:\n    proto: http\n    addr: https://localhost:{port}\n    domain: lax.example.test\n    upstream_tls_verify: false\n"
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let strict = client.get("strict.example.test", "/").await.unwrap();
    assert_eq!(strict.status, 502, "the upstream's CA is not trusted");
    assert_eq!(strict.headers["ngrok-error-code"], "ERR_POSTERN_8012");
    let lax = client.get("lax.example.test", "/").await.unwrap();
    assert_eq!(lax.status, 200);
    assert_eq!(
        lax.text(),
        "tls-upstream localhost",
        "SNI is the upstream's host"
    );
}

/// An agent without parked streams opens one stream per visitor on request.
/// Many short connections, where the upstream answers and closes first (as
/// nginx does with `Connection: close`), must all go through on the same
/// session: HTTP/2 closes a connection after 1,024 resets it makes itself,
/// so a data stream that is not ended cleanly on both sides would sooner or
/// later take the session down with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_0_agent_serves_thousands_of_short_connections_on_one_session() {
    const CONNECTIONS: usize = 2_400;
    const CONCURRENT: usize = 16;
    let edge = TestEdge::start().await;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = [0u8; 5];
                if conn.read_exact(&mut request).await.is_ok() {
                    let _ = conn.write_all(b"reply").await;
                }
            });
        }
    });
    let tunnel = format!("  db:\n    proto: tcp\n    addr: 127.0.0.1:{port}\n");
    let mut config = edge.agent_config(&edge.token, &tunnel);
    config.stream_pool = 0;
    let agent = postern_agent::Agent::start(config);
    let mut status = agent.status();
    let online = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        status.wait_for(|s| s.online),
    )
    .await
    .expect("online within 20 s")
    .unwrap()
    .clone();
    let addr: SocketAddr = url_of(&online, "db")
        .strip_prefix("tcp://")
        .unwrap()
        .parse()
        .unwrap();

    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let served = served.clone();
            tokio::spawn(async move {
                for i in 0..CONNECTIONS / CONCURRENT {
                    let mut conn = TcpStream::connect(addr).await.unwrap();
                    conn.write_all(b"hello").await.unwrap();
                    if i % 2 == 1 {
                        // A visitor that leaves before the answer: the
                        // answer meets a closed socket, and the stream ends
                        // in an abort rather than a clean eof.
                        drop(conn);
                        continue;
                    }
                    let mut back = Vec::new();
                    conn.read_to_end(&mut back).await.unwrap();
                    if back == b"reply" {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    server.abort();
    let after = agent.status().borrow().clone();
    assert_eq!(
        served.load(std::sync::atomic::Ordering::Relaxed),
        CONNECTIONS / CONCURRENT / 2 * CONCURRENT,
        "every visitor that waited got its answer"
    );
    assert_eq!(after.reconnects, 0, "the session survived: {after:?}");
    assert_eq!(after.session_id, online.session_id);
}
