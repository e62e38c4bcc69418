//! The seed documents' flows followed to the letter, with the files their
//! own scripts make.
//!
//! Seed 001 ("Configure Site-to-Site Connectivity for APIs with mTLS"): its
//! certificate script (X.509 v1 certificates with the CA's subject), its
//! `agent-api` tunnel config, its two `POST /api/tunnels` calls through that
//! tunnel (the printed variant with the files mixed up, then the right
//! files) and its access command with the client certificate.

use std::path::Path;

use postern_tests::{
    ACL_TOKEN, HttpUpstream, Spawned, TempDir, TestEdge, binary, free_port, seed_001_certificates,
};
use serde_json::{Value, json};
use tokio::process::Command;

const WILDCARD: &str = "*.customer1.example.test";
const API_DOMAIN: &str = "agent.customer1.example.test";
const SERVICE_DOMAIN: &str = "api.customer1.example.test";

#[tokio::test]
async fn seed_001_site_to_site_with_its_own_certificates_terminating_at_the_agent() {
    site_to_site("agent").await;
}

#[tokio::test]
async fn seed_001_site_to_site_with_its_own_certificates_terminating_at_the_edge() {
    site_to_site("edge").await;
}

async fn site_to_site(terminate_at: &str) {
    let edge = TestEdge::start().await;
    let service = HttpUpstream::start().await;
    let dir = TempDir::new("seed-001");
    seed_001_certificates(dir.path(), WILDCARD, "seed pass phrase").await;

    // The seed's config.yml; root_cas, tls_server_name and web_addr are
    // what a test edge on loopback needs in place of public DNS.
    let web_port = free_port();
    std::fs::write(
        dir.path().join("config.yml"),
        format!(
            "version: \"2\"\nauthtoken: {ACL_TOKEN}\nserver_addr: {agent}\n\
             tls_server_name: tunnel.us.connect.example.test\nroot_cas: {ca}\n\
             web_addr: 127.0.0.1:{web_port}\ntunnels:\n  agent-api:\n    proto: http\n\
             \x20   domain: {API_DOMAIN}\n    addr: {web_port}\n    inspect: false\n",
            agent = edge.addrs.agent,
            ca = edge.ca_pem().display(),
        ),
    )
    .unwrap();
    // `ngrok start agent-api --config config.yml`, run where the
    // certificates are, so the seed's relative file names resolve.
    let mut agent = Spawned::spawn(
        Command::new(binary("postern"))
            .args(["start", "agent-api", "--config", "config.yml"])
            .current_dir(dir.path()),
    );
    agent.wait_for_line(API_DOMAIN, 20).await;

    let api = |method: &str, path: &str, body: Option<Value>| {
        let mut args = vec![
            "--cacert".to_string(),
            edge.ca_pem().display().to_string(),
            "--resolve".into(),
            edge.resolve(API_DOMAIN),
            "-H".into(),
            "Content-Type: application/json".into(),
            "-X".into(),
            method.into(),
            edge.https_url(API_DOMAIN, path),
        ];
        if let Some(body) = body {
            args.extend(["-d".into(), body.to_string()]);
        }
        let dir = dir.path().to_path_buf();
        async move { in_dir(&dir, &args).await }
    };
    let start = |crt: &str, key: &str| {
        json!({
            "name": "passthrough", "proto": "tls", "terminate_at": terminate_at,
            "addr": service.port().to_string(), "domain": SERVICE_DOMAIN,
            "mutual_tls_cas": "ca-crt.pem", "crt": crt, "key": key,
        })
    };

    // The variant the seed prints: the client's certificate with the
    // server's key. Refused, naming both files, and nothing is left behind.
    let (code, body, err) = api(
        "POST",
        "/api/tunnels",
        Some(start("client-crt.pem", "server-key.pem")),
    )
    .await;
    assert_eq!(code, "400", "{body} {err}");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    let message = refusal["details"]["err"].as_str().unwrap();
    assert!(
        message.contains(
            "the private key in server-key.pem does not belong to the certificate in client-crt.pem"
        ),
        "{message}"
    );
    assert!(
        !message.contains("Other(") && !message.contains("UnsupportedCertVersion"),
        "{message}"
    );
    let (_, list, _) = api("GET", "/api/tunnels", None).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agent-api"], "the refused tunnel left nothing");

    // The seed's files as they belong together.
    let (code, body, err) = api(
        "POST",
        "/api/tunnels",
        Some(start("server-crt.pem", "server-key.pem")),
    )
    .await;
    assert_eq!(code, "201", "{body} {err}");
    let tunnel: Value = serde_json::from_str(&body).unwrap();
    assert!(
        tunnel["public_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("tls://{SERVICE_DOMAIN}")),
        "{tunnel}"
    );

    // The seed's access command. Its server certificate carries the CA's
    // own subject, so curl takes it for self-signed, as the seed warns;
    // the handshake itself presented the seed's v1 certificate.
    let access = |extra: &[&str]| {
        let mut args = vec![
            "--cacert".to_string(),
            "ca-crt.pem".into(),
            "--cert".into(),
            "client-crt.pem".into(),
            "--key".into(),
            "client-key.pem".into(),
            "--resolve".into(),
            edge.resolve(SERVICE_DOMAIN),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(edge.https_url(SERVICE_DOMAIN, "/orders"));
        let dir = dir.path().to_path_buf();
        async move { in_dir(&dir, &args).await }
    };
    let (_, _, err) = access(&[]).await;
    assert!(err.contains("self-signed certificate"), "{err}");
    // What the seed does next (Postman, which does not check the server):
    // with the client certificate the answer comes from the site's API.
    let (code, body, err) = access(&["--insecure"]).await;
    assert_eq!(code, "200", "{err}");
    assert_eq!(body, "hello from upstream");
    assert_eq!(service.last("/orders").method, "GET");
    let presented = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {SERVICE_DOMAIN} \
             -cert client-crt.pem -key client-key.pem </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256; \
             openssl x509 -noout -fingerprint -sha256 -in server-crt.pem",
            port = edge.addrs.https.port()
        ))
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let fingerprints = String::from_utf8_lossy(&presented.stdout);
    let lines: Vec<&str> = fingerprints.lines().collect();
    assert_eq!(lines.len(), 2, "{fingerprints}");
    assert_eq!(
        lines[0], lines[1],
        "the seed's server certificate is served"
    );

    // Without the client certificate there is no service.
    let no_cert = in_dir(
        dir.path(),
        &[
            "--insecure".to_string(),
            "--resolve".into(),
            edge.resolve(SERVICE_DOMAIN),
            edge.https_url(SERVICE_DOMAIN, "/orders"),
        ],
    )
    .await;
    assert_ne!(no_cert.0, "200", "{no_cert:?}");
    agent.terminate().await;
}

/// curl run in `dir`, for the seed's relative file names: `(status, body,
/// stderr)`.
async fn in_dir(dir: &Path, args: &[String]) -> (String, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.to_string(),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
