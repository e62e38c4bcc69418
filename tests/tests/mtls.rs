//! Mutual TLS end to end: the seed's own openssl PKI and curl command, bad
//! client certificates, the no-SNI and SNI/Host cases, the certificate
//! authority store on the admin API, mTLS at the agent, and client
//! certificates from the agent to its upstream.

use std::{path::Path, process::Output};

use postern_tests::{
    API_KEY, HttpUpstream, TempDir, TestCa, TestEdge, TlsUpstream, curl, openssl_s_client,
    seed_001_certificates,
};
use tokio::process::Command;

const DOMAIN: &str = "app.customer1.example.test";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_lowercase()
}

#[tokio::test]
async fn the_seed_scripts_certificates_and_curl_command_work_end_to_end() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let pki = TempDir::new("seed-pki");
    seed_001_certificates(pki.path(), "*.customer1.example.test", "testpass").await;
    let ca = pki.path().join("ca-crt.pem");
    let version = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(pki.path().join("client-crt.pem"))
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("Version: 1 (0x0)"),
        "the script makes X.509 v1 client certificates on this machine"
    );
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {DOMAIN}\n    mutual_tls_cas: {}\n",
        upstream.port(),
        ca.display()
    );
    let (_agent, _) = edge.agent(&tunnel).await;

    let client = (
        pki.path().join("client-crt.pem"),
        pki.path().join("client-key.pem"),
    );
    let ok = edge
        .curl_mtls(
            DOMAIN,
            Some((&client.0, &client.1)),
            &[
                "-H",
                "Ngrok-Mtls-Subject-Cn: admin",
                "-H",
                "ngrok_mtls_subject_cn: admin",
            ],
        )
        .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let seen = upstream.last("/echo");
    let serial = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&client.0)
        .output()
        .await
        .unwrap();
    let serial = String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string();
    assert_eq!(
        seen.headers["ngrok-mtls-subject-cn"],
        "*.customer1.example.test"
    );
    assert_eq!(seen.headers["ngrok-mtls-serial-number"], serial.as_str());
    assert_eq!(
        seen.headers["ngrok-mtls-subject-alt-name-dns"], "",
        "a v1 certificate has no SANs"
    );
    assert_eq!(seen.headers["ngrok-mtls-email-addresses"], "");
    assert_eq!(
        seen.headers.get_all("ngrok-mtls-subject-cn").iter().count(),
        1,
        "the spoofed values never reach the upstream"
    );
    assert!(!seen.headers.contains_key("ngrok_mtls_subject_cn"));

    // No client certificate: the handshake fails with an alert.
    let refused = openssl_s_client(
        edge.addrs.https,
        &[
            "-servername",
            DOMAIN,
            "-CAfile",
            edge.ca_pem().to_str().unwrap(),
        ],
        b"GET / HTTP/1.1\r\nHost: app.customer1.example.test\r\n\r\n",
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    )
    .to_lowercase();
    assert!(
        text.contains("alert certificate required") || text.contains("alert number 116"),
        "{text}"
    );
    assert!(!text.contains("hello from upstream"));
}

#[tokio::test]
async fn bad_client_certificates_are_refused_in_the_handshake_and_chains_work() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("bad-certs");
    let root = TestCa::root("Good Root");
    let other = TestCa::root("Other Root");
    let intermediate = root.intermediate("Good Intermediate");
    let cas = dir.path().join("cas.pem");
    std::fs::write(&cas, &root.pem).unwrap();
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {DOMAIN}\n    mutual_tls_cas: {}\n",
        upstream.port(),
        cas.display()
    );
    let (_agent, _) = edge.agent(&tunnel).await;

    let good = root.client(
        "alice",
        &["alice.example.test", "a2.example.test"],
        &["alice@example.test"],
        (-1, 30),
    );
    let (cert, key) = good.write(dir.path(), "good", &[]);
    let ok = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let seen = upstream.last("/echo");
    assert_eq!(seen.headers["ngrok-mtls-subject-cn"], "alice");
    assert_eq!(
        seen.headers["ngrok-mtls-subject-alt-name-dns"],
        "alice.example.test, a2.example.test"
    );
    assert_eq!(
        seen.headers["ngrok-mtls-email-addresses"],
        "alice@example.test"
    );
    assert_eq!(seen.headers["ngrok-mtls-serial-number"], "0A1B2C3D");

    let chained = intermediate.client("bob", &[], &[], (-1, 30));
    let (cert, key) = chained.write(dir.path(), "chained", &[&intermediate.pem]);
    let ok = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
    assert!(
        ok.status.success(),
        "an intermediate sent by the client chains: {}",
        stderr(&ok)
    );
    assert_eq!(
        upstream.last("/echo").headers["ngrok-mtls-subject-cn"],
        "bob"
    );

    let cases: Vec<(&str, postern_tests::Issued, &[&str])> = vec![
        (
            "expired",
            root.client("old", &[], &[], (-30, -1)),
            &["expired"],
        ),
        (
            "not yet valid",
            root.client("early", &[], &[], (1, 30)),
            &["expired", "bad certificate"],
        ),
        (
            "wrong CA",
            other.client("eve", &[], &[], (-1, 30)),
            &["unknown ca"],
        ),
        (
            "intermediate not sent",
            intermediate.client("carol", &[], &[], (-1, 30)),
            &["unknown ca"],
        ),
    ];
    let before = upstream.requests().len();
    for (what, issued, alerts) in cases {
        let (cert, key) = issued.write(dir.path(), "bad", &[]);
        let out = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{what} was accepted");
        assert!(alerts.iter().any(|a| err.contains(a)), "{what}: {err}");
    }
    // The CA itself presented as the client's certificate.
    let ca_cert = dir.path().join("ca-as-leaf.pem");
    let ca_key = dir.path().join("ca-as-leaf-key.pem");
    std::fs::write(&ca_cert, &root.pem).unwrap();
    std::fs::write(&ca_key, &root.key_pem).unwrap();
    let out = edge.curl_mtls(DOMAIN, Some((&ca_cert, &ca_key)), &[]).await;
    assert!(!out.status.success(), "a CA used as a leaf was accepted");
    assert!(stderr(&out).contains("bad certificate"), "{}", stderr(&out));
    let none = edge.curl_mtls(DOMAIN, None, &[]).await;
    assert!(!none.status.success());
    assert!(
        stderr(&none).contains("certificate required"),
        "{}",
        stderr(&none)
    );
    assert_eq!(
        upstream.requests().len(),
        before,
        "no refused client reached the upstream"
    );
    assert!(edge.stat("tls_handshake_failed") >= 6);
}

#[tokio::test]
async fn bundles_with_a_non_ca_or_too_many_cas_are_refused_at_bind() {
    let edge = TestEdge::start().await;
    let dir = TempDir::new("bundles");
    let root = TestCa::root("Fine CA");
    let leaf = root.client("not-a-ca", &[], &[], (-1, 30));
    let mixed = dir.path().join("mixed.pem");
    std::fs::write(&mixed, format!("{}{}", root.pem, leaf.cert_pem)).unwrap();
    let tunnel = |path: &Path| {
        format!(
            "  web:\n    proto: http\n    addr: 1\n    domain: {DOMAIN}\n    mutual_tls_cas: {}\n",
            path.display()
        )
    };
    let err = edge
        .agent_with(&edge.token, &tunnel(&mixed))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_1696"), "{err}");
    assert!(
        err.contains("CN=not-a-ca") && err.contains("SHA-256"),
        "names the certificate: {err}"
    );

    let eleven = dir.path().join("eleven.pem");
    let pems: String = (0..11)
        .map(|i| TestCa::root(&format!("CA {i}")).pem)
        .collect();
    std::fs::write(&eleven, pems).unwrap();
    let err = edge
        .agent_with(&edge.token, &tunnel(&eleven))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_1675"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no pem here\n").unwrap();
    let err = edge
        .agent_with(&edge.token, &tunnel(&empty))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ERR_POSTERN_1695"), "{err}");
}

#[tokio::test]
async fn without_sni_the_mtls_decision_is_made_per_request_and_host_must_match_sni() {
    let edge = TestEdge::start().await;
    let secure = HttpUpstream::start().await;
    let open = HttpUpstream::start().await;
    let dir = TempDir::new("nosni");
    let root = TestCa::root("No SNI Root");
    let cas = dir.path().join("cas.pem");
    std::fs::write(&cas, &root.pem).unwrap();
    let tunnels = format!(
        "  secure:\n    proto: http\n    addr: {}\n    domain: {DOMAIN}\n    mutual_tls_cas: {}\n\
         \x20 open:\n    proto: http\n    addr: {}\n    domain: open.example.test\n",
        secure.port(),
        cas.display(),
        open.port()
    );
    let (_agent, _) = edge.agent(&tunnels).await;
    let request = format!("GET /echo HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
    let no_sni = openssl_s_client(
        edge.addrs.https,
        &["-noservername", "-quiet"],
        request.as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&no_sni.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 403"), "{text}");
    assert!(text.contains("err_postern_9007"), "{text}");

    let good = root.client("nosni-client", &[], &[], (-1, 30));
    let (cert, key) = good.write(dir.path(), "client", &[]);
    let with_cert = openssl_s_client(
        edge.addrs.https,
        &[
            "-noservername",
            "-quiet",
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ],
        request.as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&with_cert.stdout).to_lowercase();
    assert!(
        text.starts_with("http/1.1 200"),
        "a valid certificate passes without SNI: {text}"
    );
    assert_eq!(
        secure.last("/echo").headers["ngrok-mtls-subject-cn"],
        "nosni-client"
    );

    // Handshake as the open endpoint, then ask for the mTLS one.
    let fronted = curl(&[
        "-i",
        "--http1.1",
        "--cacert",
        edge.ca_pem().to_str().unwrap(),
        "--resolve",
        &edge.resolve("open.example.test"),
        "-H",
        &format!("Host: {DOMAIN}"),
        &edge.https_url("open.example.test", "/fronted"),
    ])
    .await;
    let text = String::from_utf8_lossy(&fronted.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 421"), "{text}");
    assert!(secure.requests().iter().all(|r| r.path != "/fronted"));
}

#[tokio::test]
async fn the_certificate_authority_store_api() {
    let mut edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let root = TestCa::root("Store Root");
    let other = TestCa::root("Second Root");

    let (status, body) = edge
        .api("GET", "/certificate_authorities", None, "wrong-key")
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error_code"], "ERR_POSTERN_9401");

    let (status, created) = edge
        .api(
            "POST",
            "/certificate_authorities",
            Some(("Content-Type: application/x-pem-file", &root.pem)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let fingerprint = created["fingerprint"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        id,
        format!("ca_{fingerprint}"),
        "the id comes from the SHA-256 fingerprint"
    );
    assert_eq!(created["subject_common_name"], "Store Root");
    assert_eq!(
        created["key_usages"],
        serde_json::json!(["cert_sign", "crl_sign"])
    );
    assert!(
        created.get("ca_pem").is_none(),
        "the raw certificate is not sent back"
    );

    let json = serde_json::json!({ "ca_pem": other.pem, "description": "second" }).to_string();
    let (status, second) = edge
        .api(
            "POST",
            "/certificate_authorities",
            Some(("Content-Type: application/json", &json)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201);
    let second_id = second["id"].as_str().unwrap().to_string();
    assert_eq!(second["description"], "second");

    let (_, list) = edge
        .api("GET", "/certificate_authorities", None, API_KEY)
        .await;
    assert_eq!(list["certificate_authorities"].as_array().unwrap().len(), 2);
    let (status, one) = edge.ca("GET", &id).await;
    assert_eq!(status, 200);
    assert_eq!(one["id"], id.as_str());
    let (_, many) = edge
        .api(
            "GET",
            &format!("/certificate_authorities/{id},{second_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(many["certificate_authorities"].as_array().unwrap().len(), 2);

    let leaf = root.client("leaf", &[], &[], (-1, 30));
    let (status, refused) = edge
        .api(
            "POST",
            "/certificate_authorities",
            Some(("Content-Type: text/plain", &leaf.cert_pem)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(refused["error_code"], "ERR_POSTERN_1696");
    assert!(
        refused["msg"].as_str().unwrap().contains("CN=leaf"),
        "{refused}"
    );

    // An endpoint that references the CA by id.
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {DOMAIN}\n    mutual_tls_cas: [{id}]\n",
        upstream.port()
    );
    let (agent, _) = edge.agent(&tunnel).await;
    let dir = TempDir::new("store");
    let (cert, key) = root
        .client("by-id", &[], &[], (-1, 30))
        .write(dir.path(), "client", &[]);
    let ok = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Survives a restart of the node.
    agent.shutdown().await.unwrap();
    edge.restart().await;
    let (_, list) = edge
        .api("GET", "/certificate_authorities", None, API_KEY)
        .await;
    assert_eq!(
        list["certificate_authorities"].as_array().unwrap().len(),
        2,
        "the store persists"
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    assert!(
        edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[])
            .await
            .status
            .success()
    );

    // Deleting the CA takes effect for the next handshake, no restart.
    let (status, _) = edge.ca("DELETE", &id).await;
    assert_eq!(status, 204);
    let out = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
    assert!(
        !out.status.success(),
        "the deleted CA no longer admits its clients"
    );
    let (status, _) = edge.ca("GET", &id).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn mutual_tls_at_the_agent_for_a_tls_endpoint() {
    let edge = TestEdge::start().await;
    let upstream = HttpUpstream::start().await;
    let dir = TempDir::new("agent-mtls");
    let server_ca = TestCa::root("Agent Server CA");
    let client_ca = TestCa::root("Agent Client CA");
    let (crt, key) =
        server_ca
            .server(&["tls.customer1.example.test"])
            .write(dir.path(), "server", &[]);
    let cas = dir.path().join("client-cas.pem");
    std::fs::write(&cas, &client_ca.pem).unwrap();
    let tunnel = format!(
        "  t:\n    proto: tls\n    addr: {}\n    domain: tls.customer1.example.test\n    terminate_at: agent\n    crt: {}\n    key: {}\n    mutual_tls_cas: {}\n",
        upstream.port(),
        crt.display(),
        key.display(),
        cas.display()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let server_ca_file = dir.path().join("server-ca.pem");
    std::fs::write(&server_ca_file, &server_ca.pem).unwrap();
    let (ccert, ckey) =
        client_ca
            .client("agent-client", &[], &[], (-1, 30))
            .write(dir.path(), "client", &[]);
    let resolve = edge.resolve("tls.customer1.example.test");
    let url = edge.https_url("tls.customer1.example.test", "/at-agent");
    let base = [
        "--cacert",
        server_ca_file.to_str().unwrap(),
        "--resolve",
        &resolve,
    ];
    let ok = curl(
        &[
            &base[..],
            &[
                "--cert",
                ccert.to_str().unwrap(),
                "--key",
                ckey.to_str().unwrap(),
                &url,
            ],
        ]
        .concat(),
    )
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "hello from upstream");
    let refused = curl(&[&base[..], &[url.as_str()]].concat()).await;
    assert!(
        !refused.status.success(),
        "the agent requires the client certificate"
    );
    assert!(
        upstream
            .requests()
            .iter()
            .filter(|r| r.path == "/at-agent")
            .count()
            == 1
    );
}

#[tokio::test]
async fn the_agent_presents_a_client_certificate_to_its_upstream() {
    let edge = TestEdge::start().await;
    let dir = TempDir::new("upstream-mtls");
    let upstream_client_ca = TestCa::root("Upstream Client CA");
    let upstream =
        TlsUpstream::start_requiring_client_cert(&["localhost"], &upstream_client_ca.pem).await;
    let (crt, key) = upstream_client_ca
        .client("postern-agent", &[], &[], (-1, 30))
        .write(dir.path(), "agent", &[]);
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &upstream.ca_pem).unwrap();
    let port = upstream.addr.port();
    let tunnels = format!(
        "  with:\n    proto: http\n    addr: https://localhost:{port}\n    domain: with.example.test\n\
         \x20 without:\n    proto: http\n    addr: https://localhost:{port}\n    domain: without.example.test\n"
    );
    // upstream_tls applies to localhost:<port>; a second agent has none.
    let yaml = edge.agent_yaml(&edge.token, &tunnels);
    let yaml = yaml.replacen(
        "tunnels:\n",
        &format!(
            "upstream_tls:\n  \"localhost:{port}\":\n    crt: {}\n    key: {}\n    ca: {}\ntunnels:\n",
            crt.display(),
            key.display(),
            upstream_ca.display()
        ),
        1,
    );
    let config = postern_agent::parse_raw(serde_yaml_ng::from_str(&yaml).unwrap())
        .unwrap()
        .validate(None)
        .unwrap();
    let agent = postern_agent::Agent::start(config);
    let mut status = agent.status();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        status.wait_for(|s| s.online),
    )
    .await
    .unwrap()
    .unwrap();
    let client = postern_tests::HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let r = client.get("with.example.test", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "tls-upstream localhost client=postern-agent");
    agent.shutdown().await.unwrap();

    let tunnel = format!(
        "  plain:\n    proto: http\n    addr: https://localhost:{port}\n    domain: plain.example.test\n    upstream_tls_verify: false\n"
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let r = client.get("plain.example.test", "/").await.unwrap();
    assert_eq!(
        r.status, 502,
        "without a client certificate the upstream refuses the agent"
    );
}

#[tokio::test]
async fn an_edge_policy_requires_client_certificates_whatever_the_agent_asks() {
    let root = TestCa::root("Policy Root");
    let id = format!(
        "ca_{}",
        postern_net::parse_ca_bundle(root.pem.as_bytes()).unwrap()[0].fingerprint
    );
    let edge = TestEdge::start_with(&format!(
        "[[endpoint_policies]]\ndomain = \"*.customer1.example.test\"\nmutual_tls_cas = [\"{id}\"]\n"
    ))
    .await;
    let upstream = HttpUpstream::start().await;
    let (status, _) = edge
        .api(
            "POST",
            "/certificate_authorities",
            Some(("Content-Type: text/plain", &root.pem)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201);
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {DOMAIN}\n",
        upstream.port()
    );
    let (_agent, _) = edge.agent(&tunnel).await;
    let none = edge.curl_mtls(DOMAIN, None, &[]).await;
    assert!(
        !none.status.success(),
        "the policy applies though the agent asked for no mTLS"
    );
    let dir = TempDir::new("policy");
    let (cert, key) = root
        .client("policy-client", &[], &[], (-1, 30))
        .write(dir.path(), "c", &[]);
    let ok = edge.curl_mtls(DOMAIN, Some((&cert, &key)), &[]).await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(
        upstream.last("/echo").headers["ngrok-mtls-subject-cn"],
        "policy-client"
    );
}
