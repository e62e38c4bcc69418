//! ngrok's Python and Node SDKs (both built on the Rust crate) against a
//! Postern edge: `forward` to a local HTTP server, and seed 002's TLS
//! snippets with the server address and CA added. The scripts are in
//! `tests/ngrok-sdk/`; `scripts/test.sh` installs the Python package into
//! `.venv-svc` and the Node package into `tests/ngrok-sdk/node_modules`.

use std::path::PathBuf;

use postern_tests::{DOMAIN, HttpUpstream, HttpsClient, Spawned, TestCa, TestEdge};
use tokio::process::Command;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ngrok-sdk")
}

/// The Python with the `ngrok` package (`POSTERN_TEST_PYTHON`, or the
/// repository's `.venv-svc`).
fn python() -> PathBuf {
    let path = std::env::var_os("POSTERN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-svc/bin/python")
        });
    let has_sdk = std::process::Command::new(&path)
        .args(["-c", "import ngrok"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_sdk,
        "{} has no `ngrok` package: run scripts/test.sh, which installs ngrok's Python SDK into .venv-svc",
        path.display()
    );
    path
}

fn node() -> Command {
    assert!(
        sdk_dir().join("node_modules/@ngrok/ngrok").exists(),
        "tests/ngrok-sdk/node_modules is missing: run scripts/test.sh (npm ci there)"
    );
    let mut node = Command::new("node");
    node.arg(sdk_dir().join("forward.js"));
    node
}

fn python_sdk() -> Command {
    let mut py = Command::new(python());
    py.arg(sdk_dir().join("forward.py"));
    py
}

/// Runs an SDK script in `mode` against `edge`, forwarding to `port` on
/// `domain`; waits for the URL it prints.
async fn forward(
    mut command: Command,
    mode: &str,
    edge: &TestEdge,
    port: u16,
    domain: &str,
    cert: Option<(PathBuf, PathBuf)>,
) -> (Spawned, String) {
    command
        .arg(mode)
        .env(
            "POSTERN_SERVER_ADDR",
            format!("127.0.0.1:{}", edge.addrs.ngrok_agent.unwrap().port()),
        )
        .env("POSTERN_CA", edge.ca_pem())
        .env("NGROK_AUTHTOKEN", &edge.token)
        .env("UPSTREAM_PORT", port.to_string())
        .env("ENDPOINT_DOMAIN", domain);
    if let Some((crt, key)) = cert {
        command.env("CRT_PATH", crt).env("KEY_PATH", key);
    }
    let mut process = Spawned::spawn(&mut command);
    let line = process.wait_for_line("Ingress established at: ", 60).await;
    let url = line
        .split_once("Ingress established at: ")
        .map(|(_, url)| url.trim().to_string())
        .unwrap();
    (process, url)
}

async fn forwards_http(command: Command, name: &str) {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = format!("{name}.{DOMAIN}");
    let (_sdk, url) = forward(command, "http", &edge, upstream.port(), &host, None).await;
    assert_eq!(url, edge.https_url(&host, ""));
    let (status, _, body) = edge.fetch(&host, "/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "hello from upstream"));
}

/// Seed 002's snippet: a TLS endpoint terminated at the edge with the
/// application's certificate; the upstream gets plain bytes.
async fn seed_002_tls(command: Command, name: &str) {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let host = format!("{name}.{DOMAIN}");
    let ca = TestCa::root("seed 002 app CA");
    let cert = ca.server(&[&host]).write(edge.dir.path(), name, &[]);
    let (_sdk, url) = forward(command, "tls", &edge, upstream.port(), &host, Some(cert)).await;
    assert_eq!(url, format!("tls://{host}:{}", edge.addrs.https.port()));
    let client = HttpsClient::with_ca_pem(edge.addrs.https, ca.pem.as_bytes());
    let answer = client
        .get(&host, "/")
        .await
        .expect("through the TLS endpoint");
    assert_eq!(answer.text(), "hello from upstream");
}

#[tokio::test]
async fn the_python_sdk_forwards_http() {
    forwards_http(python_sdk(), "python").await;
}

#[tokio::test]
async fn the_node_sdk_forwards_http() {
    forwards_http(node(), "node").await;
}

#[tokio::test]
async fn seed_002_python_tls_snippet() {
    seed_002_tls(python_sdk(), "app-py").await;
}

#[tokio::test]
async fn seed_002_javascript_tls_snippet() {
    seed_002_tls(node(), "app-js").await;
}
