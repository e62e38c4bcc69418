//! Three and more nodes on UDP loopback and on the in-memory network:
//! convergence, merge, tombstones, partitions, snapshots, forgeries.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use postern_config_sync::{Change, Cluster, ClusterKey, ClusterSettings, GossipTransport, Kind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Ca {
    pem: String,
}

impl Kind for Ca {
    const KIND: &'static str = "ca";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Route {
    name: String,
}

impl Kind for Route {
    const KIND: &'static str = "route";
}

const SECRET: &str = "test-cluster-key-0123456789abcdef-xyz";

fn settings(node: &str, region: &str, seeds: Vec<String>, dir: Option<PathBuf>) -> ClusterSettings {
    ClusterSettings {
        cluster_id: "test-cluster".into(),
        node_id: node.into(),
        region: region.into(),
        key: ClusterKey::from_secret(SECRET).unwrap(),
        transport: GossipTransport::Udp {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
        },
        seeds,
        gossip_interval: Duration::from_millis(100),
        phi_threshold: 6.0,
        tombstone_ttl: Duration::from_secs(3600),
        data_dir: dir,
        rpc_addr: None,
        agent_addr: None,
    }
}

async fn trio() -> Vec<Cluster> {
    let a = Cluster::start(settings("a", "us", vec![], None))
        .await
        .unwrap();
    let seed = vec![a.gossip_addr().to_string()];
    let b = Cluster::start(settings("b", "eu", seed.clone(), None))
        .await
        .unwrap();
    let c = Cluster::start(settings("c", "ap", seed, None))
        .await
        .unwrap();
    let nodes = vec![a, b, c];
    wait(10, "three members everywhere", || {
        nodes.iter().all(|n| n.members().len() == 3)
    })
    .await;
    nodes
}

async fn wait(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if check() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

fn ca(pem: &str) -> Ca {
    Ca { pem: pem.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_anywhere_converge_everywhere_and_deletes_stay_deleted() {
    let nodes = trio().await;
    let mut changes = nodes[2].subscribe();
    nodes[0].put("ca_1", &ca("one")).await.unwrap();
    wait(5, "ca_1 on every node", || {
        nodes.iter().all(|n| n.get::<Ca>("ca_1") == Some(ca("one")))
    })
    .await;
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Change::Config(kind)) = changes.recv().await {
                return kind;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, "ca");

    // A later write elsewhere wins everywhere.
    nodes[1].put("ca_1", &ca("two")).await.unwrap();
    wait(5, "ca_1 = two everywhere", || {
        nodes.iter().all(|n| n.get::<Ca>("ca_1") == Some(ca("two")))
    })
    .await;

    // Deleted at c: gone everywhere, and an old copy cannot come back.
    assert!(nodes[2].delete::<Ca>("ca_1").await.unwrap());
    wait(5, "ca_1 deleted everywhere", || {
        nodes.iter().all(|n| n.get::<Ca>("ca_1").is_none())
    })
    .await;
    assert!(
        !nodes[0].delete::<Ca>("ca_1").await.unwrap(),
        "already deleted"
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_values_follow_their_node_and_a_dead_node_is_detected() {
    let nodes = trio().await;
    nodes[1]
        .set_local(
            "ep_1",
            &Route {
                name: "app.example".into(),
            },
        )
        .await
        .unwrap();
    wait(5, "route visible at a and c", || {
        [&nodes[0], &nodes[2]].iter().all(|n| {
            n.locals::<Route>()
                .iter()
                .any(|l| l.node.node_id == "b" && l.id == "ep_1")
        })
    })
    .await;
    nodes[1].remove_local::<Route>("ep_1").await;
    wait(5, "route withdrawn", || {
        nodes[0].locals::<Route>().is_empty()
    })
    .await;

    // A partition: c stops hearing a and b (and they it).
    nodes[2]
        .set_local(
            "ep_2",
            &Route {
                name: "c.example".into(),
            },
        )
        .await
        .unwrap();
    wait(5, "c's route at a", || {
        nodes[0].locals::<Route>().len() == 1
    })
    .await;
    for peer in [&nodes[0], &nodes[1]] {
        nodes[2].partition().block(peer.gossip_addr());
    }
    let detected = wait(15, "c dead at a", || nodes[0].members().len() == 2).await;
    assert!(
        nodes[0].locals::<Route>().is_empty(),
        "a dead node's routes vanish"
    );
    println!("failure detected after {detected:?} at a 100 ms gossip interval");
    // While cut off, each side keeps writing.
    nodes[2].put("ca_c", &ca("from c")).await.unwrap();
    nodes[0].put("ca_a", &ca("from a")).await.unwrap();
    nodes[0].put("ca_gone", &ca("doomed")).await.unwrap();
    wait(5, "ca_gone at b", || {
        nodes[1].get::<Ca>("ca_gone").is_some()
    })
    .await;
    nodes[1].delete::<Ca>("ca_gone").await.unwrap();
    nodes[2].partition().heal();
    let healed = wait(10, "converged after heal", || {
        nodes.iter().all(|n| {
            n.members().len() == 3
                && n.get::<Ca>("ca_c").is_some()
                && n.get::<Ca>("ca_a").is_some()
                && n.get::<Ca>("ca_gone").is_none()
        })
    })
    .await;
    println!("converged {healed:?} after the partition healed");
    assert!(nodes[2].partition().dropped() > 0);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_values_change_nothing_and_are_counted() {
    let nodes = trio().await;
    nodes[0].put("ca_real", &ca("real")).await.unwrap();
    wait(5, "ca_real everywhere", || {
        nodes.iter().all(|n| n.get::<Ca>("ca_real").is_some())
    })
    .await;
    // A rogue node: right cluster id, wrong key.
    let mut rogue = settings(
        "rogue",
        "us",
        vec![nodes[0].gossip_addr().to_string()],
        None,
    );
    rogue.key = ClusterKey::from_secret("not-the-cluster-key-but-long-enough!!").unwrap();
    let rogue = Cluster::start(rogue).await.unwrap();
    rogue.put("ca_evil", &ca("evil")).await.unwrap();
    rogue.put("ca_real", &ca("overwritten")).await.unwrap();
    rogue
        .set_local(
            "ep_evil",
            &Route {
                name: "bank.example".into(),
            },
        )
        .await
        .unwrap();
    wait(10, "the forgeries are refused at every node", || {
        nodes.iter().all(|n| {
            n.stats()
                .iter()
                .any(|(k, v)| *k == "cluster_values_refused" && *v >= 3)
        })
    })
    .await;
    for n in &nodes {
        assert!(n.get::<Ca>("ca_evil").is_none());
        assert_eq!(n.get::<Ca>("ca_real"), Some(ca("real")));
        assert!(n.locals::<Route>().is_empty());
        assert!(n.members().iter().all(|m| m.node_id != "rogue"));
    }
    rogue.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_has_its_config_from_the_snapshot() {
    let dir = std::env::temp_dir().join(format!("postern-cs-{}", rand_suffix()));
    let a = Cluster::start(settings("a", "us", vec![], Some(dir.clone())))
        .await
        .unwrap();
    a.put("ca_1", &ca("kept")).await.unwrap();
    a.put("ca_2", &ca("deleted")).await.unwrap();
    a.delete::<Ca>("ca_2").await.unwrap();
    let big = "x".repeat(100_000);
    a.put("ca_big", &ca(&big)).await.unwrap();
    a.shutdown().await;
    // Alone, with no peers: the snapshot is all it has.
    let again = Cluster::start(settings("a", "us", vec![], Some(dir.clone())))
        .await
        .unwrap();
    assert_eq!(again.get::<Ca>("ca_1"), Some(ca("kept")));
    assert!(again.get::<Ca>("ca_2").is_none());
    assert_eq!(
        again.get::<Ca>("ca_big").map(|c| c.pem.len()),
        Some(100_000)
    );
    // A new peer learns it (including the chunked value) by gossip.
    let b = Cluster::start(settings(
        "b",
        "eu",
        vec![again.gossip_addr().to_string()],
        None,
    ))
    .await
    .unwrap();
    wait(10, "b has the snapshot's objects", || {
        b.get::<Ca>("ca_1").is_some() && b.get::<Ca>("ca_big").is_some()
    })
    .await;
    assert!(b.get::<Ca>("ca_2").is_none());
    again.shutdown().await;
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_network_of_twenty() {
    let network = postern_config_sync::InMemoryNetwork::new();
    let mut nodes = Vec::new();
    for i in 0..20u16 {
        let mut s = settings(&format!("n{i}"), "us", vec!["127.0.0.1:10000".into()], None);
        let addr: SocketAddr = format!("127.0.0.1:{}", 10000 + i).parse().unwrap();
        s.transport = GossipTransport::InMemory {
            network: network.clone(),
            addr,
        };
        nodes.push(Cluster::start(s).await.unwrap());
    }
    wait(30, "twenty members", || {
        nodes.iter().all(|n| n.members().len() == 20)
    })
    .await;
    nodes[7].put("ca_x", &ca("x")).await.unwrap();
    let took = wait(20, "ca_x everywhere", || {
        nodes.iter().all(|n| n.get::<Ca>("ca_x").is_some())
    })
    .await;
    println!("20 in-memory nodes converged in {took:?}");
    for n in &nodes {
        n.shutdown().await;
    }
}

fn rand_suffix() -> String {
    format!("{:x}", rand::random::<u64>())
}
