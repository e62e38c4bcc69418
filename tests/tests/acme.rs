//! Certificates from an ACME CA: a real edge (a cluster of one, where
//! reserved domains live) against real Pebble, Let's Encrypt's test CA,
//! which resolves every name to 127.0.0.1 through pebble-challtestsrv and
//! validates HTTP-01 on the edge's plain-HTTP listener, or TLS-ALPN-01 on
//! its HTTPS listener. curl and openssl check what the edge serves
//! against Pebble's root. Also here: certificates uploaded through
//! `/tls_certificates`, and `[[tls.certificates]]` files reloaded on
//! SIGHUP by the real binary.

use std::{net::SocketAddr, path::Path, time::Duration};

use postern_tests::{
    API_KEY, HttpUpstream, HttpsClient, Pebble, TempDir, TestCa, TestEdge, acme_toml,
    cluster::{NODES, Run, TestCluster, cluster_toml},
    curl, eventually, free_port, served_serial,
};
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

const JSON: &str = "Content-Type: application/json";

/// A `[cluster]` table for a cluster of one, which holds the cluster's
/// config (and may order) a second after it starts, having no peer to
/// catch up with.
fn cluster_of_one() -> String {
    let gossip = SocketAddr::from(([127, 0, 0, 1], postern_tests::cluster::udp_port()));
    let table = cluster_toml(
        &format!("acme-{}", postern_net::random_label()),
        &[gossip],
        0,
    );
    format!("{table}catch_up_timeout = \"1s\"\n")
}

/// The config of a node in a cluster of one ordering from `pebble`, with
/// more `[acme]` keys.
fn acme_node_toml(pebble: &Pebble, keys: &str) -> String {
    format!("{}{keys}\n{}", acme_toml(pebble, "1s"), cluster_of_one())
}

/// The object at `/<path>/<id of object>` shows an issued certificate with
/// its renewal planned and no job running.
async fn assert_issued(edge: &TestEdge, path: &str, object: &Value) {
    let id = object["id"].as_str().unwrap();
    let (_, shown) = edge
        .api("GET", &format!("/{path}/{id}"), None, API_KEY)
        .await;
    let status = &shown["certificate_management_status"];
    assert!(status["renews_at"].is_string(), "{shown}");
    assert_eq!(status["provisioning_job"], Value::Null, "{shown}");
}

/// A node in a cluster of one, ordering from `pebble`.
async fn edge_with_acme(pebble: &Pebble) -> TestEdge {
    TestEdge::start_node("edge-acme-1", "us", &acme_node_toml(pebble, "")).await
}

fn http_tunnels(port: u16, names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!("  t{i}:\n    proto: http\n    addr: {port}\n    domain: {name}\n")
        })
        .collect()
}

async fn reserve(edge: &TestEdge, body: &str) -> Value {
    let (status, reserved) = edge
        .api("POST", "/reserved_domains", Some((JSON, body)), API_KEY)
        .await;
    assert_eq!(status, 201, "{body}: {reserved}");
    reserved
}

/// Waits until curl, trusting only `root`, gets the upstream's answer
/// for `name` from the edge.
async fn wait_trusted(edge: &TestEdge, name: &str, root: &Path, secs: u64) {
    let what = format!("curl trusts {name} with {}", root.display());
    eventually(secs, &what, || async move {
        curl_trusting(edge, name, root)
            .await
            .is_ok_and(|body| body.contains("hello from upstream"))
    })
    .await;
}

/// An upstream, an agent serving it on `name`, and `name` reserved with
/// a certificate policy (ngrok's defaults).
async fn managed(edge: &TestEdge, name: &str) -> (HttpUpstream, postern_agent::Agent, Value) {
    let upstream = HttpUpstream::start().await;
    let (agent, _) = edge.agent(&http_tunnels(upstream.port(), &[name])).await;
    let body = format!(
        r#"{{"domain": "{name}", "certificate_management_policy": {{"authority": "letsencrypt"}}}}"#
    );
    let reserved = reserve(edge, &body).await;
    (upstream, agent, reserved)
}

/// curl's answer for `https://<name>/` at the edge, trusting only `root`.
async fn curl_trusting(edge: &TestEdge, name: &str, root: &Path) -> Result<String, String> {
    let root = root.display().to_string();
    let resolve = edge.resolve(name);
    let url = edge.https_url(name, "/");
    let out = curl(&["-f", "--cacert", &root, "--resolve", &resolve, &url]).await;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reserved_domain_with_a_policy_gets_a_certificate_curl_trusts() {
    let mut pebble = Pebble::prepare().await;
    let mut edge = edge_with_acme(&pebble).await;
    let (http, https) = (edge.addrs.http.unwrap(), edge.addrs.https);
    pebble.start(http.port(), https.port(), None).await;
    let upstream = HttpUpstream::start().await;
    let names = [
        "app.acme.test",
        "rsa.acme.test",
        "plain.acme.test",
        "other.acme.test",
    ];
    let (_agent, _) = edge.agent(&http_tunnels(upstream.port(), &names)).await;

    // Bad policies: 400 naming the field; no order.
    for (body, field) in [
        (
            r#"{"domain": "bad.acme.test", "certificate_management_policy": {"private_key_type": "dsa"}}"#,
            "certificate_management_policy.private_key_type",
        ),
        (
            r#"{"domain": "bad.acme.test", "certificate_management_policy": {"authority": "zerossl"}}"#,
            "certificate_management_policy.authority",
        ),
        (
            r#"{"domain": "*.wild.acme.test", "certificate_management_policy": {}}"#,
            "certificate_management_policy",
        ),
        (
            r#"{"domain": "bad.acme.test", "certificate_management_policy": {"authorty": "letsencrypt"}}"#,
            "authorty",
        ),
    ] {
        let (status, error) = edge
            .api("POST", "/reserved_domains", Some((JSON, body)), API_KEY)
            .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(
            error["msg"].as_str().unwrap_or_default().contains(field),
            "{body}: {error}"
        );
    }

    let app = reserve(
        &edge,
        r#"{"domain": "app.acme.test", "certificate_management_policy": {"authority": "letsencrypt", "private_key_type": "ecdsa"}}"#,
    )
    .await;
    assert_eq!(
        app["certificate_management_policy"],
        serde_json::json!({"authority": "letsencrypt", "private_key_type": "ecdsa"})
    );
    reserve(
        &edge,
        r#"{"domain": "rsa.acme.test", "certificate_management_policy": {"private_key_type": "rsa"}}"#,
    )
    .await;
    let plain = reserve(&edge, r#"{"domain": "plain.acme.test"}"#).await;
    assert_eq!(plain["certificate_management_policy"], Value::Null);
    assert_eq!(plain["certificate_management_status"], Value::Null);

    let root = pebble.root("pebble-root.pem").await;
    wait_trusted(&edge, "app.acme.test", &root, 90).await;
    wait_trusted(&edge, "rsa.acme.test", &root, 90).await;
    let rsa_chain = std::fs::read(edge.dir.path().join("acme").join("rsa.acme.test.pem")).unwrap();
    let rsa_leaf = rustls::pki_types::CertificateDer::from_pem_slice(&rsa_chain).unwrap();
    let (_, rsa_leaf) = x509_parser::parse_x509_certificate(rsa_leaf.as_ref()).unwrap();
    assert!(
        matches!(
            rsa_leaf.public_key().parsed(),
            Ok(x509_parser::public_key::PublicKey::RSA(_))
        ),
        "private_key_type rsa makes an RSA certificate"
    );

    assert_issued(&edge, "reserved_domains", &app).await;

    // Names nothing manages (reserved without a policy, or not reserved)
    // are served, from the dev CA here, and never ordered: visitors cannot
    // make the edge order.
    for name in ["plain.acme.test", "other.acme.test"] {
        let resolve = edge.resolve(name);
        let url = edge.https_url(name, "/");
        let out = curl(&["-fk", "--resolve", &resolve, &url]).await;
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(
            curl_trusting(&edge, name, &root).await.is_err(),
            "{name} has no Pebble certificate"
        );
        let challenge = format!("http://{http}/.well-known/acme-challenge/anything");
        let host = format!("Host: {name}");
        curl(&["-H", &host, &challenge]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(edge.stat("acme_orders_issued"), 2);
    assert_eq!(edge.stat("acme_orders_failed"), 0);
    let log = pebble.log().join("\n");
    assert!(
        log.contains("app.acme.test"),
        "Pebble's log names its orders: {log}"
    );
    for name in ["plain.acme.test", "other.acme.test"] {
        assert!(!log.contains(name), "{name} was ordered: {log}");
    }

    // A restart serves the certificate from the data directory, with the
    // CA down and no order.
    pebble.stop().await;
    edge.restart().await;
    wait_trusted(&edge, "app.acme.test", &root, 30).await;
    assert_eq!(edge.stat("acme_orders_issued"), 0);
    assert_eq!(edge.stat("acme_orders_failed"), 0);
    edge.stop().await;
}

/// The serial of a certificate for app.renew.test that verifies against
/// `root` and is not `not`, within a minute.
async fn wait_for_serial(https: SocketAddr, root: &Path, not: &str) -> String {
    wait_for_serial_of(https, "app.renew.test", root, not).await
}

/// The serial of a certificate for `name` that verifies against `root`
/// and is not `not`, within a minute.
async fn wait_for_serial_of(https: SocketAddr, name: &str, root: &Path, not: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (serial, verified) = served_serial(https, name, root).await;
        if verified && serial != not {
            return serial;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no verified certificate other than {not:?} within 60 s (serving {serial:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_at_two_thirds_and_the_old_certificate_stays_when_the_ca_is_down() {
    let mut pebble = Pebble::prepare().await;
    let mut edge = edge_with_acme(&pebble).await;
    let (http, https) = (edge.addrs.http.unwrap(), edge.addrs.https);
    // 30 s certificates: renewed 20 s into their life.
    pebble
        .start(http.port(), https.port(), Some(Duration::from_secs(30)))
        .await;
    let (_upstream, _agent, reserved) = managed(&edge, "app.renew.test").await;
    let path = format!("/reserved_domains/{}", reserved["id"].as_str().unwrap());
    let root = pebble.root("pebble-root.pem").await;

    let first = wait_for_serial(https, &root, "").await;
    let issued_at = std::time::Instant::now();
    // A visitor connected under the first certificate, kept alive.
    let kept = HttpsClient::new(https, &root)
        .connect("app.renew.test")
        .await
        .expect("a TLS connection under the first certificate");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, String>(hyper_util::rt::TokioIo::new(kept))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = || {
        http::Request::get("/")
            .header("host", "app.renew.test")
            .body(String::new())
            .unwrap()
    };
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
    let second = wait_for_serial(https, &root, &first).await;
    let renewed_after = issued_at.elapsed();
    assert!(
        renewed_after >= Duration::from_secs(12),
        "renewed at two thirds of 30 s, not at once: {renewed_after:?}"
    );
    let after = sender.send_request(get()).await;
    assert_eq!(
        after
            .expect("the connection made before the renewal goes on")
            .status(),
        200
    );
    assert_eq!(edge.stat("acme_orders_issued"), 2);

    // The CA goes down: the next renewal fails, is retried with back-off
    // and reported, and the certificate served stays served.
    pebble.stop().await;
    eventually(40, "the failed renewal is reported", || {
        let (edge, path) = (&edge, &path);
        async move {
            let (_, shown) = edge.api("GET", path, None, API_KEY).await;
            let job = &shown["certificate_management_status"]["provisioning_job"];
            edge.stat("acme_orders_failed") >= 1
                && job["msg"].is_string()
                && job["retries_at"].is_string()
        }
    })
    .await;
    let (serial, verified) = served_serial(https, "app.renew.test", &root).await;
    assert_eq!(serial, second, "the old certificate stays served");
    assert!(verified, "and still verifies");
    let metrics = curl(&[&format!("http://{}/metrics", edge.addrs.metrics.unwrap())]).await;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("postern_acme_orders_total{result=\"failed\"}")
            && metrics.contains("postern_acme_names_failing 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("postern_acme_orders_total{result=\"failed\"} 0"),
        "{metrics}"
    );
    edge.stop().await;
}

/// A DNS-01 hook in lego's `exec` form that publishes and withdraws TXT
/// records at pebble-challtestsrv, logging each call to `<dir>/hook.log`,
/// and fails (a message on stderr) for records under `fail.`.
fn dns_hook(pebble: &Pebble) -> std::path::PathBuf {
    let dir = pebble.dir.path();
    let (log, api) = (dir.join("hook.log"), pebble.challtest);
    let script = format!(
        r#"#!/bin/sh
echo "$1 $2 $3" >> {log}
case "$2" in *.fail.*) echo "no zone holds $2" >&2; exit 3;; esac
case "$1" in
  present) exec curl -sf -d "{{\"host\":\"$2\",\"value\":\"$3\"}}" http://{api}/set-txt ;;
  cleanup) exec curl -sf -d "{{\"host\":\"$2\"}}" http://{api}/clear-txt ;;
esac
exit 2
"#,
        log = log.display()
    );
    let path = dir.join("dns-hook.sh");
    std::fs::write(&path, script).unwrap();
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&path, executable).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wildcard_is_proved_through_the_dns_hook_and_its_failure_reported() {
    let mut pebble = Pebble::prepare().await;
    let hook = dns_hook(&pebble);
    let extra = acme_node_toml(
        &pebble,
        &format!(
            "dns_hook = [\"{}\"]\ndns_hook_wait = \"0s\"",
            hook.display()
        ),
    );
    let mut edge = TestEdge::start_node("edge-acme-dns", "us", &extra).await;
    let (http, https) = (edge.addrs.http.unwrap(), edge.addrs.https);
    pebble.start(http.port(), https.port(), None).await;
    let upstream = HttpUpstream::start().await;
    let names = ["a.wild.acme.test", "b.wild.acme.test", "c.fail.acme.test"];
    let (_agent, _) = edge.agent(&http_tunnels(upstream.port(), &names)).await;
    reserve(
        &edge,
        r#"{"domain": "*.wild.acme.test", "certificate_management_policy": {}}"#,
    )
    .await;
    let failing = reserve(
        &edge,
        r#"{"domain": "*.fail.acme.test", "certificate_management_policy": {}}"#,
    )
    .await;
    let root = pebble.root("pebble-root.pem").await;

    // One wildcard certificate serves every name under it.
    wait_trusted(&edge, "a.wild.acme.test", &root, 60).await;
    wait_trusted(&edge, "b.wild.acme.test", &root, 10).await;
    let (a, _) = served_serial(https, "a.wild.acme.test", &root).await;
    let (b, _) = served_serial(https, "b.wild.acme.test", &root).await;
    assert_eq!(a, b, "one certificate for *.wild.acme.test");

    // The hook published the record under the base name and withdrew it.
    let log = pebble.dir.path().join("hook.log");
    eventually(10, "the hook withdraws the record", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("present _acme-challenge.wild.acme.test. ")
                && text.contains("cleanup _acme-challenge.wild.acme.test. ")
        }
    })
    .await;

    // A hook that fails: the order fails, naming the hook, the record and
    // what the hook said.
    let path = format!("/reserved_domains/{}", failing["id"].as_str().unwrap());
    eventually(30, "the hook's failure is reported", || {
        let (edge, path) = (&edge, &path);
        async move {
            let (_, shown) = edge.api("GET", path, None, API_KEY).await;
            let msg = shown["certificate_management_status"]["provisioning_job"]["msg"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            msg.contains("the DNS hook (present _acme-challenge.fail.acme.test.) failed")
                && msg.contains("no zone holds _acme-challenge.fail.acme.test.")
        }
    })
    .await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_alpn_01_on_the_https_listener_with_plain_http_off() {
    let mut pebble = Pebble::prepare().await;
    let extra = acme_node_toml(&pebble, "challenge = \"tls-alpn-01\"");
    let mut edge = TestEdge::start_node_without_http("edge-alpn-1", "us", &extra).await;
    assert!(edge.addrs.http.is_none(), "no plain-HTTP listener");
    // Pebble would try HTTP-01 on a port where nothing listens: only
    // TLS-ALPN-01 on the edge's HTTPS listener can succeed.
    pebble
        .start(free_port(), edge.addrs.https.port(), None)
        .await;
    let (_upstream, _agent, reserved) = managed(&edge, "app.alpn.test").await;
    let root = pebble.root("pebble-root.pem").await;
    wait_trusted(&edge, "app.alpn.test", &root, 90).await;
    assert_eq!(edge.stat("acme_orders_issued"), 1);
    assert_eq!(edge.stat("acme_orders_failed"), 0);
    let log = pebble.log().join("\n");
    assert!(
        log.contains("app.alpn.test") && !log.contains("Attempting to validate w/ HTTP"),
        "Pebble validated app.alpn.test, not by HTTP-01: {log}"
    );

    // The validation certificate is gone once the order is done: an
    // acme-tls/1 handshake now gets the endpoint's certificate.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &edge.addrs.https.to_string()])
        .args(["-servername", "app.alpn.test", "-alpn", "acme-tls/1"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("ALPN protocol: acme-tls/1"), "{text}");

    // The reserved domain names the certificate, and /tls_certificates
    // lists it read-only.
    let (_, shown) = edge
        .api(
            "GET",
            &format!("/reserved_domains/{}", reserved["id"].as_str().unwrap()),
            None,
            API_KEY,
        )
        .await;
    let cert_id = shown["certificate"]["id"].as_str().unwrap().to_string();
    assert_eq!(cert_id, "cert_acme_app.alpn.test", "{shown}");
    let (status, listed) = edge.api("GET", "/tls_certificates", None, API_KEY).await;
    assert_eq!(status, 200, "{listed}");
    let acme = listed["tls_certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == cert_id.as_str())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        acme["subject_alternative_names"]["dns_names"],
        serde_json::json!(["app.alpn.test"])
    );
    assert!(acme["issued_at"].is_string(), "{acme}");
    assert_eq!(acme["private_key_type"], "ecdsa");
    let (status, refused) = edge
        .api(
            "DELETE",
            &format!("/tls_certificates/{cert_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error_code"], "ERR_POSTERN_9406", "{refused}");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_ingress_with_a_policy_serves_agents_a_certificate_of_the_ca() {
    let mut pebble = Pebble::prepare().await;
    let mut edge = edge_with_acme(&pebble).await;
    pebble
        .start(
            edge.addrs.http.unwrap().port(),
            edge.addrs.https.port(),
            None,
        )
        .await;
    let create = |body: &'static str| {
        let edge = &edge;
        async move {
            edge.api("POST", "/agent_ingresses", Some((JSON, body)), API_KEY)
                .await
        }
    };
    let (status, error) = create(
        r#"{"domain": "bad.acme.test", "certificate_management_policy": {"private_key_type": "dsa"}}"#,
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("certificate_management_policy.private_key_type"),
        "{error}"
    );
    let (status, managed) = create(
        r#"{"domain": "connect.acme.test", "certificate_management_policy": {"authority": "letsencrypt", "private_key_type": "ecdsa"}}"#,
    )
    .await;
    assert_eq!(status, 201, "{managed}");
    assert_eq!(
        managed["certificate_management_policy"],
        serde_json::json!({"authority": "letsencrypt", "private_key_type": "ecdsa"})
    );
    assert!(
        managed["certificate_management_status"].is_object(),
        "{managed}"
    );
    let (status, plain) = create(r#"{"domain": "plain.acme.test"}"#).await;
    assert_eq!(status, 201, "{plain}");
    assert_eq!(plain["certificate_management_policy"], Value::Null);
    let derived = edge.dir.path().join("agent-ingress-ca.pem");
    std::fs::write(
        &derived,
        plain["certificate_authority_pem"].as_str().unwrap(),
    )
    .unwrap();

    // The agent listener serves this region's name a certificate Pebble's
    // root verifies, instead of the agent-ingress CA's.
    let name = "tunnel.us.connect.acme.test";
    let root = pebble.root("pebble-root.pem").await;
    wait_for_serial_of(edge.addrs.agent, name, &root, "").await;
    let (_, verified) = served_serial(edge.addrs.agent, name, &derived).await;
    assert!(
        !verified,
        "the derived CA's certificate is no longer served"
    );
    // An ingress without a policy keeps the agent-ingress CA's.
    let (_, verified) =
        served_serial(edge.addrs.agent, "tunnel.us.plain.acme.test", &derived).await;
    assert!(
        verified,
        "an ingress without a policy is served by the derived CA"
    );

    // An agent whose only trusted root is Pebble's connects through the
    // name and serves an endpoint.
    let upstream = HttpUpstream::start().await;
    let tunnel = http_tunnels(upstream.port(), &["app.connect-test.test"]);
    let (agent, _) = edge
        .agent_through(&edge.token, name, &root, &tunnel)
        .await
        .unwrap_or_else(|e| panic!("an agent through {name} trusting Pebble: {e:#}"));
    let client = HttpsClient::new(edge.addrs.https, &edge.ca_pem());
    let answer = client.get("app.connect-test.test", "/").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    agent.shutdown().await.unwrap();

    assert_issued(&edge, "agent_ingresses", &managed).await;
    assert_eq!(
        edge.stat("acme_orders_issued"),
        1,
        "one order: connect.acme.test's"
    );
    let log = pebble.log().join("\n");
    assert!(
        !log.contains("plain.acme.test"),
        "ordered without a policy: {log}"
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn names_bound_under_a_wildcard_get_certificates_on_demand_within_the_hourly_limit() {
    let mut pebble = Pebble::prepare().await;
    let extra = acme_node_toml(&pebble, "on_demand = true\non_demand_per_hour = 2");
    let mut edge = TestEdge::start_node("edge-demand-1", "us", &extra).await;
    pebble
        .start(
            edge.addrs.http.unwrap().port(),
            edge.addrs.https.port(),
            None,
        )
        .await;
    let root = pebble.root("pebble-root.pem").await;
    // A policy on a wildcard needs no DNS hook with on_demand: the
    // wildcard itself is not ordered, the names bound under it are.
    reserve(
        &edge,
        r#"{"domain": "*.od.acme.test", "certificate_management_policy": {}}"#,
    )
    .await;
    // A name an uploaded certificate covers is not ordered.
    let ca = TestCa::root("Uploaded test CA");
    let uploaded = ca.server(&["covered.od.acme.test"]);
    let (status, answer) = edge
        .api(
            "POST",
            "/tls_certificates",
            Some((JSON, &upload(&uploaded.cert_pem, &uploaded.key_pem))),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    let upstream = HttpUpstream::start().await;
    let bind = |name: &'static str| {
        let (edge, port) = (&edge, upstream.port());
        async move { edge.agent(&http_tunnels(port, &[name])).await.0 }
    };
    let _covered = bind("covered.od.acme.test").await;
    let _app1 = bind("app1.od.acme.test").await;
    wait_trusted(&edge, "app1.od.acme.test", &root, 60).await;
    let _app2 = bind("app2.od.acme.test").await;
    wait_trusted(&edge, "app2.od.acme.test", &root, 60).await;

    // The third new name within the hour is refused: no order, a
    // metric, and the name is served by what there is (the dev CA here).
    let _app3 = bind("app3.od.acme.test").await;
    eventually(30, "the third name refused", || async {
        metric(&edge, "postern_acme_on_demand_refused_total").await == 1
    })
    .await;
    assert!(
        curl_trusting(&edge, "app3.od.acme.test", &root)
            .await
            .is_err()
    );
    let resolve = edge.resolve("app3.od.acme.test");
    let url = edge.https_url("app3.od.acme.test", "/");
    let out = curl(&["-fk", "--resolve", &resolve, &url]).await;
    assert!(out.status.success(), "app3 is still served: {out:?}");

    // A visitor asking for a name nobody bound causes no order.
    let resolve = edge.resolve("nobody.od.acme.test");
    let url = edge.https_url("nobody.od.acme.test", "/");
    curl(&["-k", "--resolve", &resolve, &url]).await;
    // The readiness signal: a name bound after that handshake has been
    // through the on-demand admission (refused, over the limit), so the
    // handshake had its chance to cause an order too.
    let _app4 = bind("app4.od.acme.test").await;
    eventually(30, "the name bound after the visitor refused", || async {
        metric(&edge, "postern_acme_on_demand_refused_total").await == 2
    })
    .await;
    assert_eq!(
        metric(&edge, "postern_acme_orders_total{result=\"issued\"}").await,
        2,
        "app1 and app2 only"
    );
    assert_eq!(edge.stat("acme_orders_failed"), 0);
    let log = pebble.log().join("\n");
    assert!(log.contains("app1.od.acme.test"), "{log}");
    for name in [
        "covered.od.acme.test",
        "app3.od.acme.test",
        "app4.od.acme.test",
        "nobody.od.acme.test",
        "*.od.acme.test",
    ] {
        assert!(!log.contains(name), "{name} was ordered: {log}");
    }
    edge.stop().await;
}

/// `path` at the nodes `which` of `cluster`; `None` until each has it.
async fn at_nodes(cluster: &TestCluster, which: &[usize], path: &str) -> Option<Vec<Value>> {
    let mut shown = Vec::new();
    for i in which {
        let (status, value) = cluster.nodes[*i].api("GET", path, None, API_KEY).await;
        if status != 200 {
            return None;
        }
        shown.push(value);
    }
    Some(shown)
}

/// The holder of the cluster's lease on a reserved domain, once the nodes
/// `which` name the same one, other than `not`, and have seen it fail an
/// order (the CA is down).
async fn failing_holder(cluster: &TestCluster, which: &[usize], path: &str, not: &str) -> String {
    let holder = std::sync::Mutex::new(String::new());
    eventually(60, "the nodes name the failing lease holder", || {
        let holder = &holder;
        async move {
            let Some(shown) = at_nodes(cluster, which, path).await else {
                return false;
            };
            let status = |s: &Value| s["certificate_management_status"].clone();
            let first = status(&shown[0])["lease"]["holder"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let agreed = !first.is_empty()
                && first != not
                && shown.iter().all(|s| {
                    let status = status(s);
                    status["lease"]["holder"] == first.as_str()
                        && status["provisioning_job"]["failures"].as_u64() >= Some(1)
                });
            *holder.lock().unwrap() = first;
            agreed
        }
    })
    .await;
    holder.into_inner().unwrap()
}

/// A sample of a node's `/metrics`, 0 when absent.
async fn metric(node: &TestEdge, sample: &str) -> u64 {
    node.metrics_text()
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_cluster_orders_once_and_all_three_serve_it() {
    let mut pebble = Pebble::prepare().await;
    let cluster = TestCluster::start_with(&acme_toml(&pebble, "1s")).await;
    let upstream = HttpUpstream::start().await;
    let name = "app.cluster.test";
    let (_agent, _) = cluster.nodes[1]
        .agent(&http_tunnels(upstream.port(), &[name]))
        .await;
    let reserved = reserve(
        &cluster.nodes[2],
        r#"{"domain": "app.cluster.test", "certificate_management_policy": {}}"#,
    )
    .await;
    let path = format!("/reserved_domains/{}", reserved["id"].as_str().unwrap());

    // The CA is down: one node takes the lease and fails; it keeps the
    // lease until its retry, and the others wait instead of ordering.
    let holder = failing_holder(&cluster, &[0, 1, 2], &path, "").await;
    let index = |id: &str| cluster.nodes.iter().position(|n| n.node_id() == id);
    let h = index(&holder).unwrap_or_else(|| panic!("holder {holder:?}"));
    let stat = |name: &str| -> Vec<u64> { cluster.nodes.iter().map(|n| n.stat(name)).collect() };
    let failed = stat("acme_orders_failed");
    assert!(failed[h] >= 1, "{failed:?}");
    assert_eq!(
        failed.iter().sum::<u64>(),
        failed[h],
        "only {holder} ordered: {failed:?}"
    );
    // /metrics at every node names the holder.
    let id = reserved["id"].as_str().unwrap();
    let leased = format!("postern_acme_lease{{reserved_domain=\"{id}\",holder=\"{holder}\"}} 1");
    for node in &cluster.nodes {
        let metrics = node.metrics_text().await;
        assert!(metrics.contains(&leased), "{}: {metrics}", node.node_id());
    }
    assert_eq!(cluster.nodes[h].stat("acme_leases_held"), 1);

    // Every node is on 127.0.0.1 and Pebble validates on one HTTP port:
    // that of a node other than the holder, which thus answers a challenge
    // it did not make.
    let v = (h + 1) % cluster.nodes.len();
    let validating = &cluster.nodes[v];
    pebble
        .start(
            validating.addrs.http.unwrap().port(),
            validating.addrs.https.port(),
            None,
        )
        .await;
    let started = std::time::Instant::now();
    let root = pebble.root("pebble-root.pem").await;
    for node in &cluster.nodes {
        wait_trusted(node, name, &root, 90).await;
    }
    println!(
        "one order: all three nodes serve it {:?} after Pebble started",
        started.elapsed()
    );
    // One certificate, the same at every node.
    let mut serials = Vec::new();
    for node in &cluster.nodes {
        let (serial, verified) = served_serial(node.addrs.https, name, &root).await;
        assert!(verified, "{}", node.node_id());
        serials.push(serial);
    }
    assert!(serials.iter().all(|s| *s == serials[0]), "{serials:?}");

    // Settled: every other node has installed the shared certificate (so
    // none is due for an order before its renewal) and no lease is held.
    eventually(
        20,
        "the others installed the shared certificate",
        || async {
            let received = stat("acme_certificates_received");
            let held = stat("acme_leases_held");
            (0..cluster.nodes.len()).all(|i| i == h || received[i] >= 1)
                && held.iter().all(|n| *n == 0)
        },
    )
    .await;
    let issued = stat("acme_orders_issued");
    let mut once = vec![0; cluster.nodes.len()];
    once[h] = 1;
    assert_eq!(issued, once, "one order in the cluster, by {holder}");
    let failed = stat("acme_orders_failed");
    assert_eq!(failed.iter().sum::<u64>(), failed[h], "{failed:?}");
    let mut received = vec![1; cluster.nodes.len()];
    received[h] = 0;
    assert_eq!(stat("acme_certificates_received"), received);
    assert_eq!(stat("acme_leases_held"), vec![0, 0, 0]);
    let log = pebble.log();
    let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("Added order"), 1, "Pebble saw one order: {log:#?}");
    assert_eq!(count("Issued certificate serial"), 1, "{log:#?}");
    // It validated at the node that did not order.
    let at = format!(
        ":{}/.well-known/acme-challenge/",
        validating.addrs.http.unwrap().port()
    );
    assert!(
        log.iter()
            .any(|l| l.contains("Attempting to validate w/ HTTP") && l.contains(&at)),
        "{log:#?}"
    );

    // Every node's status names the orderer; none holds a lease.
    for shown in at_nodes(&cluster, &[0, 1, 2], &path).await.unwrap() {
        let status = &shown["certificate_management_status"];
        assert_eq!(status["ordered_by"], holder.as_str(), "{shown}");
        assert!(status["renews_at"].is_string(), "{shown}");
        assert_eq!(status["provisioning_job"], Value::Null, "{shown}");
        assert_eq!(status["lease"], Value::Null, "{shown}");
        assert_eq!(shown["certificate"]["id"], "cert_acme_app.cluster.test");
    }
    // /metrics says who ordered it; each node keeps it on disk.
    for node in &cluster.nodes {
        let metrics = node.metrics_text().await;
        let sample = format!(
            "postern_acme_certificate_not_after_seconds{{reserved_domain=\"{id}\",ordered_by=\"{holder}\"}}"
        );
        assert!(metrics.contains(&sample), "{}: {metrics}", node.node_id());
        let kept = node.dir.path().join("acme").join(format!("{name}.pem"));
        assert!(kept.exists(), "{}", kept.display());
        assert_eq!(node.stat("acme_shared_certificates"), 1);
    }

    // The reservation deleted: its shared certificate (a sealed key) leaves
    // the cluster's gossip.
    let (status, _) = cluster.nodes[0].api("DELETE", &path, None, API_KEY).await;
    assert_eq!(status, 204);
    eventually(20, "the shared certificate deleted everywhere", || async {
        cluster
            .nodes
            .iter()
            .all(|node| node.stat("acme_shared_certificates") == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_lease_holder_dies_another_node_orders_and_a_third_answers_tls_alpn_01() {
    let mut pebble = Pebble::prepare().await;
    let extra = format!("{}challenge = \"tls-alpn-01\"\n", acme_toml(&pebble, "1s"));
    let specs: Vec<(&str, &str, Run)> = NODES
        .iter()
        .map(|(node, region)| (*node, *region, Run::Binary))
        .collect();
    let mut cluster = TestCluster::start_nodes(&specs, &extra).await;
    let name = "alpn.cluster.test";
    let reserved = reserve(
        &cluster.nodes[2],
        r#"{"domain": "alpn.cluster.test", "certificate_management_policy": {}}"#,
    )
    .await;
    let path = format!("/reserved_domains/{}", reserved["id"].as_str().unwrap());

    // The CA is down: one node holds the lease, failing. It dies (SIGKILL):
    // its lease dies with it, and another node takes over (and fails too,
    // the CA being down still).
    let first = failing_holder(&cluster, &[0, 1, 2], &path, "").await;
    let index = |nodes: &[TestEdge], id: &str| nodes.iter().position(|n| n.node_id() == id);
    let dead = index(&cluster.nodes, &first).unwrap();
    cluster.nodes[dead].process().kill().await;
    let killed_at = std::time::Instant::now();
    let rest: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    let second = failing_holder(&cluster, &rest, &path, &first).await;
    println!(
        "takeover: {second} holds the lease (and failed once) {:?} after {first} was killed",
        killed_at.elapsed()
    );
    let orderer = index(&cluster.nodes, &second).unwrap();
    let other = *rest.iter().find(|i| **i != orderer).unwrap();

    // An endpoint for the name, at a live node (a handshake for a name
    // without one is refused).
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = cluster.nodes[other]
        .agent(&http_tunnels(upstream.port(), &[name]))
        .await;
    // Pebble validates TLS-ALPN-01 at the third node's HTTPS listener
    // (its HTTP-01 port is one where nothing listens).
    let answering = &cluster.nodes[other];
    pebble
        .start(free_port(), answering.addrs.https.port(), None)
        .await;
    let root = pebble.root("pebble-root.pem").await;
    let mut serials = Vec::new();
    for i in &rest {
        let https = cluster.nodes[*i].addrs.https;
        let serial = wait_for_serial_of(https, name, &root, "").await;
        serials.push(serial);
    }
    assert_eq!(serials[0], serials[1], "one certificate");
    // Settled: the other live node installed the shared certificate (it
    // is not due for an order before renewal) and no lease is held.
    eventually(
        20,
        "the other node installed the shared certificate",
        || async {
            let mut settled = true;
            for i in &rest {
                let metrics = cluster.nodes[*i].metrics_text().await;
                let received = *i == orderer
                    || metrics.contains("postern_acme_certificates_received_total 1\n");
                settled &= received && metrics.contains("postern_acme_leases_held 0\n");
            }
            settled
        },
    )
    .await;
    let log = pebble.log();
    let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("Added order"), 1, "Pebble saw one order: {log:#?}");
    assert_eq!(count("Issued certificate serial"), 1, "{log:#?}");
    // Validated (Pebble does not log TLS-ALPN-01 attempts), not by HTTP-01.
    assert_eq!(count("set VALID by completed challenge"), 1, "{log:#?}");
    assert_eq!(count("Attempting to validate w/ HTTP"), 0, "{log:#?}");
    let issued = "postern_acme_orders_total{result=\"issued\"}";
    let received = "postern_acme_certificates_received_total";
    let orderer_node = &cluster.nodes[orderer];
    assert_eq!(metric(orderer_node, issued).await, 1);
    assert_eq!(metric(answering, issued).await, 0);
    assert_eq!(metric(answering, received).await, 1);
    for shown in at_nodes(&cluster, &rest, &path).await.unwrap() {
        let status = &shown["certificate_management_status"];
        assert_eq!(status["ordered_by"], second.as_str(), "{shown}");
        assert_eq!(status["lease"], Value::Null, "{shown}");
    }
    for i in rest {
        cluster.nodes[i].process().terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_acme_answers_the_challenge_and_serves_the_certificate() {
    let mut pebble = Pebble::prepare().await;
    let cluster_id = format!("acme-{}", postern_net::random_label());
    let gossip: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], postern_tests::cluster::udp_port())))
        .collect();
    let ordering = format!(
        "{}{}",
        acme_toml(&pebble, "1s"),
        cluster_toml(&cluster_id, &gossip, 0)
    );
    let orderer = TestEdge::start_node("edge-acme-a", "us", &ordering).await;
    let plain =
        TestEdge::start_node("edge-plain-b", "us", &cluster_toml(&cluster_id, &gossip, 1)).await;
    let cluster = TestCluster {
        cluster_id,
        gossip,
        nodes: vec![orderer, plain],
    };
    cluster.wait_members(&[0, 1], 2).await;
    let (orderer, plain) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Pebble validates HTTP-01 at the node without [acme].
    pebble
        .start(plain.addrs.http.unwrap().port(), free_port(), None)
        .await;
    let upstream = HttpUpstream::start().await;
    let name = "app.plain.test";
    let (_agent, _) = orderer.agent(&http_tunnels(upstream.port(), &[name])).await;
    reserve(
        orderer,
        r#"{"domain": "app.plain.test", "certificate_management_policy": {}}"#,
    )
    .await;
    let root = pebble.root("pebble-root.pem").await;
    wait_trusted(orderer, name, &root, 60).await;
    wait_trusted(plain, name, &root, 20).await;
    let (a, _) = served_serial(orderer.addrs.https, name, &root).await;
    let (b, _) = served_serial(plain.addrs.https, name, &root).await;
    assert_eq!(a, b);
    assert_eq!(orderer.stat("acme_orders_issued"), 1);
    let log = pebble.log();
    let at = format!(
        ":{}/.well-known/acme-challenge/",
        plain.addrs.http.unwrap().port()
    );
    assert!(
        log.iter()
            .any(|l| l.contains("Attempting to validate w/ HTTP") && l.contains(&at)),
        "{log:#?}"
    );
    assert_eq!(
        log.iter().filter(|l| l.contains("Added order")).count(),
        1,
        "{log:#?}"
    );
}

/// An upload body for `/tls_certificates`.
fn upload(cert_pem: &str, key_pem: &str) -> String {
    serde_json::json!({
        "certificate_pem": cert_pem,
        "private_key_pem": key_pem,
        "description": "uploaded in a test",
        "metadata": "{\"team\": \"edge\"}",
    })
    .to_string()
}

/// The serial (hex) of a PEM certificate, as openssl shows it.
fn serial_of(cert_pem: &str) -> String {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_certificate_is_served_by_sni_until_deleted() {
    let mut edge = TestEdge::start_node("edge-certs-1", "us", &cluster_of_one()).await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnels(
            upstream.port(),
            &["up.certs.test", "other.certs.test"],
        ))
        .await;
    let dir = TempDir::new("tls-certificates");
    let ca = TestCa::root("Uploaded test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    assert!(
        curl_trusting(&edge, "up.certs.test", &ca_file)
            .await
            .is_err(),
        "before the upload the dev CA's certificate is served"
    );

    // Refusals: each names the field, with its own code.
    let good = ca.server(&["up.certs.test"]);
    let other = ca.server(&["up.certs.test"]);
    let expired = ca.client("up.certs.test", &["up.certs.test"], &[], (-30, -1));
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, &good.key_pem).unwrap();
    let encrypted = tokio::process::Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:secret", "-in"])
        .arg(&key_file)
        .output()
        .await
        .unwrap();
    let encrypted = String::from_utf8(encrypted.stdout).unwrap();
    assert!(encrypted.contains("ENCRYPTED PRIVATE KEY"), "{encrypted}");
    for (body, code, field) in [
        (
            upload(&good.cert_pem, &other.key_pem),
            "ERR_POSTERN_9042",
            "private_key_pem",
        ),
        (
            upload(&expired.cert_pem, &expired.key_pem),
            "ERR_POSTERN_9043",
            "certificate_pem",
        ),
        (
            upload("not a certificate", &good.key_pem),
            "ERR_POSTERN_9040",
            "certificate_pem",
        ),
        (
            upload(&good.cert_pem, "not a key"),
            "ERR_POSTERN_9041",
            "private_key_pem",
        ),
        (
            upload(&good.cert_pem, &encrypted),
            "ERR_POSTERN_9041",
            "encrypted",
        ),
    ] {
        let (status, error) = edge
            .api("POST", "/tls_certificates", Some((JSON, &body)), API_KEY)
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error_code"], code, "{error}");
        let msg = error["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{field}: {error}");
    }

    let (status, created) = edge
        .api(
            "POST",
            "/tls_certificates",
            Some((JSON, &upload(&good.cert_pem, &good.key_pem))),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cert_"), "{created}");
    assert_eq!(created["uri"], format!("/tls_certificates/{id}"));
    assert_eq!(
        created["subject_alternative_names"],
        serde_json::json!({"dns_names": ["up.certs.test"], "ips": []})
    );
    assert_eq!(created["issuer_common_name"], "Uploaded test CA");
    assert_eq!(created["private_key_type"], "ecdsa");
    assert_eq!(created["description"], "uploaded in a test");
    assert_eq!(created["issued_at"], Value::Null);
    assert_eq!(
        created["serial_number"].as_str().unwrap(),
        serial_of(&good.cert_pem).replace(':', "")
    );
    for field in ["not_before", "not_after", "created_at", "fingerprint"] {
        assert!(created[field].is_string(), "{field}: {created}");
    }
    assert!(created.get("private_key_pem").is_none(), "{created}");
    assert!(!created.to_string().contains("PRIVATE KEY"), "{created}");

    // Served by SNI at once, to curl and openssl trusting only the CA.
    wait_trusted(&edge, "up.certs.test", &ca_file, 10).await;
    let (serial, verified) = served_serial(edge.addrs.https, "up.certs.test", &ca_file).await;
    assert!(verified);
    assert_eq!(serial, serial_of(&good.cert_pem));
    assert!(
        curl_trusting(&edge, "other.certs.test", &ca_file)
            .await
            .is_err(),
        "a name the certificate does not carry keeps the dev CA's"
    );

    let (_, listed) = edge.api("GET", "/tls_certificates", None, API_KEY).await;
    assert_eq!(
        listed["tls_certificates"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    let (status, got) = edge
        .api("GET", &format!("/tls_certificates/{id}"), None, API_KEY)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["certificate_pem"], good.cert_pem.as_str());
    let (status, patched) = edge
        .api(
            "PATCH",
            &format!("/tls_certificates/{id}"),
            Some((JSON, r#"{"description": "renamed"}"#)),
            API_KEY,
        )
        .await;
    assert_eq!(
        (status, &patched["description"]),
        (200, &serde_json::json!("renamed"))
    );

    // The key is sealed in the cluster's snapshot on disk too.
    edge.restart().await;
    wait_trusted(&edge, "up.certs.test", &ca_file, 20).await;

    let (status, _) = edge
        .api("DELETE", &format!("/tls_certificates/{id}"), None, API_KEY)
        .await;
    assert_eq!(status, 204);
    assert!(
        curl_trusting(&edge, "up.certs.test", &ca_file)
            .await
            .is_err(),
        "deleted: no longer served"
    );
    let (status, _) = edge
        .api("GET", &format!("/tls_certificates/{id}"), None, API_KEY)
        .await;
    assert_eq!(status, 404);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_certificate_files_in_the_binary() {
    let dir = TempDir::new("sighup-certs");
    let ca = TestCa::root("File test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let first = ca.server(&["files.certs.test"]);
    let (cert, key) = first.write(dir.path(), "files", &[]);
    let extra = format!(
        "[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut edge = TestEdge::start_process_with(&extra).await;
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnels(upstream.port(), &["files.certs.test"]))
        .await;
    let https = edge.addrs.https;
    let (serial, verified) = served_serial(https, "files.certs.test", &ca_file).await;
    assert!(verified);
    assert_eq!(serial, serial_of(&first.cert_pem));

    let metrics = format!("http://{}/metrics", edge.addrs.metrics.unwrap());
    // SIGHUP, then wait until /metrics counts the reload with `result`.
    let hangup = |pid: u32, result: &'static str| {
        let metrics = metrics.clone();
        async move {
            let status = tokio::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .await
                .unwrap();
            assert!(status.success());
            let sample = format!("postern_certificate_reloads_total{{result=\"{result}\"}} 1");
            eventually(20, &sample.clone(), || {
                let (metrics, sample) = (metrics.clone(), sample.clone());
                async move {
                    let out = curl(&[&metrics]).await;
                    String::from_utf8_lossy(&out.stdout).contains(&sample)
                }
            })
            .await;
        }
    };
    // A new pair in the same files: served after SIGHUP, by the same
    // process.
    let second = ca.server(&["files.certs.test"]);
    second.write(dir.path(), "files", &[]);
    let pid = edge.process().pid();
    hangup(pid, "ok").await;
    let (serial, verified) = served_serial(https, "files.certs.test", &ca_file).await;
    assert!(verified);
    assert_eq!(serial, serial_of(&second.cert_pem));

    // A broken pair (the key of another certificate) is refused (the log
    // names the file) and the certificate served stays.
    std::fs::write(&key, &first.key_pem).unwrap();
    hangup(pid, "failed").await;
    let (serial, verified) = served_serial(https, "files.certs.test", &ca_file).await;
    assert!(verified);
    assert_eq!(serial, serial_of(&second.cert_pem));
    assert_eq!(edge.process().pid(), pid, "the same process throughout");
    edge.process().terminate().await;
}

/// Waits until openssl, trusting only `ca`, gets the certificate with
/// `serial` for `name` at `addr`.
async fn wait_served(addr: SocketAddr, name: &str, ca: &Path, serial: String, what: &str) {
    eventually(10, what, || {
        let serial = serial.clone();
        async move {
            let (served, verified) = served_serial(addr, name, ca).await;
            verified && served == serial
        }
    })
    .await
}

/// An `[acme]` table whose CA never answers: enough for the API to take a
/// `certificate_management_policy`, ordering nothing.
fn unreachable_acme() -> String {
    format!(
        "[acme]\ndirectory_url = \"https://127.0.0.1:{}/dir\"\nretry_min = \"30s\"\nretry_max = \"60s\"\n",
        free_port()
    )
}

/// A reserved domain naming an uploaded certificate (`certificate_id`,
/// ngrok's shape): the edge serves that one for the domain over another
/// uploaded certificate carrying the name (more specific, even), shows it
/// as `certificate`, goes back to the default choice once detached (by
/// `PATCH` or `DELETE …/certificate`), and refuses to delete it while
/// named. Each refusal names the field with its own code.
#[tokio::test(flavor = "multi_thread")]
async fn a_reserved_domain_names_the_certificate_the_edge_serves() {
    let extra = format!("{}{}", unreachable_acme(), cluster_of_one());
    let mut edge = TestEdge::start_node("edge-named-1", "us", &extra).await;
    let upstream = HttpUpstream::start().await;
    let name = "app.named.test";
    let (_agent, _) = edge.agent(&http_tunnels(upstream.port(), &[name])).await;
    let dir = TempDir::new("named-certificate");
    let ca = TestCa::root("Named test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let api = |method: &'static str, path: String, body: Option<String>| {
        let edge = &edge;
        async move {
            edge.api(method, &path, body.as_deref().map(|b| (JSON, b)), API_KEY)
                .await
        }
    };
    let uploaded = |cert: postern_tests::Issued| async move {
        let (status, created) = api(
            "POST",
            "/tls_certificates".into(),
            Some(upload(&cert.cert_pem, &cert.key_pem)),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        (
            created["id"].as_str().unwrap().to_string(),
            serial_of(&cert.cert_pem),
        )
    };
    // Two certificates for the name: by default the exact one is served
    // (the most specific), the wildcard only when a reserved domain names it.
    let (exact, exact_serial) = uploaded(ca.server(&[name])).await;
    let (wildcard, wildcard_serial) = uploaded(ca.server(&["*.named.test"])).await;
    let https = edge.addrs.https;
    let served =
        |serial: String, what: &'static str| wait_served(https, name, &ca_file, serial, what);
    served(exact_serial.clone(), "the exact certificate, by default").await;

    let body = |fields: Value| Some(fields.to_string());
    let (status, reserved) = api(
        "POST",
        "/reserved_domains".into(),
        body(serde_json::json!({"domain": name, "certificate_id": wildcard})),
    )
    .await;
    assert_eq!(status, 201, "{reserved}");
    let rd = reserved["id"].as_str().unwrap().to_string();
    let named = serde_json::json!({"id": wildcard, "uri": format!("/tls_certificates/{wildcard}")});
    assert_eq!(reserved["certificate"], named, "{reserved}");
    assert_eq!(reserved["certificate_management_policy"], Value::Null);
    served(
        wildcard_serial.clone(),
        "the certificate the reserved domain names",
    )
    .await;
    let rd_path = format!("/reserved_domains/{rd}");
    let (_, got) = api("GET", rd_path.clone(), None).await;
    assert_eq!(got["certificate"], named, "{got}");

    // PATCH with "" detaches it: the default choice again.
    let (status, patched) = api(
        "PATCH",
        rd_path.clone(),
        body(serde_json::json!({"certificate_id": ""})),
    )
    .await;
    assert_eq!(
        (status, &patched["certificate"]),
        (200, &Value::Null),
        "{patched}"
    );
    served(exact_serial.clone(), "the exact certificate once detached").await;
    let (status, patched) = api(
        "PATCH",
        rd_path.clone(),
        body(serde_json::json!({"certificate_id": wildcard})),
    )
    .await;
    assert_eq!(
        (status, &patched["certificate"]),
        (200, &named),
        "{patched}"
    );
    served(wildcard_serial.clone(), "named again").await;

    // A named certificate is not deleted; detached, it is.
    let cert_path = format!("/tls_certificates/{wildcard}");
    let (status, refused) = api("DELETE", cert_path.clone(), None).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error_code"], "ERR_POSTERN_9047", "{refused}");
    let msg = refused["msg"].as_str().unwrap();
    assert!(
        msg.contains(&rd) && msg.contains("certificate_id"),
        "{refused}"
    );
    served(wildcard_serial.clone(), "still named after the refusal").await;

    // Refusals, each naming the field.
    let acme_id = format!("cert_acme_{name}");
    let policy = serde_json::json!({"authority": "letsencrypt"});
    for (method, path, fields, code) in [
        (
            "POST",
            "/reserved_domains".to_string(),
            serde_json::json!({"domain": "other.named.test", "certificate_id": "cert_nope"}),
            "ERR_POSTERN_9044",
        ),
        (
            "PATCH",
            rd_path.clone(),
            serde_json::json!({"certificate_id": acme_id}),
            "ERR_POSTERN_9044",
        ),
        (
            "POST",
            "/reserved_domains".to_string(),
            serde_json::json!({"domain": "a.b.named.test", "certificate_id": wildcard}),
            "ERR_POSTERN_9045",
        ),
        (
            "POST",
            "/reserved_domains".to_string(),
            serde_json::json!({"domain": "*.named.test", "certificate_id": exact}),
            "ERR_POSTERN_9045",
        ),
        (
            "POST",
            "/reserved_domains".to_string(),
            serde_json::json!({"domain": "other.named.test", "certificate_id": exact,
                "certificate_management_policy": policy}),
            "ERR_POSTERN_9046",
        ),
        (
            "PATCH",
            rd_path.clone(),
            serde_json::json!({"certificate_management_policy": policy}),
            "ERR_POSTERN_9046",
        ),
    ] {
        let (status, error) = api(method, path.clone(), body(fields.clone())).await;
        assert_eq!(status, 400, "{fields}: {error}");
        assert_eq!(error["error_code"], code, "{fields}: {error}");
        let msg = error["msg"].as_str().unwrap_or_default();
        assert!(msg.starts_with("certificate_id: "), "{fields}: {error}");
    }
    let (_, got) = api("GET", rd_path.clone(), None).await;
    assert_eq!(
        got["certificate"], named,
        "unchanged by the refusals: {got}"
    );

    // Switching to a policy clears certificate_id in the same request;
    // back again likewise; a policy's certificate is not named meanwhile.
    let (status, patched) = api(
        "PATCH",
        rd_path.clone(),
        body(serde_json::json!({"certificate_management_policy": policy, "certificate_id": null})),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["certificate"], Value::Null, "{patched}");
    assert_eq!(
        patched["certificate_management_policy"]["authority"],
        "letsencrypt"
    );
    let (status, refused) = api(
        "PATCH",
        rd_path.clone(),
        body(serde_json::json!({"certificate_id": wildcard})),
    )
    .await;
    assert_eq!(
        (status, &refused["error_code"]),
        (400, &"ERR_POSTERN_9046".into()),
        "{refused}"
    );
    let (status, patched) = api(
        "PATCH",
        rd_path.clone(),
        body(
            serde_json::json!({"certificate_id": wildcard, "certificate_management_policy": null}),
        ),
    )
    .await;
    assert_eq!(
        (status, &patched["certificate"]),
        (200, &named),
        "{patched}"
    );

    // DELETE …/certificate detaches it, as ngrok's.
    let (status, _) = api("DELETE", format!("{rd_path}/certificate"), None).await;
    assert_eq!(status, 204);
    let (_, got) = api("GET", rd_path.clone(), None).await;
    assert_eq!(got["certificate"], Value::Null, "{got}");
    served(
        exact_serial,
        "the exact certificate after DELETE …/certificate",
    )
    .await;
    let (status, deleted) = api("DELETE", cert_path, None).await;
    assert_eq!(status, 204, "{deleted}");
    let (status, _) = api("DELETE", format!("{rd_path}/nothing"), None).await;
    assert_eq!(status, 404);
    edge.stop().await;
}

/// Every node serves the certificate a reserved domain names, whichever
/// node the certificates were uploaded at and the reservation written at,
/// and every node goes back to the default choice once it is detached.
#[tokio::test(flavor = "multi_thread")]
async fn every_node_serves_the_certificate_a_reserved_domain_names() {
    let specs = [
        ("edge-us-1", "us", Run::InProcess),
        ("edge-eu-1", "eu", Run::InProcess),
    ];
    let cluster = TestCluster::start_nodes(&specs, "").await;
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let upstream = HttpUpstream::start().await;
    let name = "app.cluster-named.test";
    let (_agent, _) = first.agent(&http_tunnels(upstream.port(), &[name])).await;
    let dir = TempDir::new("named-in-a-cluster");
    let ca = TestCa::root("Cluster named CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let mut ids = Vec::new();
    for cert in [ca.server(&[name]), ca.server(&["*.cluster-named.test"])] {
        let (status, created) = first
            .api(
                "POST",
                "/tls_certificates",
                Some((JSON, &upload(&cert.cert_pem, &cert.key_pem))),
                API_KEY,
            )
            .await;
        assert_eq!(status, 201, "{created}");
        ids.push((
            created["id"].as_str().unwrap().to_string(),
            serial_of(&cert.cert_pem),
        ));
    }
    let [(_, exact_serial), (wildcard, wildcard_serial)] = <[_; 2]>::try_from(ids).unwrap();
    let all_serve = |serial: &str, what: &str| {
        let (serial, what, ca_file) = (serial.to_string(), what.to_string(), ca_file.clone());
        let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addrs.https).collect();
        async move {
            for https in nodes {
                wait_served(
                    https,
                    name,
                    &ca_file,
                    serial.clone(),
                    &format!("{what} at {https}"),
                )
                .await;
            }
        }
    };
    all_serve(&exact_serial, "the exact certificate, by default").await;
    // The second node checks the id against the certificates it has heard
    // of: both uploads must have reached it over the gossip.
    let path = format!("/tls_certificates/{wildcard}");
    eventually(
        10,
        "the second node knows the wildcard certificate",
        || async { second.api("GET", &path, None, API_KEY).await.0 == 200 },
    )
    .await;
    let body = serde_json::json!({"domain": name, "certificate_id": wildcard}).to_string();
    let (status, reserved) = second
        .api("POST", "/reserved_domains", Some((JSON, &body)), API_KEY)
        .await;
    assert_eq!(status, 201, "{reserved}");
    all_serve(&wildcard_serial, "the named certificate").await;
    let detach = format!(
        "/reserved_domains/{}/certificate",
        reserved["id"].as_str().unwrap()
    );
    let (status, _) = first.api("DELETE", &detach, None, API_KEY).await;
    assert_eq!(status, 204);
    all_serve(&exact_serial, "the exact certificate once detached").await;
}
