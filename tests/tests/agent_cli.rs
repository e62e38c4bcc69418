//! The `postern` command line as an ngrok user types it: seed 002's TLS
//! command lines with `ngrok` replaced by `postern`, `--url` and
//! `--subdomain`, an ngrok agent config v3 file, the system trust store for
//! the edge, and agents that reach the edge only through a real HTTP CONNECT
//! proxy (tinyproxy), an HTTPS proxy and SOCKS5 proxies (dante, pproxy).

use std::{net::SocketAddr, path::Path, time::Duration};

use postern_net::proxy_header::Version;
use postern_tests::{
    DOMAIN, HttpUpstream, HttpsClient, Spawned, TcpEcho, TempDir, TestCa, TestEdge, TlsUpstream,
    binary, free_port, openssl_s_client, python,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

/// `postern <args>` connecting to `edge` (server address, TLS name, edge CA).
fn postern(edge: &TestEdge, args: &[&str]) -> Command {
    let mut command = Command::new(binary("postern"));
    command.args(args).args(edge.agent_args(&edge.token));
    command
}

/// Starts `command` and waits for its `Forwarding` line: the public URL.
async fn forwarding(command: &mut Command) -> (Spawned, String) {
    let mut agent = Spawned::spawn(command);
    let line = agent.wait_for_line("Forwarding", 30).await;
    let url = line.split_whitespace().nth(1).unwrap().to_string();
    (agent, url)
}

/// The host of a `scheme://host:port` URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    rest.rsplit_once(':').map_or(rest, |(host, _)| host)
}

/// One HTTP/1.1 GET over TLS to the edge with `sni`, trusting `ca`: what
/// openssl printed.
async fn get_over_tls(edge: &TestEdge, sni: &str, ca: &Path) -> String {
    let request = format!("GET /plain HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    let out = openssl_s_client(
        edge.addrs.https,
        &[
            "-servername",
            sni,
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
            "-quiet",
        ],
        request.as_bytes(),
    )
    .await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn seed_002_terminate_at_edge_with_url() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let name = format!("your-name.{DOMAIN}");
    let (_agent, url) = forwarding(&mut postern(
        &edge,
        &["tls", &port, "--terminate-at", "edge", "--url", &name],
    ))
    .await;
    assert_eq!(url, format!("tls://{name}:{}", edge.addrs.https.port()));
    let answer = get_over_tls(&edge, &name, &edge.ca_pem()).await;
    assert!(answer.contains("hello from upstream"), "{answer}");
}

#[tokio::test]
async fn seed_002_terminate_at_upstream_with_url() {
    let edge = TestEdge::start().await;
    let name = format!("app.{DOMAIN}");
    let upstream = TlsUpstream::start(&[&name]).await;
    let port = upstream.addr.port().to_string();
    let (_agent, _) = forwarding(&mut postern(
        &edge,
        &["tls", &port, "--terminate-at", "upstream", "--url", &name],
    ))
    .await;
    let client = HttpsClient::with_ca_pem(edge.addrs.https, upstream.ca_pem.as_bytes());
    assert_eq!(
        client.get(&name, "/").await.unwrap().text(),
        format!("tls-upstream {name}")
    );
}

#[tokio::test]
async fn seed_002_terminate_at_agent_with_url_crt_and_key() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("seed-002-agent");
    let name = format!("app-agent.{DOMAIN}");
    let ca = TestCa::root("seed 002 CA");
    let (crt, key) = ca.server(&[&name]).write(dir.path(), "app", &[]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let port = upstream.port().to_string();
    let (_agent, _) = forwarding(&mut postern(
        &edge,
        &[
            "tls",
            &port,
            "--terminate-at",
            "agent",
            "--url",
            &name,
            "--crt",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    ))
    .await;
    let answer = get_over_tls(&edge, &name, &ca_file).await;
    assert!(answer.contains("hello from upstream"), "{answer}");
    let with_edge_ca = get_over_tls(&edge, &name, &edge.ca_pem()).await;
    assert!(
        !with_edge_ca.contains("hello from upstream"),
        "the edge never had the key: {with_edge_ca}"
    );
}

/// `postern tls tls://localhost:443 --terminate-at=edge`: a random name, and
/// the upstream's certificate checked against `SSL_CERT_FILE`, as ngrok's
/// documentation says.
#[tokio::test]
async fn seed_002_reencrypt_checks_the_upstream_against_ssl_cert_file() {
    let edge = TestEdge::start().await;
    let upstream = TlsUpstream::start(&["localhost"]).await;
    let dir = TempDir::new("seed-002-reencrypt");
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &upstream.ca_pem).unwrap();
    let addr = format!("tls://localhost:{}", upstream.addr.port());
    for (cert_file, served) in [
        (upstream_ca.as_path(), true),
        (Path::new("/etc/ssl/certs/ca-certificates.crt"), false),
    ] {
        let (_agent, url) = forwarding(
            postern(&edge, &["tls", &addr, "--terminate-at=edge"]).env("SSL_CERT_FILE", cert_file),
        )
        .await;
        let name = host_of(&url);
        assert!(name.ends_with(&format!(".apps.{DOMAIN}")), "{url}");
        let answer = get_over_tls(&edge, name, &edge.ca_pem()).await;
        assert_eq!(
            answer.contains("tls-upstream localhost"),
            served,
            "SSL_CERT_FILE={}: {answer}",
            cert_file.display()
        );
    }
}

#[tokio::test]
async fn seed_002_proxy_proto_2_on_a_tls_endpoint() {
    let edge = TestEdge::start().await;
    let echo = TcpEcho::start(true).await;
    let port = echo.addr.port().to_string();
    let (_agent, url) = forwarding(&mut postern(&edge, &["tls", &port, "--proxy-proto=2"])).await;
    // The upstream is an echo, not a TLS server: the handshake fails, but
    // the PROXY header has reached it by then.
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert!(client.connect(host_of(&url)).await.is_err());
    postern_tests::eventually(10, "the upstream read a PROXY header", || async {
        !echo.proxy_headers().is_empty()
    })
    .await;
    let header = &echo.proxy_headers()[0];
    assert_eq!(header.version, Version::V2);
    assert_eq!(
        header.destination.map(|d| d.port()),
        Some(edge.addrs.https.port())
    );
    assert!(header.source.unwrap().ip().is_loopback());
}

#[tokio::test]
async fn url_forms_subdomains_and_ports() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());

    let (_http, url) = forwarding(&mut postern(
        &edge,
        &["http", &port, "--url", &format!("https://full.{DOMAIN}")],
    ))
    .await;
    assert_eq!(
        url,
        format!("https://full.{DOMAIN}:{}", edge.addrs.https.port())
    );
    assert_eq!(
        client
            .get(&format!("full.{DOMAIN}"), "/")
            .await
            .unwrap()
            .status,
        200
    );

    let (_sub, url) =
        forwarding(&mut postern(&edge, &["http", &port, "--subdomain", "mine"])).await;
    assert!(
        url.starts_with(&format!("https://mine.apps.{DOMAIN}:")),
        "{url}"
    );
    assert_eq!(
        client
            .get(&format!("mine.apps.{DOMAIN}"), "/")
            .await
            .unwrap()
            .text(),
        "hello from upstream"
    );

    let tcp_port = free_port_in_range();
    let (_tcp, url) = forwarding(&mut postern(
        &edge,
        &[
            "tcp",
            &port,
            "--url",
            &format!("tcp://127.0.0.1:{tcp_port}"),
        ],
    ))
    .await;
    assert_eq!(url, format!("tcp://127.0.0.1:{tcp_port}"));

    for (args, want) in [
        (
            vec!["http", "1", "--url", "https://port.example.test:8444"],
            "ERR_POSTERN_9035",
        ),
        (
            vec!["http", "1", "--subdomain", "a", "--url", "b.example.test"],
            "not both",
        ),
        (
            vec!["http", "1", "--subdomain", "no_underscores"],
            "subdomain",
        ),
        (vec!["http", "1", "--url", "ftp://x.example.test"], "ftp"),
    ] {
        let out = postern(&edge, &args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

/// A free port in the test edge's TCP range.
fn free_port_in_range() -> u16 {
    (20000..29999)
        .map(|p| p + (std::process::id() % 5000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

#[tokio::test]
async fn an_ngrok_v3_config_file_runs() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("agent-v3");
    let file = dir.path().join("ngrok.yml");
    std::fs::write(
        &file,
        format!(
            "version: 3\nagent:\n  authtoken: {token}\n  connect_url: {agent}\n  connect_cas: {ca}\n\
             endpoints:\n  - name: web\n    url: https://v3.{DOMAIN}\n    upstream:\n      url: {port}\n\
             \x20   traffic_policy:\n      on_http_response:\n        - actions:\n            - type: add-headers\n              config:\n                headers:\n                  x-from-v3: v3\n",
            token = edge.token,
            agent = edge.addrs.agent,
            ca = edge.ca_pem().display(),
            port = upstream.port(),
        ),
    )
    .unwrap();
    let name = format!("tunnel.{}.connect.{DOMAIN}", edge.region());
    let (_agent, url) = forwarding(
        Command::new(binary("postern"))
            .args(["start", "--all", "--tls-server-name", &name, "--config"])
            .arg(&file),
    )
    .await;
    assert!(url.starts_with(&format!("https://v3.{DOMAIN}:")), "{url}");
    let r = HttpsClient::new(edge.addrs.https, &edge.ca_pem())
        .get(&format!("v3.{DOMAIN}"), "/")
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.headers["x-from-v3"].to_str().unwrap()),
        (200, "v3")
    );

    for (body, want) in [
        (
            "endpoints:\n  - name: a\n    url: https://a.example.test\n    upstream:\n      url: 80\n      protocol: http3\n",
            "upstream.protocol",
        ),
        ("authtoken: abc\n", "agent settings go under agent:"),
        (
            "endpoints:\n  - name: a\n    url: https://a.example.test\n    upstream:\n      url: 80\n    bogus: 1\n",
            "bogus",
        ),
    ] {
        std::fs::write(&file, format!("version: 3\n{body}")).unwrap();
        let out = Command::new(binary("postern"))
            .args(["start", "--all", "--config"])
            .arg(&file)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {stderr}");
        assert!(stderr.contains(want), "{body}: {stderr}");
    }
}

/// With no `--root-cas` the agent trusts the host's store, which
/// `SSL_CERT_FILE` replaces.
#[tokio::test]
async fn root_cas_host_reads_ssl_cert_file() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let port = upstream.port().to_string();
    let args = |args: &mut Command| {
        args.args(["http", &port, "--url", &format!("host-roots.{DOMAIN}")])
            .args(["--authtoken", &edge.token])
            .args(["--server-addr", &edge.addrs.agent.to_string()])
            .args([
                "--tls-server-name",
                &format!("tunnel.{}.connect.{DOMAIN}", edge.region()),
            ]);
    };
    let mut trusting = Command::new(binary("postern"));
    args(&mut trusting);
    let (_agent, _) = forwarding(trusting.env("SSL_CERT_FILE", edge.ca_pem())).await;
    drop(_agent);

    // Trusting only the system store, the agent cannot verify the test
    // edge: it says why (on stderr) and keeps retrying, never forwarding.
    let mut system = Command::new(binary("postern"));
    args(&mut system);
    let mut agent = system
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stderr.take().unwrap()).lines();
    let lost = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("session lost") {
                return line;
            }
        }
        panic!("the agent exited instead of retrying");
    })
    .await
    .expect("the agent reports the failed connection");
    assert!(lost.contains("UnknownIssuer"), "{lost}");
}

/// tinyproxy as an HTTP CONNECT proxy with Basic credentials; its log names
/// each CONNECT.
struct Tinyproxy {
    addr: SocketAddr,
    log: std::path::PathBuf,
    _process: Spawned,
    _dir: TempDir,
}

impl Tinyproxy {
    async fn start() -> Tinyproxy {
        let dir = TempDir::new("tinyproxy");
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\n\
                 MaxClients 50\nAllow 127.0.0.1\nBasicAuth postern proxy-pass-1\n",
                log.display()
            ),
        )
        .unwrap();
        let process = Spawned::spawn(Command::new("tinyproxy").arg("-d").arg("-c").arg(&conf));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr).await;
        Tinyproxy {
            addr,
            log,
            _process: process,
            _dir: dir,
        }
    }

    fn connects_to(&self, target: SocketAddr) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(&format!("CONNECT {target}"))
            .count()
    }
}

async fn wait_listening(addr: SocketAddr) {
    postern_tests::eventually(15, &format!("something listens on {addr}"), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// An agent through the HTTP proxy serves; the proxy's log shows the
/// CONNECT; a wrong password is named as the proxy's refusal (tinyproxy answers
/// 401 where most proxies answer 407).
#[tokio::test]
async fn through_an_http_connect_proxy_with_credentials() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let proxy = Tinyproxy::start().await;
    let dir = TempDir::new("proxy-agent");
    let config = dir.path().join("agent.yml");
    std::fs::write(
        &config,
        format!(
            "version: 2\nproxy_url: http://postern:proxy-pass-1@{}\n",
            proxy.addr
        ),
    )
    .unwrap();
    let name = format!("via-proxy.{DOMAIN}");
    let port = upstream.port().to_string();
    let (_agent, _) = forwarding(
        postern(
            &edge,
            &["http", &port, "--url", &name, "--connections", "2"],
        )
        .arg("--config")
        .arg(&config),
    )
    .await;
    assert_eq!(
        proxy.connects_to(edge.addrs.agent),
        2,
        "both connections of the session through the proxy"
    );
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(client.get(&name, "/").await.unwrap().status, 200);

    let yaml = edge.agent_yaml(&edge.token, "  w:\n    proto: http\n    addr: 1\n")
        + &format!("proxy_url: http://postern:wrong-pass@{}\n", proxy.addr);
    let refused = postern_agent::Agent::start(
        postern_agent::parse_raw(serde_yaml_ng::from_str(&yaml).unwrap())
            .and_then(|raw| raw.validate(None))
            .unwrap(),
    );
    let mut status = refused.status();
    let seen = tokio::time::timeout(
        Duration::from_secs(15),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("the agent reports why it cannot connect")
    .unwrap()
    .last_error
    .clone()
    .unwrap();
    assert!(
        seen.contains("refused the credentials (401)") && !seen.contains("wrong-pass"),
        "{seen}"
    );
    refused.shutdown().await.unwrap();
}

/// `HTTPS_PROXY` is used when no `proxy_url` is set; `NO_PROXY` naming the
/// edge's host goes around it.
#[tokio::test]
async fn https_proxy_and_no_proxy_from_the_environment() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let proxy = Tinyproxy::start().await;
    let port = upstream.port().to_string();
    let proxy_url = format!("http://postern:proxy-pass-1@{}", proxy.addr);
    let (agent, _) = forwarding(
        postern(
            &edge,
            &[
                "http",
                &port,
                "--url",
                &format!("env-proxy.{DOMAIN}"),
                "--connections",
                "2",
            ],
        )
        .env("HTTPS_PROXY", &proxy_url),
    )
    .await;
    assert_eq!(
        proxy.connects_to(edge.addrs.agent),
        2,
        "both connections of the session through the proxy"
    );
    drop(agent);
    let (_agent, _) = forwarding(
        postern(
            &edge,
            &["http", &port, "--url", &format!("no-proxy.{DOMAIN}")],
        )
        .env("HTTPS_PROXY", &proxy_url)
        .env("NO_PROXY", "localhost,127.0.0.1"),
    )
    .await;
    assert_eq!(
        proxy.connects_to(edge.addrs.agent),
        2,
        "NO_PROXY: no further CONNECT"
    );
}

/// An HTTPS proxy (pproxy behind TLS, its certificate trusted through
/// `SSL_CERT_FILE`) and pproxy as a SOCKS5 proxy with a user name and
/// password.
#[tokio::test]
async fn through_https_and_socks5_proxies_with_credentials() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("pproxy");
    let ca = TestCa::root("proxy CA");
    let (crt, key) = ca.server(&["127.0.0.1"]).write(dir.path(), "proxy", &[]);
    let ca_file = dir.path().join("proxy-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let port = upstream.port().to_string();
    for (listen, scheme) in [("http+ssl", "https"), ("socks5", "socks5")] {
        let proxy_port = free_port();
        let mut pproxy = Spawned::spawn(
            Command::new(pproxy_bin())
                .arg("-l")
                .arg(format!(
                    "{listen}://127.0.0.1:{proxy_port}#postern:proxy-pass-1"
                ))
                .arg("--ssl")
                .arg(format!("{},{}", crt.display(), key.display()))
                .args(["--auth", "0", "-v"]),
        );
        wait_listening(SocketAddr::from(([127, 0, 0, 1], proxy_port))).await;
        let name = format!("{scheme}-proxy.{DOMAIN}");
        let (_agent, _) = forwarding(
            postern(&edge, &["http", &port, "--url", &name])
                .env(
                    "ALL_PROXY",
                    format!("{scheme}://postern:proxy-pass-1@127.0.0.1:{proxy_port}"),
                )
                .env("SSL_CERT_FILE", &ca_file),
        )
        .await;
        let line = pproxy
            .wait_for_line(&format!("-> {}", edge.addrs.agent), 10)
            .await;
        println!("{scheme} proxy: {line}");
        let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
        assert_eq!(client.get(&name, "/").await.unwrap().status, 200);
    }
}

/// Dante as a SOCKS5 proxy without authentication; its log shows the
/// connection to the edge.
#[tokio::test]
async fn through_a_socks5_proxy() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("dante");
    let port = free_port();
    let log = dir.path().join("danted.log");
    let conf = dir.path().join("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: {log}\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{\n  from: 127.0.0.1/32 to: 0.0.0.0/0\n  log: connect\n}}\n\
             socks pass {{\n  from: 127.0.0.1/32 to: 0.0.0.0/0\n  command: connect\n  log: connect\n}}\n",
            log = log.display()
        ),
    )
    .unwrap();
    let _dante = Spawned::spawn(
        Command::new("danted")
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("danted.pid")),
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let name = format!("dante.{DOMAIN}");
    let (_agent, _) = forwarding(
        postern(
            &edge,
            &["http", &upstream.port().to_string(), "--url", &name],
        )
        .env("ALL_PROXY", format!("socks5://127.0.0.1:{port}")),
    )
    .await;
    let target = format!("127.0.0.1.{}", edge.addrs.agent.port());
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains(&target), "dante's log: {logged}");
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    assert_eq!(client.get(&name, "/").await.unwrap().status, 200);
}

fn pproxy_bin() -> std::path::PathBuf {
    python().with_file_name("pproxy")
}
