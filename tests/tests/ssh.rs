//! Agentless tunnels over SSH, driven by Debian's OpenSSH client: `ssh -R`
//! to the edge's SSH ingress with the authtoken as the user name, as
//! ngrok's SSH reverse tunnels, and curl through the endpoints it gets.

use std::{path::PathBuf, process::Stdio, time::Duration};

use postern_tests::{
    ACL_TOKEN, DOMAIN, HttpUpstream, HttpsClient, Spawned, TempDir, TestEdge, TlsUpstream, curl,
    eventually,
};
use tokio::process::Command;

/// OpenSSH pointed at `edge`'s SSH ingress, trusting only its host key
/// (`StrictHostKeyChecking=yes` against a `known_hosts` written from it),
/// with no user config, no keys and no prompts.
struct Ssh {
    _dir: TempDir,
    known_hosts: PathBuf,
    port: u16,
}

impl Ssh {
    fn new(edge: &TestEdge) -> Ssh {
        let dir = TempDir::new("ssh-client");
        let (key, _fingerprint) = edge.edge().ssh_host_key().expect("the SSH ingress is on");
        let port = edge.addrs.ssh.expect("ssh listener").port();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {key}\n")).unwrap();
        Ssh {
            _dir: dir,
            known_hosts,
            port,
        }
    }

    /// `ssh <args> <user>@127.0.0.1 <command>`.
    fn command(&self, args: &[&str], user: &str, command: &[&str]) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.args(["-F", "/dev/null", "-n", "-p", &self.port.to_string()])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "ExitOnForwardFailure=yes",
            ])
            .args(args)
            .arg(format!("{user}@127.0.0.1"))
            .args(command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        ssh
    }

    /// A tunnel kept open; its stdout lines are collected.
    fn spawn(&self, args: &[&str], user: &str, command: &[&str]) -> Spawned {
        Spawned::spawn(&mut self.command(args, user, command))
    }

    /// Runs to the end: (exit code, stdout, stderr).
    async fn run(&self, args: &[&str], user: &str, command: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            self.command(args, user, command).output(),
        )
        .await
        .expect("ssh ends within 20s")
        .expect("ssh runs (is openssh-client installed?)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The URL of a `Forwarding  <url>` line.
fn forwarded_url(line: &str) -> String {
    line.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string()
}

#[tokio::test]
async fn http_and_tcp_endpoints_over_openssh_serve_curl() {
    let edge = TestEdge::start_with_ssh("").await;
    let upstream = HttpUpstream::start().await;
    let ssh = Ssh::new(&edge);
    let local = format!("localhost:{}", upstream.port());

    // HTTP, ngrok's `ssh -R app.example.com:443:localhost:8080 … http`
    // (this edge assigns no random names), with an option.
    let name = format!("ssh-app.{DOMAIN}");
    let mut http = ssh.spawn(
        &["-R", &format!("{name}:443:{local}")],
        &edge.token,
        &["http", "--request-header-add", "'x-via: ssh'"],
    );
    let url = forwarded_url(&http.wait_for_line("Forwarding", 20).await);
    assert_eq!(url, edge.https_url(&name, ""));
    let host = name.as_str();
    let (status, _, body) = edge.fetch(host, "/echo", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /echo"), "{body}");
    assert!(
        body.contains("x-via: ssh"),
        "the option reached the edge: {body}"
    );
    // The endpoint is an ordinary one: the registry lists it.
    assert!(
        edge.edge().endpoints().iter().any(|e| e.public_url == url),
        "{url} is not among the edge's endpoints"
    );

    // TCP, `ssh -R 0:localhost:22 … tcp`: the edge picks the port.
    let mut tcp = ssh.spawn(&["-R", &format!("0:{local}")], &edge.token, &["tcp"]);
    let tcp_url = forwarded_url(&tcp.wait_for_line("Forwarding", 20).await);
    let addr = tcp_url
        .strip_prefix("tcp://")
        .unwrap_or_else(|| panic!("not a tcp URL: {tcp_url}"));
    let out = curl(&[&format!("http://{addr}/echo")]).await;
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl through {tcp_url}: {out:?}");
    assert!(body.starts_with("GET /echo"), "{body}");

    // The client killed: its endpoint is gone within the heartbeat
    // tolerance (3s here).
    http.kill().await;
    eventually(10, "the HTTP endpoint is gone", || {
        let gone = !edge.edge().endpoints().iter().any(|e| e.public_url == url);
        async move { gone }
    })
    .await;
    // No endpoint has the name any more: the TLS handshake is refused
    // (curl's status 000).
    assert_eq!(edge.https_status(host, "/echo", &[]).await, "000");
    tcp.kill().await;
}

#[tokio::test]
async fn ssh_n_infers_the_command_from_the_remote_port() {
    let edge = TestEdge::start_with_ssh("").await;
    let upstream = HttpUpstream::start().await;
    let ssh = Ssh::new(&edge);
    // No command (`-N`): remote port 0 is a TCP endpoint.
    let mut tunnel = ssh.spawn(
        &["-N", "-R", &format!("0:localhost:{}", upstream.port())],
        &edge.token,
        &[],
    );
    eventually(20, "an endpoint is bound", || {
        let bound = edge
            .edge()
            .endpoints()
            .iter()
            .any(|e| e.public_url.starts_with("tcp://"));
        async move { bound }
    })
    .await;
    let url = edge.edge().endpoints()[0].public_url.clone();
    let out = curl(&[&format!("http://{}/echo", &url["tcp://".len()..])]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("GET /echo"),
        "{out:?}"
    );
    tunnel.kill().await;
}

#[tokio::test]
async fn bad_logins_and_bad_commands_are_told_on_the_ssh_session() {
    let edge = TestEdge::start_with_ssh("").await;
    let ssh = Ssh::new(&edge);
    let forward = ["-R", "443:localhost:9"];

    // A wrong authtoken, on the terminal.
    let (code, _, stderr) = ssh.run(&forward, "not-a-valid-token", &["http"]).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("ERR_POSTERN_107: the authtoken is not valid"),
        "{stderr}"
    );
    // ngrok's `v2@` user: the user name must be the authtoken here.
    let (_, _, stderr) = ssh.run(&forward, "v2", &["http"]).await;
    assert!(
        stderr.contains("authtoken as the SSH user name"),
        "{stderr}"
    );
    // Under -N there is no terminal: OpenSSH prints the disconnect message.
    let (code, _, stderr) = ssh
        .run(&["-N", "-R", "0:localhost:9"], "not-a-valid-token", &[])
        .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("ERR_POSTERN_107"), "{stderr}");

    // Commands ngrok's grammar does not have, and what SSH cannot do.
    for (command, want) in [
        (&["ftp"][..], "ERR_POSTERN_1108"),
        (&["http", "--frobnicate"][..], "unknown option --frobnicate"),
        (&["http", "--basic-auth", "a:b"][..], "8 to 128"),
        (
            &["tls", "--terminate-at", "edge"][..],
            "SSH does not support termination at the edge",
        ),
    ] {
        let (code, _, stderr) = ssh.run(&forward, &edge.token, command).await;
        assert_ne!(code, 0, "{command:?}");
        assert!(stderr.contains(want), "{command:?}: {stderr}");
    }
    // A port the command cannot take.
    let (_, _, stderr) = ssh
        .run(&["-R", "8080:localhost:9"], &edge.token, &["http"])
        .await;
    assert!(stderr.contains("ERR_POSTERN_1116"), "{stderr}");
    // `http --help` (or `help`) prints the usage and exits 0.
    let (code, stdout, stderr) = ssh.run(&forward, &edge.token, &["http", "--help"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("usage: ssh -R"), "{stdout}");
    // Nothing of this bound anything.
    assert!(edge.edge().endpoints().is_empty());
}

#[tokio::test]
async fn tls_passes_through_and_the_token_acl_applies() {
    let edge = TestEdge::start_with_ssh("").await;
    let ssh = Ssh::new(&edge);
    // `ssh -R app.example.com:443:localhost:443 … tls`: the client trusts
    // only the upstream's CA, so the edge never saw the plaintext.
    let name = format!("ssh-tls.{DOMAIN}");
    let upstream = TlsUpstream::start(&[&name]).await;
    let mut tunnel = ssh.spawn(
        &[
            "-R",
            &format!("{name}:443:localhost:{}", upstream.addr.port()),
        ],
        &edge.token,
        &["tls"],
    );
    let url = forwarded_url(&tunnel.wait_for_line("Forwarding", 20).await);
    assert_eq!(url, format!("tls://{name}:{}", edge.addrs.https.port()));
    let client = HttpsClient::with_ca_pem(edge.addrs.https, upstream.ca_pem.as_bytes());
    let r = client.get(&name, "/").await.unwrap();
    assert_eq!(r.text(), format!("tls-upstream {name}"));
    tunnel.kill().await;

    // A token whose ACL allows only *.customer1.<domain>: the refusal is
    // shown in the client's output, and nothing is bound.
    let (code, _, stderr) = ssh
        .run(
            &["-R", &format!("elsewhere.{DOMAIN}:443:localhost:9")],
            ACL_TOKEN,
            &["http"],
        )
        .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("ERR_POSTERN_316"), "{stderr}");
    eventually(10, "the TLS endpoint is gone", || {
        let none = edge.edge().endpoints().is_empty();
        async move { none }
    })
    .await;
}

#[tokio::test]
async fn a_draining_edge_tells_the_ssh_session_and_closes_it() {
    let mut edge = TestEdge::start_with_ssh("").await;
    let upstream = HttpUpstream::start().await;
    let ssh = Ssh::new(&edge);
    let child = ssh
        .command(
            &["-R", &format!("0:localhost:{}", upstream.port())],
            &edge.token,
            &["tcp"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh runs");
    eventually(20, "the TCP endpoint is bound", || {
        let bound = !edge.edge().endpoints().is_empty();
        async move { bound }
    })
    .await;
    edge.stop().await;
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("ssh ends once the edge has drained")
        .expect("ssh output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERR_POSTERN_742"), "{stderr}");
    assert_ne!(out.status.code(), Some(0), "{stderr}");
}
