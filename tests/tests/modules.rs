//! ngrok's HTTP modules end to end: an ngrok.yml using every module key at
//! once, the `http` command's module flags on the real binary, and bad
//! module options refused with the key named.

use postern_tests::{HttpUpstream, Spawned, TcpEcho, TestEdge, binary, websocket_to_tcp_echo};
use tokio::process::Command;

const HOST: &str = "modules.example.test";

/// Every module key of ngrok's v2 config on one tunnel but
/// `websocket_tcp_converter`, which turns the endpoint into something else
/// (see its own test below).
fn every_module(port: u16) -> String {
    format!(
        r#"  web:
    proto: http
    addr: {port}
    domain: {HOST}
    inspect: false
    basic_auth: ["alice:correct horse", "bob:battery staple"]
    request_header:
      add: ["x-from-edge: yes", "x-client: ${{conn.client_ip}}"]
      remove: [x-secret]
    response_header:
      add: ["x-served-by: postern"]
      remove: [x-powered-by]
    host_header: rewrite
    compression: true
    circuit_breaker: 0.5
    verify_webhook:
      provider: gitlab
      secret: s3cret-token
    user_agent_filter:
      allow: ["(?i)friendlybot"]
      deny: ["(?i)bot"]
    schemes: [https]
"#
    )
}

#[tokio::test]
async fn an_ngrok_yml_with_every_module_loads_and_each_module_acts() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let (agent, _) = edge.agent(&every_module(upstream.port())).await;
    let good: &[&str] = &[
        "-u",
        "alice:correct horse",
        "-H",
        "x-gitlab-token: s3cret-token",
        "-H",
        "x-secret: hush",
        "-H",
        "accept-encoding: gzip",
        "--compressed",
    ];

    // basic_auth first: no credentials, no entry.
    let (code, head, _) = edge.fetch(HOST, "/echo", &[]).await;
    assert_eq!(code, 401);
    assert!(head.contains("www-authenticate: basic"), "{head}");
    // verify_webhook: credentials but no token.
    let (code, head, _) = edge.fetch(HOST, "/echo", &good[..2]).await;
    assert_eq!(code, 403);
    assert!(head.contains("err_postern_3204"), "{head}");
    // Everything right.
    let (code, head, body) = edge.fetch(HOST, "/bytes/5000", good).await;
    assert_eq!(code, 200, "{head}");
    assert_eq!(body.len(), 5000, "compressed on the way, decoded by curl");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(head.contains("x-served-by: postern"), "{head}");
    let seen = upstream.last("/bytes/5000");
    assert_eq!(seen.headers["x-from-edge"], "yes");
    assert_eq!(seen.headers["x-client"], "127.0.0.1");
    assert!(!seen.headers.contains_key("x-secret"));
    assert_eq!(
        seen.headers["host"],
        format!("localhost:{}", upstream.port()),
        "host_header: rewrite sets the upstream's own (addr: PORT is localhost:PORT)"
    );
    assert!(
        seen.headers["x-forwarded-host"]
            .to_str()
            .unwrap()
            .starts_with(HOST),
        "the name the visitor asked for goes on"
    );
    // user_agent_filter: deny wins unless an allow matches.
    let mut bot = good.to_vec();
    bot.extend(["-A", "EvilBot/1.0"]);
    let (code, head, _) = edge.fetch(HOST, "/echo", &bot).await;
    assert_eq!(code, 403);
    assert!(head.contains("err_postern_3211"), "{head}");
    let mut friend = good.to_vec();
    friend.extend(["-A", "FriendlyBot/2.0"]);
    assert_eq!(edge.fetch(HOST, "/echo", &friend).await.0, 200);
    // schemes: [https] — plain HTTP finds no endpoint.
    let http = edge.addrs.http.unwrap();
    let out = postern_tests::curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--resolve",
        &format!("{HOST}:{}:127.0.0.1", http.port()),
        &format!("http://{HOST}:{}/echo", http.port()),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_http_commands_module_flags_on_the_real_binary() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let mut agent = Spawned::spawn(
        Command::new(binary("postern"))
            .args([
                "http",
                &port,
                "--domain",
                HOST,
                "--basic-auth",
                "carol:long enough",
                "--request-header-add",
                "x-flag: on",
                "--response-header-remove",
                "x-upstream",
                "--host-header",
                "preserve",
                "--compression",
                "--ua-filter-deny",
                "(?i)curl",
                "--inspect=false",
            ])
            .args(edge.agent_args(&edge.token)),
    );
    agent.wait_for_line("Forwarding", 20).await;
    let auth: &[&str] = &["-u", "carol:long enough", "-A", "Mozilla/5.0"];
    let (code, _, body) = edge.fetch(HOST, "/", auth).await;
    assert_eq!((code, body.as_str()), (200, "hello from upstream"));
    assert_eq!(upstream.last("/").headers["x-flag"], "on");
    assert!(
        upstream.last("/").headers["host"]
            .to_str()
            .unwrap()
            .starts_with(HOST),
        "preserve keeps the visitor's Host"
    );
    assert_eq!(
        edge.fetch(HOST, "/", &auth[..2]).await.0,
        403,
        "curl's agent is refused"
    );
    assert_eq!(edge.fetch(HOST, "/", &auth[2..]).await.0, 401);
    agent.terminate().await;
}

#[tokio::test]
async fn bad_module_options_are_refused_naming_the_key() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port();
    let cases = [
        (
            "    basic_auth: [\"dave:short\"]\n",
            "tunnels.web.basic_auth[0]: the password of \"dave\" must be 8 to 128 characters, not 5",
        ),
        ("    basic_auth: 5\n", "basic_auth"),
        (
            "    user_agent_filter: {deny: [\"(unclosed\"]}\n",
            "tunnels.web.user_agent_filter.deny[0]",
        ),
        ("    circuit_breaker: 1.5\n", "tunnels.web.circuit_breaker"),
        (
            "    request_header: {add: [\"no colon here\"]}\n",
            "tunnels.web.request_header.add[0]",
        ),
        ("    schemes: [ftp]\n", "tunnels.web.schemes"),
        (
            "    websocket_tcp_converter: \"yes\"\n",
            "websocket_tcp_converter",
        ),
        (
            "    host_header: rewrite\n    proto_extra: 1\n",
            "proto_extra",
        ),
    ];
    for (extra, want) in cases {
        let yaml = format!(
            "authtoken: {}\nserver_addr: \"{}\"\ntunnels:\n  web:\n    proto: http\n    addr: {port}\n{extra}",
            edge.token, edge.addrs.agent
        );
        let error = postern_agent::parse_raw(serde_yaml_ng::from_str(&yaml).unwrap())
            .and_then(|raw| raw.validate(None))
            .err()
            .unwrap_or_else(|| panic!("accepted: {extra}"));
        let text = format!("{error:#}");
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    // What only the edge knows is refused at bind, naming the option.
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {port}\n    domain: hooks.example.test\n    verify_webhook: {{provider: carrier-pigeon, secret: x}}\n"
    );
    let error = edge
        .agent_with(&edge.token.clone(), &tunnel)
        .await
        .err()
        .unwrap();
    let text = format!("{error:#}");
    assert!(text.contains("ERR_POSTERN_225"), "{text}");
    assert!(
        text.contains("verify_webhook: provider: \"carrier-pigeon\" is not a provider"),
        "{text}"
    );
}

/// `websocket_tcp_converter`: a real WebSocket client's messages reach a
/// plain TCP upstream (an echo) as bare bytes and its bytes come back as
/// binary messages; a request that is not a WebSocket handshake is refused.
#[tokio::test]
async fn websocket_tcp_converter_carries_message_payloads_to_a_tcp_upstream() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(false).await;
    let host = "ws-tcp.example.test";
    let tunnel = format!(
        "  ws:\n    proto: http\n    addr: {}\n    domain: {host}\n    websocket_tcp_converter: true\n",
        echo.addr.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    websocket_to_tcp_echo(edge.addrs.https, &edge.ca_pem(), host).await;

    let (code, head, _) = edge.fetch(host, "/", &[]).await;
    assert_eq!(code, 400, "{head}");
    assert!(head.contains("err_postern_9036"), "{head}");
}
