//! Certificates from an ACME CA: a real edge (a cluster of one, where
//! reserved domains live) against real Pebble, Let's Encrypt's test CA,
//! which resolves every name to 127.0.0.1 through pebble-challtestsrv and
//! validates HTTP-01 on the edge's plain-HTTP listener. curl and openssl
//! check what the edge serves against Pebble's root.

use std::{net::SocketAddr, path::Path, time::Duration};

use postern_tests::{
    API_KEY, HttpUpstream, Pebble, TestEdge, acme_toml, cluster::cluster_toml, curl, eventually,
    served_serial,
};
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

const JSON: &str = "Content-Type: application/json";

/// A node in a cluster of one, ordering from `pebble`.
async fn edge_with_acme(pebble: &Pebble) -> TestEdge {
    let gossip = SocketAddr::from(([127, 0, 0, 1], postern_tests::cluster::udp_port()));
    let cluster = cluster_toml(
        &format!("acme-{}", postern_net::random_label()),
        &[gossip],
        0,
    );
    let extra = format!("{}\n{cluster}", acme_toml(pebble, "1s"));
    TestEdge::start_node("edge-acme-1", "us", &extra).await
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
    eventually(90, "curl trusts app.acme.test with Pebble's root", || {
        let (edge, root) = (&edge, &root);
        async move {
            curl_trusting(edge, "app.acme.test", root)
                .await
                .is_ok_and(|body| body.contains("hello from upstream"))
        }
    })
    .await;
    eventually(90, "curl trusts rsa.acme.test with Pebble's root", || {
        let (edge, root) = (&edge, &root);
        async move { curl_trusting(edge, "rsa.acme.test", root).await.is_ok() }
    })
    .await;
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

    let (_, shown) = edge
        .api(
            "GET",
            &format!("/reserved_domains/{}", app["id"].as_str().unwrap()),
            None,
            API_KEY,
        )
        .await;
    let status = &shown["certificate_management_status"];
    assert!(status["renews_at"].is_string(), "{shown}");
    assert_eq!(status["provisioning_job"], Value::Null, "{shown}");

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
    eventually(30, "app.acme.test served from disk after a restart", || {
        let (edge, root) = (&edge, &root);
        async move { curl_trusting(edge, "app.acme.test", root).await.is_ok() }
    })
    .await;
    assert_eq!(edge.stat("acme_orders_issued"), 0);
    assert_eq!(edge.stat("acme_orders_failed"), 0);
    edge.stop().await;
}

/// The serial of a certificate for app.renew.test that verifies against
/// `root` and is not `not`, within a minute.
async fn wait_for_serial(https: SocketAddr, root: &Path, not: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (serial, verified) = served_serial(https, "app.renew.test", root).await;
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
    let upstream = HttpUpstream::start().await;
    let (_agent, _) = edge
        .agent(&http_tunnels(upstream.port(), &["app.renew.test"]))
        .await;
    let reserved = reserve(
        &edge,
        r#"{"domain": "app.renew.test", "certificate_management_policy": {"authority": "letsencrypt"}}"#,
    )
    .await;
    let path = format!("/reserved_domains/{}", reserved["id"].as_str().unwrap());
    let root = pebble.root("pebble-root.pem").await;

    let first = wait_for_serial(https, &root, "").await;
    let issued_at = std::time::Instant::now();
    let second = wait_for_serial(https, &root, &first).await;
    let renewed_after = issued_at.elapsed();
    assert!(
        renewed_after >= Duration::from_secs(12),
        "renewed at two thirds of 30 s, not at once: {renewed_after:?}"
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
