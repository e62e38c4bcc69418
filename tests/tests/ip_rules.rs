//! IP restrictions on HTTP, TLS and TCP endpoints (IPv4 and IPv6; allow,
//! deny, both), and which address counts: the TCP peer, unless a trusted
//! load balancer says otherwise.

use std::net::SocketAddr;

use postern_tests::{HttpUpstream, HttpsClient, TcpEcho, TestEdge, TlsUpstream, url_of};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn restriction(allow: &[&str], deny: &[&str]) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "    ip_restriction:\n      allow_cidrs: [{}]\n      deny_cidrs: [{}]\n",
        list(allow),
        list(deny)
    )
}

/// (name, allow, deny, does 127.0.0.1 get in)
const CASES: &[(&str, &[&str], &[&str], bool)] = &[
    ("allow-v4", &["127.0.0.0/8"], &[], true),
    ("allow-other", &["10.0.0.0/8"], &[], false),
    ("deny-v4", &[], &["127.0.0.1/32"], false),
    ("deny-other", &[], &["10.0.0.0/8"], true),
    ("both-deny-wins", &["127.0.0.0/8"], &["127.0.0.1"], false),
    ("both-allowed", &["127.0.0.0/8"], &["127.0.0.2"], true),
    ("v6-only-allow", &["::1/128"], &[], false),
];

#[tokio::test]
async fn http_endpoints_answer_403_to_refused_addresses() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let mut tunnels = String::new();
    for (name, allow, deny, _) in CASES {
        tunnels.push_str(&format!(
            "  {name}:\n    proto: http\n    addr: {}\n    domain: {name}.example.test\n{}",
            upstream.port(),
            restriction(allow, deny)
        ));
    }
    let (_agent, _) = edge.agent(&tunnels).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    for (name, _, _, allowed) in CASES {
        let r = client
            .get(&format!("{name}.example.test"), &format!("/{name}"))
            .await
            .unwrap();
        if *allowed {
            assert_eq!(r.status, 200, "{name}");
        } else {
            assert_eq!(r.status, 403, "{name}");
            assert_eq!(r.headers["ngrok-error-code"], "ERR_POSTERN_3205", "{name}");
        }
        assert_eq!(
            upstream
                .requests()
                .iter()
                .any(|req| req.path == format!("/{name}")),
            *allowed,
            "{name}"
        );
    }
}

#[tokio::test]
async fn tcp_and_tls_endpoints_close_refused_connections_before_the_agent() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let tls_upstream = TlsUpstream::start(&["t.example.test"]).await;
    for (name, allow, deny, allowed) in CASES {
        let tunnels = format!(
            "  tcp:\n    proto: tcp\n    addr: {}\n{r}  tls:\n    proto: tls\n    addr: {}\n    domain: t.example.test\n{r}",
            echo.addr.port(),
            tls_upstream.addr.port(),
            r = restriction(allow, deny)
        );
        let (agent, status) = edge.agent(&tunnels).await;
        let addr: SocketAddr = url_of(&status, "tcp")
            .strip_prefix("tcp://")
            .unwrap()
            .parse()
            .unwrap();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let _ = conn.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let echoed = conn.read_exact(&mut buf).await.is_ok() && &buf == b"ping";
        assert_eq!(echoed, *allowed, "tcp {name}");

        let client = HttpsClient::with_ca_pem(edge.addrs.https, tls_upstream.ca_pem.as_bytes());
        let tls = client.get("t.example.test", "/").await;
        assert_eq!(
            tls.is_ok(),
            *allowed,
            "tls {name}: {:?}",
            tls.map(|r| r.status)
        );
        agent.shutdown().await.unwrap();
    }
    assert!(edge.stat("ip_denied") >= 6);
}

#[tokio::test]
async fn ipv6_clients_are_matched_by_ipv6_rules() {
    let edge = TestEdge::start_v6().await;
    let upstream = HttpUpstream::start().await;
    let tunnels = format!(
        "  in:\n    proto: http\n    addr: {p}\n    domain: in.example.test\n{}\
         \x20 out:\n    proto: http\n    addr: {p}\n    domain: out.example.test\n{}",
        restriction(&["::1/128"], &[]),
        restriction(&["2001:db8::/32"], &["127.0.0.0/8"]),
        p = upstream.port(),
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(
        client.get("in.example.test", "/").await.unwrap().status,
        200
    );
    assert_eq!(
        client.get("out.example.test", "/").await.unwrap().status,
        403
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_load_balancers() {
    let untrusted = TestEdge::start().await;
    let trusted = TestEdge::start_with(
        "[trusted_proxies]\ncidrs = [\"127.0.0.1/32\"]\nforwarded_for = true\n",
    )
    .await;
    let upstream = HttpUpstream::start().await;
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: xff.example.test\n{}",
        upstream.port(),
        restriction(&["198.51.100.0/24"], &[])
    );
    for (edge, spoof_wins) in [(&untrusted, false), (&trusted, true)] {
        let (_agent, _) = edge.agent(&tunnel).await;
        let code = edge
            .https_status(
                "xff.example.test",
                "/",
                &["-H", "X-Forwarded-For: 198.51.100.7"],
            )
            .await;
        assert_eq!(
            code,
            if spoof_wins { "200" } else { "403" },
            "trusted: {spoof_wins}"
        );
    }
}

#[tokio::test]
async fn a_trusted_load_balancers_proxy_header_names_the_client() {
    let edge = TestEdge::start_with(
        "[trusted_proxies]\ncidrs = [\"127.0.0.1/32\"]\nproxy_protocol = true\n",
    )
    .await;
    let echo = TcpEcho::start(false).await;
    let tunnel = format!(
        "  db:\n    proto: tcp\n    addr: {}\n{}",
        echo.addr.port(),
        restriction(&["198.51.100.0/24"], &[])
    );
    let (_agent, status) = edge.agent(&tunnel).await;
    let addr: SocketAddr = url_of(&status, "db")
        .strip_prefix("tcp://")
        .unwrap()
        .parse()
        .unwrap();
    for (source, allowed) in [("198.51.100.7", true), ("203.0.113.9", false)] {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let header = format!("PROXY TCP4 {source} 127.0.0.1 40000 {}\r\n", addr.port());
        conn.write_all(header.as_bytes()).await.unwrap();
        let _ = conn.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let echoed = conn.read_exact(&mut buf).await.is_ok() && &buf == b"ping";
        assert_eq!(echoed, allowed, "{source}");
    }
    // Without a header a trusted peer's connection is refused.
    let mut bare = TcpStream::connect(addr).await.unwrap();
    let _ = bare.write_all(b"ping").await;
    let mut buf = Vec::new();
    let _ = bare.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
    assert!(edge.stat("bad_proxy_headers") >= 1);
}
