//! A cluster of three real edge nodes (us, eu, ap) in this process, each
//! with its own listeners, data directory and UDP gossip socket on
//! 127.0.0.1: certificate authorities written through the admin API of one
//! node are enforced by the others and deleted everywhere; forged gossip
//! changes nothing and is counted; a restarted node serves its CAs from its
//! snapshot and converges without bringing a deleted one back.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use postern_config_sync::{Cluster, ClusterKey, ClusterSettings, GossipTransport, Kind};
use postern_tests::{
    API_KEY, HttpUpstream, HttpsClient, Spawned, TempDir, TestCa, TestEdge, binary,
    cluster::{GOSSIP, Run, SECRET, TestCluster, cluster_toml, members, udp_port},
    eventually, free_port,
    netns::NetNs,
};
use serde::{Deserialize, Serialize};

type Trio = TestCluster;

const HOST: &str = "app.customer1.example.test";

/// Uploads a CA's PEM at `edge`; its id.
async fn upload(edge: &TestEdge, ca: &TestCa, description: &str) -> String {
    let body = serde_json::json!({ "ca_pem": ca.pem, "description": description }).to_string();
    let (status, created) = edge
        .api(
            "POST",
            "/certificate_authorities",
            Some(("Content-Type: application/json", &body)),
            API_KEY,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

async fn has_ca(edge: &TestEdge, id: &str) -> bool {
    let (status, _) = edge.ca("GET", id).await;
    status == 200
}

/// Waits until `check` holds at every node of `nodes`; how long it took.
async fn until_all<'a>(
    nodes: impl IntoIterator<Item = &'a TestEdge> + Clone,
    what: &str,
    id: &str,
    present: bool,
) -> Duration {
    let start = Instant::now();
    eventually(30, what, || {
        let nodes = nodes.clone();
        async move {
            for edge in nodes {
                if has_ca(edge, id).await != present {
                    return false;
                }
            }
            true
        }
    })
    .await;
    start.elapsed()
}

/// Pooled: the agents at eu and ap serve one endpoint, each node preferring
/// its own.
fn mtls_tunnel(upstream: &HttpUpstream, ca_id: &str) -> String {
    format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {HOST}\n    mutual_tls_cas: [{ca_id}]\n    \
         pooling_enabled: true\n",
        upstream.port()
    )
}

fn client_cert(ca: &TestCa, dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
    ca.client(name, &[], &[], (-1, 30))
        .write(dir.path(), name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_uploaded_at_us_is_enforced_at_eu_and_ap_and_a_delete_at_ap_reaches_all() {
    let trio = Trio::start().await;
    let upstream = HttpUpstream::start().await;
    let root = TestCa::root("Cluster Root");
    let stranger = TestCa::root("Stranger Root");
    let dir = TempDir::new("cluster-pki");
    let (cert, key) = client_cert(&root, &dir, "member");
    let (bad_cert, bad_key) = client_cert(&stranger, &dir, "stranger");

    let id = upload(trio.us(), &root, "uploaded at us").await;
    let took = until_all(&trio.nodes[1..], "the CA at eu and ap", &id, true).await;
    println!("CA uploaded at us visible at eu and ap after {took:?} (gossip every {GOSSIP})");
    let (_, at_ap) = trio.nodes[2].ca("GET", &id).await;
    assert_eq!(at_ap["description"], "uploaded at us");
    assert_eq!(at_ap["subject_common_name"], "Cluster Root");

    // Endpoints at eu and ap that require it: the bind succeeds only
    // because the CA arrived (an unknown CA id is refused), and the
    // handshake enforces it.
    let mut agents = Vec::new();
    for edge in &trio.nodes[1..] {
        let (agent, _) = edge.agent(&mtls_tunnel(&upstream, &id)).await;
        agents.push(agent);
        let ok = edge.curl_mtls(HOST, Some((&cert, &key)), &[]).await;
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let none = edge.curl_mtls(HOST, None, &[]).await;
        assert!(!none.status.success(), "no client certificate: refused");
        let wrong = edge.curl_mtls(HOST, Some((&bad_cert, &bad_key)), &[]).await;
        assert!(
            !wrong.status.success(),
            "a certificate of another CA: refused"
        );
    }

    // Deleted at ap: gone at us and eu, and eu's endpoint stops admitting
    // its clients at the next handshake.
    let (status, _) = trio.nodes[2].ca("DELETE", &id).await;
    assert_eq!(status, 204);
    let took = until_all(&trio.nodes[..2], "the CA gone at us and eu", &id, false).await;
    println!("CA deleted at ap gone at us and eu after {took:?}");
    let eu = &trio.nodes[1];
    eventually(10, "eu refuses the deleted CA's clients", || async {
        !eu.curl_mtls(HOST, Some((&cert, &key)), &[])
            .await
            .status
            .success()
    })
    .await;
    let (status, _) = trio.nodes[0].ca("DELETE", &id).await;
    assert_eq!(status, 404, "already deleted, cluster-wide");
    for agent in agents {
        agent.shutdown().await.unwrap();
    }
}

/// What a rogue node puts under the edge's CA kind.
#[derive(Serialize, Deserialize)]
struct ForgedCa {
    id: String,
    ca_pem: String,
    created_at: String,
    description: String,
    metadata: String,
}

impl Kind for ForgedCa {
    const KIND: &'static str = "ca";
}

fn forged(ca: &TestCa, id: &str, description: &str) -> ForgedCa {
    ForgedCa {
        id: id.to_string(),
        ca_pem: ca.pem.clone(),
        created_at: "2026-01-01T00:00:00Z".into(),
        description: description.into(),
        metadata: String::new(),
    }
}

/// A gossip speaker in this process: the cluster's id, `secret` as key.
async fn speaker(trio: &Trio, node_id: &str, secret: &str) -> Cluster {
    Cluster::start(ClusterSettings {
        cluster_id: trio.cluster_id.clone(),
        node_id: node_id.into(),
        region: "us".into(),
        key: ClusterKey::from_secret(secret).unwrap(),
        transport: GossipTransport::Udp {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
        },
        seeds: vec![trio.gossip[0].to_string()],
        gossip_interval: Duration::from_millis(100),
        phi_threshold: 6.0,
        tombstone_ttl: Duration::from_secs(3600),
        data_dir: None,
        rpc_addr: None,
        agent_addr: None,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_changes_nothing_and_is_counted_and_a_non_ca_is_refused_on_arrival() {
    let trio = Trio::start().await;
    let real = TestCa::root("Real Root");
    let evil = TestCa::root("Evil Root");
    let real_id = upload(trio.us(), &real, "real").await;
    until_all(&trio.nodes, "the real CA everywhere", &real_id, true).await;
    let before: Vec<u64> = trio
        .nodes
        .iter()
        .map(|e| e.stat("cluster_values_refused"))
        .collect();

    // Real chitchat datagrams with the right cluster id, signed with
    // another key: a new CA, and a takeover of the real one.
    let rogue = speaker(&trio, "rogue", "not-the-cluster-key-but-long-enough!!").await;
    let evil_id = format!("ca_{}", "e".repeat(64));
    rogue
        .put(&evil_id, &forged(&evil, &evil_id, "evil"))
        .await
        .unwrap();
    rogue
        .put(&real_id, &forged(&evil, &real_id, "taken over"))
        .await
        .unwrap();
    let nodes = &trio.nodes;
    let before_ref = &before;
    eventually(30, "every node refused the forged values", || async move {
        nodes
            .iter()
            .zip(before_ref)
            .all(|(e, b)| e.stat("cluster_values_refused") >= b + 2)
    })
    .await;
    for edge in &trio.nodes {
        assert!(
            !has_ca(edge, &evil_id).await,
            "the forged CA is not applied"
        );
        let (_, real) = edge
            .api(
                "GET",
                &format!("/certificate_authorities/{real_id}"),
                None,
                API_KEY,
            )
            .await;
        assert_eq!(real["description"], "real", "the real CA is untouched");
        assert_eq!(real["subject_common_name"], "Real Root");
        assert_eq!(edge.stat("cluster_members"), 3, "the rogue is no member");
    }
    rogue.shutdown().await;

    // A holder of the key that gossips a leaf as a CA: signed, so merged,
    // but every node checks the certificate again and leaves it out.
    let insider = speaker(&trio, "insider", SECRET).await;
    let leaf = real.client("not a ca", &[], &[], (-1, 30));
    let leaf_id = format!("ca_{}", "1".repeat(64));
    insider
        .put(
            &leaf_id,
            &ForgedCa {
                ca_pem: leaf.cert_pem.clone(),
                ..forged(&real, &leaf_id, "leaf")
            },
        )
        .await
        .unwrap();
    eventually(
        30,
        "the insider's value merged at every node",
        || async move { nodes.iter().all(|e| e.stat("cluster_objects") == 2) },
    )
    .await;
    // A CA written after it: once a node shows this one, it has applied
    // the cluster's CAs with the leaf among them.
    let marker = TestCa::root("After the leaf");
    let marker_id = upload(&trio.nodes[2], &marker, "after").await;
    until_all(&trio.nodes, "a later CA everywhere", &marker_id, true).await;
    for edge in &trio.nodes {
        assert!(!has_ca(edge, &leaf_id).await, "a leaf is no CA");
        assert!(has_ca(edge, &real_id).await);
    }
    insider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_serves_its_snapshot_and_converges_without_resurrecting_deletes() {
    let mut trio = Trio::start().await;
    let upstream = HttpUpstream::start().await;
    let (kept, doomed, later) = (
        TestCa::root("Kept Root"),
        TestCa::root("Doomed Root"),
        TestCa::root("Later Root"),
    );
    let dir = TempDir::new("cluster-snapshot");
    let (cert, key) = client_cert(&kept, &dir, "kept-client");
    let kept_id = upload(trio.us(), &kept, "kept").await;
    let doomed_id = upload(trio.us(), &doomed, "doomed").await;
    until_all(&trio.nodes, "both CAs everywhere", &doomed_id, true).await;
    until_all(&trio.nodes, "both CAs everywhere", &kept_id, true).await;

    // eu goes down; meanwhile ap deletes one CA and adds another.
    trio.nodes[1].stop().await;
    let (status, _) = trio.nodes[2]
        .api(
            "DELETE",
            &format!("/certificate_authorities/{doomed_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(status, 204);
    let later_id = upload(&trio.nodes[2], &later, "later").await;
    until_all(&trio.nodes[..1], "the later CA at us", &later_id, true).await;
    until_all(
        &trio.nodes[..1],
        "the doomed CA gone at us",
        &doomed_id,
        false,
    )
    .await;

    // Every node down, then eu alone: it has its config from its snapshot
    // (with no peer to tell it about the delete) and enforces it at once.
    trio.nodes[0].stop().await;
    trio.nodes[2].stop().await;
    trio.nodes[1].restart().await;
    let eu = &trio.nodes[1];
    assert!(
        has_ca(eu, &kept_id).await,
        "from the snapshot, before any gossip"
    );
    assert!(has_ca(eu, &doomed_id).await, "eu never heard of the delete");
    assert!(!has_ca(eu, &later_id).await);
    let (agent, _) = eu.agent(&mtls_tunnel(&upstream, &kept_id)).await;
    let ok = eu.curl_mtls(HOST, Some((&cert, &key)), &[]).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!eu.curl_mtls(HOST, None, &[]).await.status.success());

    // The others come back: eu learns the delete and the new CA, and its
    // stale copy of the deleted CA does not come back anywhere.
    trio.nodes[0].restart().await;
    trio.nodes[2].restart().await;
    trio.wait_members(&[0, 1, 2], 3).await;
    let start = Instant::now();
    until_all(&trio.nodes, "the later CA everywhere", &later_id, true).await;
    until_all(&trio.nodes, "the deleted CA nowhere", &doomed_id, false).await;
    println!(
        "converged {:?} after the cluster came back",
        start.elapsed()
    );
    // Stays deleted: a few more rounds change nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for edge in &trio.nodes {
        assert!(!has_ca(edge, &doomed_id).await, "no deleted CA returns");
        assert!(has_ca(edge, &kept_id).await);
    }
    agent.shutdown().await.unwrap();
}

#[test]
fn the_local_cluster_example_configs_are_valid_and_seed_each_other() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster");
    let mut gossip = Vec::new();
    let mut seeds = Vec::new();
    for region in ["us", "eu", "ap"] {
        let config = postern_edge::EdgeConfig::load(&dir.join(format!("{region}.toml")))
            .unwrap_or_else(|e| panic!("{region}.toml: {e:#}"));
        assert_eq!(config.region, region);
        let cluster = config.cluster.expect("a [cluster] table");
        assert_eq!(cluster.cluster_id, "postern-local");
        gossip.push(cluster.gossip_listen.to_string());
        seeds.push(cluster.seeds);
    }
    for (i, node_seeds) in seeds.iter().enumerate() {
        let others: Vec<&String> = gossip
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, g)| g)
            .collect();
        assert_eq!(
            node_seeds.iter().collect::<Vec<_>>(),
            others,
            "node {i} seeds the other two"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_dropped_its_writes_survive_and_it_restarts_from_its_snapshot() {
    // ap runs as the postern-edge binary, so it can be SIGKILLed.
    let specs = [
        ("edge-us-1", "us", Run::InProcess),
        ("edge-eu-1", "eu", Run::InProcess),
        ("edge-ap-1", "ap", Run::Binary),
    ];
    let mut cluster = TestCluster::start_nodes(&specs, "").await;
    let mut ap = cluster.nodes.pop().unwrap();
    let nodes = cluster.nodes;
    let root = TestCa::root("Written at ap");
    let id = upload(&ap, &root, "from ap").await;
    until_all(&nodes, "ap's CA at us and eu", &id, true).await;

    // Killed: no goodbye, the others' failure detectors must notice.
    ap.process().kill().await;
    let start = Instant::now();
    eventually(60, "ap dropped at us and eu", || {
        let ok = nodes.iter().all(|e| e.stat("cluster_members") == 2);
        async move { ok }
    })
    .await;
    println!(
        "a SIGKILLed node was dropped by both others after {:?} (gossip every {GOSSIP}, phi threshold 6)",
        start.elapsed()
    );
    for edge in &nodes {
        assert!(
            has_ca(edge, &id).await,
            "the write outlives the node that took it"
        );
    }

    // The kill lost nothing: the snapshot is saved at every change.
    let snapshot = std::fs::read_to_string(ap.dir.path().join("cluster-config.json")).unwrap();
    assert!(snapshot.contains(&format!("c/ca/{id}")), "{snapshot}");

    // Deleted while ap is dead: ap comes back with its snapshot's (stale)
    // copy and learns the delete, which its copy does not undo.
    let (status, _) = nodes[1].ca("DELETE", &id).await;
    assert_eq!(status, 204);
    ap.restart_process().await;
    until_all([&ap], "the delete reaches the restarted ap", &id, false).await;
    eventually(30, "three members again", || {
        let ok = nodes.iter().all(|e| e.stat("cluster_members") == 3);
        async move { ok }
    })
    .await;
    for edge in &nodes {
        assert!(
            !has_ca(edge, &id).await,
            "ap's stale copy does not bring it back"
        );
    }
    ap.process().terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_created_at_eu_serves_at_us_and_revoked_at_ap_disconnects_its_agent() {
    let trio = Trio::start().await;
    let upstream = HttpUpstream::start().await;
    let json = "Content-Type: application/json";

    let bad = r#"{"acl": ["bond:*.customer1.example.test"]}"#;
    let (status, refused) = trio.nodes[1]
        .api("POST", "/credentials", Some((json, bad)), API_KEY)
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error_code"], "ERR_POSTERN_9400");
    assert!(
        refused["msg"].as_str().unwrap().starts_with("acl: "),
        "{refused}"
    );

    let body = r#"{"description": "site agent", "acl": ["bind:*.customer1.example.test"]}"#;
    let (status, created) = trio.nodes[1]
        .api("POST", "/credentials", Some((json, body)), API_KEY)
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["acl"][0], "bind:*.customer1.example.test");

    let us = trio.us();
    eventually(30, "the credential at us", || async {
        us.api("GET", &format!("/credentials/{id}"), None, API_KEY)
            .await
            .0
            == 200
    })
    .await;
    let (_, listed) = us.api("GET", "/credentials", None, API_KEY).await;
    assert_eq!(listed["credentials"][0]["id"], id.as_str());
    assert!(
        listed["credentials"][0]["token"].is_null(),
        "the token is shown only once"
    );

    // An agent at us with the token made at eu: its ACL applies there.
    let outside = "  web:\n    proto: http\n    addr: 1\n    domain: app.customer2.example.test\n";
    let Err(denied) = us.agent_with(&token, outside).await else {
        panic!("a name outside the ACL was bound");
    };
    assert!(
        format!("{denied:#}").contains("ERR_POSTERN_316"),
        "{denied:#}"
    );
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {HOST}\n",
        upstream.port()
    );
    let (agent, _) = us
        .agent_with(&token, &tunnel)
        .await
        .expect("the credential works at us");
    let code = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let served = us
        .curl_mtls(HOST, None, &["-o", "/dev/null", "-w", "%{http_code}"])
        .await;
    assert_eq!(code(served), "200");

    // Revoked at ap: us closes the agent's session, and the agent, told its
    // token is no longer valid, stops.
    let (status, _) = trio.nodes[2]
        .api("DELETE", &format!("/credentials/{id}"), None, API_KEY)
        .await;
    assert_eq!(status, 204);
    let start = Instant::now();
    eventually(30, "us closed the revoked credential's session", || {
        let closed = us.stat("agent_sessions") == 0;
        async move { closed }
    })
    .await;
    println!(
        "a credential revoked at ap closed its session at us after {:?}",
        start.elapsed()
    );
    let stopped = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent stops");
    let error = format!("{:#}", stopped.expect_err("with an error"));
    assert!(error.contains("ERR_POSTERN_107"), "{error}");
    // The name has no route at us any more: TLS is refused by SNI.
    let gone = us.curl_mtls(HOST, None, &[]).await;
    let stderr = String::from_utf8_lossy(&gone.stderr).to_lowercase();
    assert!(stderr.contains("unrecognized name"), "{stderr}");
    let Err(refused) = us.agent_with(&token, &tunnel).await else {
        panic!("a revoked credential connected");
    };
    assert!(
        format!("{refused:#}").contains("ERR_POSTERN_107"),
        "{refused:#}"
    );
}

/// `curl` inside `netns`: the status line `-w` prints and the body.
async fn ns_curl(netns: &NetNs, args: &[&str]) -> (String, String) {
    let out = netns
        .command("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// The status of `GET /certificate_authorities/{id}` at a node inside
/// `netns`, asked from inside it.
async fn ca_status_inside(netns: &NetNs, edge: &TestEdge, id: &str) -> String {
    let url = format!(
        "http://{}/certificate_authorities/{id}",
        edge.addrs.admin.unwrap()
    );
    let auth = format!("Authorization: Bearer {API_KEY}");
    ns_curl(netns, &["-o", "/dev/null", "-H", &auth, &url])
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_keeps_serving_and_converges_after_the_heal_without_resurrecting_deletes()
 {
    // ap runs in its own network namespace; its link to us and eu is a
    // veth pair the test cuts.
    let netns = NetNs::create().expect("a network namespace (needs root and iproute2)");
    let cluster_id = format!("test-{}", postern_net::random_label());
    let gossip: Vec<std::net::SocketAddr> = [netns.host_ip, netns.host_ip, netns.ns_ip]
        .into_iter()
        .map(|ip| (ip, udp_port()).into())
        .collect();
    let toml = |i| cluster_toml(&cluster_id, &gossip, i);
    let us = TestEdge::start_node("edge-us-1", "us", &toml(0)).await;
    let eu = TestEdge::start_node("edge-eu-1", "eu", &toml(1)).await;
    let mut ap = TestEdge::start_process_in("edge-ap-1", "ap", &toml(2), &netns).await;
    let all = [&us, &eu, &ap];
    eventually(60, "three members at each node", || async {
        for edge in all {
            if members(edge).await != Some(3) {
                return false;
            }
        }
        true
    })
    .await;

    let doomed = TestCa::root("Deleted during the partition");
    let doomed_id = upload(&us, &doomed, "deleted while ap is cut off").await;
    until_all([&ap], "the CA at ap", &doomed_id, true).await;

    // An agent and its upstream inside ap's namespace.
    let site = TempDir::new("ap-site");
    std::fs::write(site.path().join("index.html"), "served in ap").unwrap();
    let port = free_port().to_string();
    let _upstream = Spawned::spawn(netns.command("python3").args([
        "-m",
        "http.server",
        &port,
        "--bind",
        "127.0.0.1",
        "--directory",
        site.path().to_str().unwrap(),
    ]));
    let host = "site.ap.example.test";
    let mut agent = Spawned::spawn(
        netns
            .command(binary("postern"))
            .args(["http", &port, "--domain", host])
            .args(ap.agent_args(&ap.token)),
    );
    agent.wait_for_line("Forwarding", 20).await;
    let ap_https = ap.addrs.https;
    let ap_ca = ap.ca_pem();
    let resolve = format!("{host}:{}:{}", ap_https.port(), ap_https.ip());
    let url = format!("https://{host}:{}/", ap_https.port());
    let inside = || {
        let (ca, resolve, url) = (ap_ca.clone(), resolve.clone(), url.clone());
        let netns = &netns;
        async move {
            let ca = ca.to_str().unwrap().to_string();
            ns_curl(netns, &["--cacert", &ca, "--resolve", &resolve, &url]).await
        }
    };
    eventually(20, "the upstream answers through ap", || async {
        inside().await.0 == "200"
    })
    .await;
    // us reaches it over the link between nodes.
    eventually(20, "us serves the ap agent's endpoint", || async {
        us.https_status(host, "/", &[]).await == "200"
    })
    .await;

    netns.cut();
    let cut_at = Instant::now();
    eventually(60, "us and eu drop ap", || async {
        us.stat("cluster_members") == 2 && eu.stat("cluster_members") == 2
    })
    .await;
    println!(
        "partition: us and eu dropped ap after {:?}",
        cut_at.elapsed()
    );
    // Each side writes while cut off.
    let (status, _) = us.ca("DELETE", &doomed_id).await;
    assert_eq!(status, 204);
    let at_us = TestCa::root("Written at us during the partition");
    let at_us_id = upload(&us, &at_us, "us, cut off").await;
    let pem = site.path().join("ap-ca.pem");
    let at_ap = TestCa::root("Written at ap during the partition");
    std::fs::write(&pem, &at_ap.pem).unwrap();
    let (code, created) = ns_curl(
        &netns,
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {API_KEY}"),
            "--data-binary",
            &format!("@{}", pem.display()),
            &format!("http://{}/certificate_authorities", ap.addrs.admin.unwrap()),
        ],
    )
    .await;
    assert_eq!(code, "201", "{created}");
    let at_ap_id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // ap keeps serving its own agent with the config it last had.
    assert_eq!(inside().await.0, "200", "ap serves its agent while cut off");
    assert_eq!(
        ca_status_inside(&netns, &ap, &doomed_id).await,
        "200",
        "ap still has its last config"
    );
    // At us the endpoint is gone with ap: refused at once, no hang.
    let started = Instant::now();
    assert_ne!(
        us.https_status(host, "/", &["--max-time", "5"]).await,
        "200"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Meanwhile an agent at us binds the same name: neither side can see
    // the other's bind.
    let upstream = HttpUpstream::start().await;
    let (rival, _) = us
        .agent(&format!(
            "  web:\n    proto: http\n    addr: {}\n    domain: {host}\n",
            upstream.port()
        ))
        .await;
    let client = HttpsClient::new(us.addrs.https, &us.ca_pem());
    let body = || async {
        client
            .get(host, "/")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    };
    assert_eq!(body().await, "hello from upstream");

    netns.heal();
    let healed_at = Instant::now();
    until_all([&us, &eu], "ap's write at us and eu", &at_ap_id, true).await;
    until_all([&ap], "us's write at ap", &at_us_id, true).await;
    until_all([&ap], "the delete at ap", &doomed_id, false).await;
    println!(
        "partition healed: both sides' writes everywhere after {:?}",
        healed_at.elapsed()
    );
    eventually(60, "three members again", || async {
        us.stat("cluster_members") == 3 && eu.stat("cluster_members") == 3
    })
    .await;
    // Ten more gossip rounds: ap's old copy does not bring the CA back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for edge in [&us, &eu, &ap] {
        assert!(!has_ca(edge, &doomed_id).await, "no deleted object returns");
    }
    // One owner after the heal: ap's endpoint was bound first, so us stops
    // its own agent's endpoint and tells the agent; every node routes the
    // name to ap.
    eventually(30, "us and eu route the name to ap only", || async {
        body().await == "served in ap"
            && serving_nodes(&us, host).await == ["edge-ap-1"]
            && serving_nodes(&eu, host).await == ["edge-ap-1"]
    })
    .await;
    println!(
        "the bind conflict was resolved when looked at, {:?} after the heal",
        healed_at.elapsed()
    );
    let told = rival.status().borrow().clone();
    assert!(told.tunnels.is_empty(), "{told:?}");
    assert!(
        told.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("ERR_POSTERN_334") && e.contains("edge-ap-1")),
        "the loser is told: {told:?}"
    );
    // It stands by: once ap's agent is gone it gets the name.
    agent.kill().await;
    eventually(30, "us's agent takes the name over", || async {
        body().await == "hello from upstream"
    })
    .await;
    rival.shutdown().await.unwrap();
    ap.process().kill().await;
}

/// The nodes serving endpoints on `host`, as `edge`'s `/endpoints` lists them.
async fn serving_nodes(edge: &TestEdge, host: &str) -> Vec<String> {
    let (_, list) = edge.api("GET", "/endpoints", None, API_KEY).await;
    let mut nodes: Vec<String> = list["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["public_url"].as_str().is_some_and(|u| u.contains(host)))
        .filter_map(|e| e["node_id"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_policy_made_at_eu_makes_every_node_require_its_ca_for_an_endpoint_already_bound()
 {
    let trio = Trio::start().await;
    let (us, eu, ap) = (trio.us(), &trio.nodes[1], &trio.nodes[2]);
    let upstream = HttpUpstream::start().await;
    let root = TestCa::root("Policy Root");
    let dir = TempDir::new("policy-pki");
    let (cert, key) = client_cert(&root, &dir, "member");
    let ca_id = upload(us, &root, "required by a policy").await;
    until_all(&trio.nodes[1..], "the CA at eu and ap", &ca_id, true).await;

    // An endpoint without mTLS, bound at ap, served at every node.
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: {HOST}\n",
        upstream.port()
    );
    let (agent, agent_status) = ap.agent(&tunnel).await;
    for edge in &trio.nodes {
        eventually(30, "served without a client certificate", || async {
            edge.curl_mtls(HOST, None, &["-f"]).await.status.success()
        })
        .await;
    }

    // Bad input: 400 with a code and the field.
    let json = ("Content-Type: application/json", "");
    let domain = "*.customer1.example.test";
    for (body, code, field) in [
        (
            serde_json::json!({ "domain": domain, "mutual_tls_cas": ["ca_0000"] }),
            "ERR_POSTERN_1697",
            "mutual_tls_cas",
        ),
        (
            serde_json::json!({ "domain": "a..example.test", "mutual_tls_cas": [ca_id] }),
            "ERR_POSTERN_326",
            "domain",
        ),
        (
            serde_json::json!({ "domain": domain }),
            "ERR_POSTERN_9400",
            "mutual_tls_cas",
        ),
    ] {
        let body = body.to_string();
        let (status, answer) = eu
            .api("POST", "/endpoint_policies", Some((json.0, &body)), API_KEY)
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error_code"], code, "{answer}");
        assert!(
            answer["msg"].as_str().unwrap().starts_with(field),
            "{answer}"
        );
    }

    // Made at eu: every node asks for a certificate of the CA, at ap (the
    // agent's node) and at us and eu (which forward to it).
    let body = serde_json::json!({ "domain": domain, "mutual_tls_cas": [ca_id] }).to_string();
    let (status, policy) = eu
        .api("POST", "/endpoint_policies", Some((json.0, &body)), API_KEY)
        .await;
    assert_eq!(status, 201, "{policy}");
    let policy_id = policy["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    for edge in &trio.nodes {
        eventually(30, "refused without a client certificate", || async {
            !edge.curl_mtls(HOST, None, &["-f"]).await.status.success()
        })
        .await;
        let ok = edge.curl_mtls(HOST, Some((&cert, &key)), &["-f"]).await;
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
    println!(
        "an endpoint policy made at eu enforced at every node after {:?}",
        start.elapsed()
    );

    // Built again in place: the agent kept its session.
    let (_, sessions) = ap.api("GET", "/tunnel_sessions", None, API_KEY).await;
    let ids: Vec<&str> = sessions["tunnel_sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [agent_status.session_id.as_str()], "{sessions}");

    // A Traffic Policy added to it at us (sealed in gossip): every node
    // runs the operator's rule, whatever the agent asked.
    let bad = serde_json::json!({ "traffic_policy": { "on_http_requests": [] } }).to_string();
    let path = format!("/endpoint_policies/{policy_id}");
    let (status, answer) = us.api("PATCH", &path, Some((json.0, &bad)), API_KEY).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["msg"]
            .as_str()
            .unwrap()
            .starts_with("traffic_policy"),
        "{answer}"
    );
    let rule = serde_json::json!({ "traffic_policy": { "on_http_request": [{ "actions": [
        { "type": "add-headers", "config": { "headers": { "x-operator": "${conn.server_region}" } } }
    ] }] } })
    .to_string();
    let (status, updated) = us.api("PATCH", &path, Some((json.0, &rule)), API_KEY).await;
    assert_eq!(status, 200, "{updated}");
    assert!(
        updated["traffic_policy"]
            .as_str()
            .unwrap()
            .contains("x-operator"),
        "{updated}"
    );
    for edge in &trio.nodes {
        let region = edge.region().to_string();
        eventually(
            30,
            "the operator's rule runs at the receiving node",
            || async {
                edge.curl_mtls(HOST, Some((&cert, &key)), &["-f"])
                    .await
                    .status
                    .success()
                    && upstream
                        .last("/echo")
                        .headers
                        .get("x-operator")
                        .is_some_and(|v| *v == region.as_str())
            },
        )
        .await;
    }

    // Deleted at us: no certificate needed again, anywhere.
    let (deleted, _) = us
        .api(
            "DELETE",
            &format!("/endpoint_policies/{policy_id}"),
            None,
            API_KEY,
        )
        .await;
    assert_eq!(deleted, 204);
    for edge in &trio.nodes {
        eventually(30, "served without a client certificate again", || async {
            edge.curl_mtls(HOST, None, &["-f"]).await.status.success()
        })
        .await;
    }
    agent.shutdown().await.unwrap();
}

/// `/readyz` of `edge`: the status and the body.
async fn readyz(edge: &TestEdge) -> (String, String) {
    let url = format!("http://{}/readyz", edge.addrs.metrics.unwrap());
    let out = postern_tests::curl(&["-s", "-w", "\n%{http_code}", &url]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    (code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_is_ready_once_it_caught_up_with_a_peer_or_after_the_timeout_alone() {
    // Alone (its seed does not answer): not ready at first, ready on its
    // snapshot's config once the timeout has passed.
    let cluster_id = format!("test-{}", postern_net::random_label());
    let gossip: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| ([127, 0, 0, 1], udp_port()).into())
        .collect();
    let alone = TestEdge::start_node(
        "edge-us-9",
        "us",
        &format!(
            "{}catch_up_timeout = \"3s\"\n",
            cluster_toml(&cluster_id, &gossip, 0)
        ),
    )
    .await;
    let (code, body) = readyz(&alone).await;
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("catching up"), "{body}");
    eventually(20, "ready alone after the timeout", || async {
        readyz(&alone).await.0 == "200"
    })
    .await;

    // Joining a live cluster: ready after catching up, long before its
    // 60 s timeout.
    let trio = Trio::start().await;
    let mut gossip = trio.gossip.clone();
    gossip.push(([127, 0, 0, 1], udp_port()).into());
    let joining = TestEdge::start_node(
        "edge-us-2",
        "us",
        &format!(
            "{}catch_up_timeout = \"60s\"\n",
            cluster_toml(&trio.cluster_id, &gossip, 3)
        ),
    )
    .await;
    let started = Instant::now();
    eventually(30, "the joining node ready", || async {
        readyz(&joining).await.0 == "200"
    })
    .await;
    println!(
        "a node joining a live cluster was ready after {:?}",
        started.elapsed()
    );
    eventually(30, "four members at the joining node", || async {
        members(&joining).await == Some(4)
    })
    .await;
}
