//! Agentless tunnels over SSH, driven by Debian's OpenSSH client: `ssh -R`
//! to the edge's SSH ingress, logged in with an ed25519 key registered
//! through `/ssh_credentials` or with the authtoken as the user name, as
//! ngrok's SSH reverse tunnels, and curl through the endpoints it gets.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Output, Stdio},
    time::Duration,
};

use postern_tests::{
    ACL_TOKEN, API_KEY, DOMAIN, EVENTS_TO_FILE, HttpUpstream, HttpsClient, Spawned, TempDir,
    TestEdge, TlsUpstream,
    cluster::{TestCluster, cluster_toml, udp_port},
    curl, eventually,
};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const JSON: &str = "Content-Type: application/json";

/// OpenSSH pointed at `edge`'s SSH ingress, trusting only its host key
/// (`StrictHostKeyChecking=yes` against a `known_hosts` written from it),
/// with no user config, no prompts, and either no key or one ed25519 key
/// of its own (`ssh-keygen`), no agent's.
struct Ssh {
    dir: TempDir,
    known_hosts: PathBuf,
    port: u16,
    key: Option<PathBuf>,
}

impl Ssh {
    /// A client without keys: it can log in only with an authtoken as
    /// its user name.
    fn new(edge: &TestEdge) -> Ssh {
        let dir = TempDir::new("ssh-client");
        let (key, _fingerprint) = edge.edge().ssh_host_key().expect("the SSH ingress is on");
        let port = edge.addrs.ssh.expect("ssh listener").port();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {key}\n")).unwrap();
        Ssh {
            dir,
            known_hosts,
            port,
            key: None,
        }
    }

    /// A client with a new ed25519 key.
    fn with_key(edge: &TestEdge) -> Ssh {
        let mut ssh = Ssh::new(edge);
        let key = ssh.dir.path().join("id_ed25519");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "tester@ci", "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen runs (is openssh-client installed?)");
        assert!(made.success());
        ssh.key = Some(key);
        ssh
    }

    /// The key's `.pub` line.
    fn public_key(&self) -> String {
        let key = self.key.as_ref().expect("a client with a key");
        std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `ssh <args> <user>@127.0.0.1 <command>`. `args` come first, so
    /// that their `-o` options win over the defaults (OpenSSH keeps the
    /// first value of each).
    fn command(&self, args: &[&str], user: &str, command: &[&str]) -> Command {
        let mut ssh = Command::new("ssh");
        ssh.args(args)
            .args(["-F", "/dev/null", "-n", "-p", &self.port.to_string()])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "IdentityAgent=none",
            ]);
        match &self.key {
            Some(key) => ssh.arg("-i").arg(key).args(["-o", "IdentitiesOnly=yes"]),
            None => ssh.args(["-o", "PubkeyAuthentication=no"]),
        };
        ssh.arg(format!("{user}@127.0.0.1"))
            .args(command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        ssh
    }

    /// A tunnel kept open; its stdout lines are collected.
    fn spawn(&self, args: &[&str], user: &str, command: &[&str]) -> Spawned {
        Spawned::spawn(&mut self.command(args, user, command))
    }

    /// A tunnel kept open with its stdout and stderr kept for
    /// [`finished`].
    fn spawn_piped(&self, args: &[&str], user: &str, command: &[&str]) -> Child {
        self.command(args, user, command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh runs")
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
        texts(out)
    }
}

/// (exit code, stdout, stderr).
fn texts(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits (20 s at most) for a spawned ssh to end on its own.
async fn finished(child: Child) -> (i32, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("ssh ends within 20s")
        .expect("ssh output");
    texts(out)
}

/// A one-node cluster's `[cluster]` table: `/ssh_credentials`, like
/// `/credentials`, lives in the cluster.
fn one_node_cluster() -> String {
    let gossip = [SocketAddr::from(([127, 0, 0, 1], udp_port()))];
    cluster_toml(&format!("ssh-{}", postern_net::random_label()), &gossip, 0)
}

/// An edge with the SSH ingress and the admin API's SSH credentials.
async fn keyed_edge(extra: &str) -> TestEdge {
    TestEdge::start_with_ssh(&format!("{extra}\n{}", one_node_cluster())).await
}

/// Registers `public_key` at `edge` with `acl`: the object.
async fn register(edge: &TestEdge, public_key: &str, acl: &[&str]) -> Value {
    let body = json!({
        "public_key": public_key,
        "acl": acl,
        "description": "ci runner",
        "metadata": "{\"team\": \"ops\"}",
    })
    .to_string();
    let (status, created) = edge
        .api(
            "POST",
            "/ssh_credentials",
            Some((JSON, body.as_str())),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created
}

/// Waits until `edge` serves no endpoint.
async fn unbound(edge: &TestEdge) {
    eventually(10, "no endpoint is bound", || {
        let none = edge.edge().endpoints().is_empty();
        async move { none }
    })
    .await;
}

/// Waits until `edge` serves an endpoint.
async fn bound(edge: &TestEdge) {
    eventually(20, "an endpoint is bound", || {
        let bound = !edge.edge().endpoints().is_empty();
        async move { bound }
    })
    .await;
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

    // A user name that is no authtoken, from a client without a
    // registered key: OpenSSH is refused at login, with or without -N.
    for args in [&forward[..], &["-N", "-R", "0:localhost:9"][..]] {
        let (code, _, stderr) = ssh.run(args, "not-a-valid-token", &["http"]).await;
        assert_eq!(code, 255, "{stderr}");
        assert!(stderr.contains("Permission denied (publickey"), "{stderr}");
    }

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
    unbound(&edge).await;
}

#[tokio::test]
async fn a_draining_edge_tells_the_ssh_session_and_closes_it() {
    let mut edge = TestEdge::start_with_ssh("").await;
    let upstream = HttpUpstream::start().await;
    let ssh = Ssh::new(&edge);
    let child = ssh.spawn_piped(
        &["-R", &format!("0:localhost:{}", upstream.port())],
        &edge.token,
        &["tcp"],
    );
    bound(&edge).await;
    edge.stop().await;
    let (code, _, stderr) = finished(child).await;
    assert!(stderr.contains("ERR_POSTERN_742"), "{stderr}");
    assert_ne!(code, 0, "{stderr}");
}

#[tokio::test]
async fn a_registered_key_serves_an_endpoint_and_an_unregistered_one_is_refused() {
    let edge = keyed_edge("").await;
    let upstream = HttpUpstream::start().await;
    let ssh = Ssh::with_key(&edge);
    let created = register(&edge, &ssh.public_key(), &[]).await;
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("sshcr_"), "{created}");
    // ngrok's shape.
    assert_eq!(created["uri"], format!("/ssh_credentials/{id}"));
    assert_eq!(created["public_key"], ssh.public_key(), "{created}");
    assert_eq!(created["acl"], json!([]));
    assert_eq!(created["description"], "ci runner");
    assert_eq!(created["metadata"], "{\"team\": \"ops\"}");
    assert_eq!(created["owner_id"], Value::Null);
    assert!(created["created_at"].as_str().is_some(), "{created}");

    // ngrok's `v2@` user: the key is what counts.
    let name = format!("ssh-key.{DOMAIN}");
    let mut tunnel = ssh.spawn(
        &["-R", &format!("{name}:443:localhost:{}", upstream.port())],
        "v2",
        &["http"],
    );
    let url = forwarded_url(&tunnel.wait_for_line("Forwarding", 20).await);
    assert_eq!(url, edge.https_url(&name, ""));
    let (status, _, body) = edge.fetch(&name, "/echo", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /echo"), "{body}");
    // The session is the credential's.
    eventually(10, "the session names its ssh credential", || async {
        let (_, sessions) = edge.api("GET", "/tunnel_sessions", None, API_KEY).await;
        sessions["tunnel_sessions"].as_array().is_some_and(|all| {
            all.iter().any(|s| {
                s["credential"]["id"] == id
                    && s["credential"]["uri"] == format!("/ssh_credentials/{id}")
            })
        })
    })
    .await;

    // A key nobody registered is refused at login, and binds nothing.
    let stranger = Ssh::with_key(&edge);
    let (code, _, stderr) = stranger
        .run(
            &["-R", &format!("other.{DOMAIN}:443:localhost:9")],
            "v2",
            &["http"],
        )
        .await;
    assert_eq!(code, 255, "{stderr}");
    assert!(stderr.contains("Permission denied (publickey"), "{stderr}");
    assert_eq!(edge.edge().endpoints().len(), 1);
    tunnel.kill().await;
}

#[tokio::test]
async fn ssh_credentials_are_checked_listed_updated_and_deleted_like_credentials() {
    let edge = keyed_edge("").await;
    let ssh = Ssh::with_key(&edge);
    let key = ssh.public_key();
    let api = &edge;
    let post = move |body: Value| async move {
        let body = body.to_string();
        api.api(
            "POST",
            "/ssh_credentials",
            Some((JSON, body.as_str())),
            API_KEY,
        )
        .await
    };
    // What is not one OpenSSH public key: a 400 saying what is wrong.
    let private = std::fs::read_to_string(ssh.key.as_ref().unwrap()).unwrap();
    for (body, want) in [
        (json!({}), "public_key: required"),
        (
            json!({"public_key": "ssh-ed25519 AAAA-not-base64"}),
            "public_key: not an OpenSSH public key",
        ),
        (
            json!({"public_key": private}),
            "public_key: this is a private key; give the public key",
        ),
        (
            json!({"public_key": format!("{key}\n{key}")}),
            "public_key: give one key",
        ),
        (json!({"public_key": key, "acl": ["bond:x"]}), "acl:"),
        (
            json!({"public_key": key, "owner_id": "bot_nobody"}),
            "owner_id: no bot user bot_nobody",
        ),
        (
            json!({"public_key": key, "frobnicate": 1}),
            "unknown field `frobnicate`",
        ),
    ] {
        let (status, error) = post(body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error_code"], "ERR_POSTERN_9400", "{error}");
        let msg = error["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{body}: {msg}");
    }
    assert_eq!(
        edge.api("GET", "/ssh_credentials", None, API_KEY).await.1["ssh_credentials"],
        json!([])
    );

    let created = register(&edge, &key, &["bind:*.customer1.example.test"]).await;
    let id = created["id"].as_str().unwrap();
    // One key, one credential.
    let (status, error) = post(json!({"public_key": key})).await;
    assert_eq!(status, 400);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains(&format!("registered already, as ssh credential {id}")),
        "{error}"
    );

    let (status, listed) = edge.api("GET", "/ssh_credentials", None, API_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(listed["ssh_credentials"], json!([created]), "{listed}");
    assert_eq!(listed["uri"], "/ssh_credentials");
    let path = format!("/ssh_credentials/{id}");
    assert_eq!(
        edge.api("GET", &path, None, API_KEY).await,
        (200, created.clone())
    );

    // A PATCH changes the ACL and the texts; the key stays.
    let (status, updated) = edge
        .api(
            "PATCH",
            &path,
            Some((
                JSON,
                r#"{"acl": ["bind:a.example.test"], "description": "moved"}"#,
            )),
            API_KEY,
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["acl"], json!(["bind:a.example.test"]));
    assert_eq!(updated["description"], "moved");
    assert_eq!(updated["public_key"], key);
    let (status, error) = edge
        .api(
            "PATCH",
            &path,
            Some((JSON, r#"{"acl": ["bond:x"]}"#)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 400, "{error}");
    let (status, error) = edge
        .api(
            "PATCH",
            &path,
            Some((JSON, json!({"public_key": key}).to_string().as_str())),
            API_KEY,
        )
        .await;
    assert_eq!(status, 400, "the key cannot be changed: {error}");

    let (status, _) = edge.api("DELETE", &path, None, API_KEY).await;
    assert_eq!(status, 204);
    let (status, error) = edge.api("GET", &path, None, API_KEY).await;
    assert_eq!(status, 404, "{error}");

    // A bot user's keys go with it.
    let (_, bot) = edge
        .api(
            "POST",
            "/bot_users",
            Some((JSON, r#"{"name": "ci"}"#)),
            API_KEY,
        )
        .await;
    let bot_id = bot["id"].as_str().unwrap();
    let (status, owned) = post(json!({"public_key": key, "owner_id": bot_id})).await;
    assert_eq!(status, 201, "{owned}");
    assert_eq!(owned["owner_id"], bot_id);
    let (status, _) = edge
        .api("DELETE", &format!("/bot_users/{bot_id}"), None, API_KEY)
        .await;
    assert_eq!(status, 204);
    let owned_path = format!("/ssh_credentials/{}", owned["id"].as_str().unwrap());
    assert_eq!(edge.api("GET", &owned_path, None, API_KEY).await.0, 404);
}

#[tokio::test]
async fn a_keys_acl_limits_its_binds_and_deleting_it_closes_its_session() {
    // Keys only: the authtoken as the user name is switched off.
    let edge = keyed_edge("[ssh]\nallow_authtoken_user = false").await;
    let upstream = HttpUpstream::start().await;
    let (code, _, stderr) = Ssh::new(&edge)
        .run(&["-R", "0:localhost:9"], &edge.token, &["tcp"])
        .await;
    assert_eq!(code, 255, "the authtoken is no login here: {stderr}");
    assert!(stderr.contains("Permission denied (publickey)"), "{stderr}");

    let ssh = Ssh::with_key(&edge);
    let created = register(&edge, &ssh.public_key(), &["bind:*.customer1.example.test"]).await;
    let id = created["id"].as_str().unwrap();
    // A name outside the key's ACL: refused, in the client's output.
    let (code, _, stderr) = ssh
        .run(
            &["-R", &format!("elsewhere.{DOMAIN}:443:localhost:9")],
            "v2",
            &["http"],
        )
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("ERR_POSTERN_316"), "{stderr}");
    assert!(edge.edge().endpoints().is_empty());

    // A name inside it is served, until the credential is deleted.
    let name = format!("app.customer1.{DOMAIN}");
    let child = ssh.spawn_piped(
        &["-R", &format!("{name}:443:localhost:{}", upstream.port())],
        "v2",
        &["http"],
    );
    bound(&edge).await;
    assert_eq!(edge.fetch(&name, "/", &[]).await.0, 200);
    let (status, _) = edge
        .api("DELETE", &format!("/ssh_credentials/{id}"), None, API_KEY)
        .await;
    assert_eq!(status, 204);
    let (code, _, stderr) = finished(child).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "ERR_POSTERN_1102: the SSH key's credential {id} was revoked"
        )),
        "{stderr}"
    );
    unbound(&edge).await;
    // And the key logs in no more.
    let (code, _, stderr) = ssh.run(&["-R", "0:localhost:9"], "v2", &["tcp"]).await;
    assert_eq!(code, 255, "{stderr}");
}

#[tokio::test]
async fn a_key_registered_at_one_node_logs_in_at_another() {
    let cluster_id = format!("ssh-{}", postern_net::random_label());
    let gossip: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], udp_port())))
        .collect();
    let mut nodes = Vec::new();
    for (i, node) in ["edge-us-1", "edge-us-2"].iter().enumerate() {
        let table = cluster_toml(&cluster_id, &gossip, i);
        nodes.push(TestEdge::start_ssh_node(node, "us", &table).await);
    }
    let cluster = TestCluster {
        cluster_id,
        gossip,
        nodes,
    };
    cluster.wait_members(&[0, 1], 2).await;
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    let upstream = HttpUpstream::start().await;

    let ssh = Ssh::with_key(two);
    let created = register(one, &ssh.public_key(), &[]).await;
    let path = format!("/ssh_credentials/{}", created["id"].as_str().unwrap());
    eventually(30, "the key reaches the other node", || async {
        two.api("GET", &path, None, API_KEY).await.0 == 200
    })
    .await;
    let name = format!("ssh-cluster.{DOMAIN}");
    let child = ssh.spawn_piped(
        &["-R", &format!("{name}:443:localhost:{}", upstream.port())],
        "v2",
        &["http"],
    );
    bound(two).await;
    let (status, _, body) = two.fetch(&name, "/via-two", &[]).await;
    assert_eq!(status, 200, "{body}");
    // Deleted at the first node, the session at the second one ends.
    assert_eq!(one.api("DELETE", &path, None, API_KEY).await.0, 204);
    let (code, _, stderr) = finished(child).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");
}

/// Every field's path in an event (`object.http.request.method`, …) with
/// its value, arrays as whole values.
fn fields(value: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                fields(value, &path, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[tokio::test]
async fn an_ssh_endpoints_events_have_the_fields_an_agents_have() {
    let edge = TestEdge::start_with_ssh(EVENTS_TO_FILE).await;
    let upstream = HttpUpstream::start().await;
    let name = format!("same.{DOMAIN}");
    let events = || edge.file_events("events.jsonl");
    let request = || edge.fetch(&name, "/compare?x=1", &["-H", "user-agent: compare/1"]);

    // The same request, first through a Postern agent...
    let tunnels = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {name}\n",
        upstream.port()
    );
    let (agent, _) = edge.agent(&tunnels).await;
    assert_eq!(request().await.0, 200);
    eventually(20, "the agent endpoint's event", || {
        let n = events().len();
        async move { n == 1 }
    })
    .await;
    agent.shutdown().await.unwrap();
    unbound(&edge).await;

    // ...then through ssh -R.
    let ssh = Ssh::new(&edge);
    let mut tunnel = ssh.spawn(
        &["-R", &format!("{name}:443:localhost:{}", upstream.port())],
        &edge.token,
        &["http"],
    );
    tunnel.wait_for_line("Forwarding", 20).await;
    assert_eq!(request().await.0, 200);
    eventually(20, "the ssh endpoint's event", || {
        let n = events().len();
        async move { n == 2 }
    })
    .await;
    tunnel.kill().await;

    let all = events();
    let (mut by_agent, mut by_ssh) = (BTreeMap::new(), BTreeMap::new());
    fields(&all[0], "", &mut by_agent);
    fields(&all[1], "", &mut by_ssh);
    let names = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&by_agent), names(&by_ssh), "{all:#?}");
    // Values differ only where they must: ids and times.
    let must_differ = [
        "event_id",
        "event_timestamp",
        "object.conn.start_ts",
        "object.conn.end_ts",
        "object.http.request.first_byte_ts",
        "object.http.request.last_byte_ts",
        "object.http.response.first_byte_ts",
        "object.http.response.last_byte_ts",
        "object.postern.duration_ms",
        "object.postern.endpoint_id",
        "object.postern.agent_session_id",
        // The upstream's clock, in seconds: the two requests may fall on
        // either side of a second.
        "object.http.response.headers.Date",
    ];
    let differing: Vec<&String> = by_agent
        .iter()
        .filter(|(path, value)| by_ssh[*path] != **value)
        .map(|(path, _)| path)
        .filter(|path| !must_differ.contains(&path.as_str()))
        .collect();
    assert!(differing.is_empty(), "{differing:?} differ: {all:#?}");
    assert_ne!(
        by_agent["object.postern.agent_session_id"],
        by_ssh["object.postern.agent_session_id"]
    );
}

#[tokio::test]
async fn floods_of_forwards_and_channels_are_refused_and_others_keep_working() {
    let edge = TestEdge::start_with_ssh("[ssh]\nforwards_per_session = 2").await;
    let upstream = HttpUpstream::start().await;
    let local = format!("localhost:{}", upstream.port());
    let ssh = Ssh::new(&edge);
    // A bystander, sharing its connection (OpenSSH's ControlMaster).
    let socket = ssh.dir.path().join("mux");
    let socket_arg = format!("ControlPath={}", socket.display());
    let name = format!("bystander.{DOMAIN}");
    let bystander = ssh.spawn_piped(
        &[
            "-o",
            "ControlMaster=yes",
            "-o",
            &socket_arg,
            "-R",
            &format!("{name}:443:{local}"),
        ],
        &edge.token,
        &["http"],
    );
    bound(&edge).await;
    assert_eq!(edge.fetch(&name, "/", &[]).await.0, 200);

    // 200 forwards in one ssh: refused beyond the limit, with the message.
    let flood: Vec<String> = (0..200)
        .flat_map(|i| ["-R".to_string(), format!("f{i}.{DOMAIN}:443:{local}")])
        .collect();
    let mut args: Vec<&str> = vec!["-o", "ExitOnForwardFailure=no"];
    args.extend(flood.iter().map(String::as_str));
    let (code, _, stderr) = ssh.run(&args, &edge.token, &["http"]).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("ERR_POSTERN_1105") && stderr.contains("holds at most 2 forwards"),
        "{stderr}"
    );

    // More session channels on the bystander's connection: each refused,
    // the bystander told so.
    for _ in 0..5 {
        let (code, _, stderr) = ssh
            .run(
                &["-o", "ControlMaster=no", "-o", &socket_arg],
                &edge.token,
                &["http"],
            )
            .await;
        assert_ne!(code, 0, "a second command on the connection: {stderr}");
    }

    // The bystander is served throughout, and within the limit two
    // forwards are.
    assert_eq!(edge.fetch(&name, "/", &[]).await.0, 200);
    let (a, b) = (format!("a.{DOMAIN}"), format!("b.{DOMAIN}"));
    let mut two = ssh.spawn(
        &[
            "-R",
            &format!("{a}:443:{local}"),
            "-R",
            &format!("{b}:443:{local}"),
        ],
        &edge.token,
        &["http"],
    );
    two.wait_for_line(&a, 20).await;
    two.wait_for_line(&b, 20).await;
    assert_eq!(edge.fetch(&b, "/", &[]).await.0, 200);
    two.kill().await;

    let mut bystander = bystander;
    bystander.kill().await.unwrap();
    let (_, _, stderr) = finished(bystander).await;
    assert!(stderr.contains("ERR_POSTERN_1104"), "{stderr}");
}
