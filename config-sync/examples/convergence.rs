//! Benchmark (not a test): how long a config write takes to reach every
//! node, and how long a silent node takes to be declared dead.
//!
//! - 3 nodes on real UDP sockets on 127.0.0.1;
//! - N nodes (default 50) in this process on chitchat's in-memory network
//!   (same protocol and datagram limit, no kernel sockets).
//!
//! For each, at gossip intervals of 100 ms and 1 s: `ROUNDS` writes at a
//! random node, the time until every node holds each one (median, p95,
//! max); then one node is cut off and the time until every other node
//! drops it from its members is measured once.
//!
//! `bench/gossip.sh [N] [ROUNDS]`, which runs this example in release mode.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use postern_config_sync::{
    Cluster, ClusterKey, ClusterSettings, GossipTransport, InMemoryNetwork, Kind,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Probe {
    round: u32,
}

impl Kind for Probe {
    const KIND: &'static str = "probe";
}

const SECRET: &str = "convergence-benchmark-key-0123456789";

fn settings(
    node: usize,
    transport: GossipTransport,
    seeds: Vec<String>,
    interval: Duration,
) -> ClusterSettings {
    ClusterSettings {
        cluster_id: "bench".into(),
        node_id: format!("n{node}"),
        region: ["us", "eu", "ap"][node % 3].into(),
        key: ClusterKey::from_secret(SECRET).expect("long enough"),
        transport,
        seeds,
        gossip_interval: interval,
        phi_threshold: 6.0,
        tombstone_ttl: Duration::from_secs(3600),
        data_dir: None,
        rpc_addr: None,
        agent_addr: None,
    }
}

async fn udp_nodes(n: usize, interval: Duration) -> Vec<Cluster> {
    let mut nodes: Vec<Cluster> = Vec::new();
    for i in 0..n {
        let seeds = nodes
            .first()
            .map(|c| vec![c.gossip_addr().to_string()])
            .unwrap_or_default();
        let transport = GossipTransport::Udp {
            listen: "127.0.0.1:0".parse().expect("address"),
            advertise: None,
        };
        nodes.push(
            Cluster::start(settings(i, transport, seeds, interval))
                .await
                .expect("node starts"),
        );
    }
    nodes
}

async fn memory_nodes(n: usize, interval: Duration) -> Vec<Cluster> {
    let network = InMemoryNetwork::new();
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
    let mut nodes = Vec::new();
    for i in 0..n {
        let transport = GossipTransport::InMemory {
            network: network.clone(),
            addr: addr(i),
        };
        let seeds = vec![addr(0).to_string()];
        nodes.push(
            Cluster::start(settings(i, transport, seeds, interval))
                .await
                .expect("node starts"),
        );
    }
    nodes
}

async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn measure(label: &str, nodes: Vec<Cluster>, interval: Duration, rounds: u32) {
    let n = nodes.len();
    let joined = until(Duration::from_secs(120), || {
        nodes.iter().all(|c| c.members().len() == n)
    })
    .await;
    eprintln!("{label}, {}: formed after {joined:?}", ms(interval));
    let Some(joined) = joined else {
        println!(
            "| {label} | {} | did not form within 120 s | | | |",
            ms(interval)
        );
        return;
    };
    let mut times = Vec::new();
    for round in 0..rounds {
        let writer = &nodes[rand::random_range(0..n)];
        let id = format!("p{round}");
        writer.put(&id, &Probe { round }).await.expect("write");
        let took = until(Duration::from_secs(60), || {
            nodes.iter().all(|c| c.get::<Probe>(&id).is_some())
        })
        .await;
        eprintln!("{label}, {}: write {round}: {took:?}", ms(interval));
        times.push(took.unwrap_or(Duration::from_secs(60)));
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    // One node goes silent: the others must drop it.
    let victim = &nodes[n - 1];
    for peer in &nodes[..n - 1] {
        victim.partition().block(peer.gossip_addr());
        peer.partition().block(victim.gossip_addr());
    }
    let dead = until(Duration::from_secs(120), || {
        nodes[..n - 1].iter().all(|c| c.members().len() == n - 1)
    })
    .await;
    println!(
        "| {label} | {} | {} | {} / {} / {} | {} |",
        ms(interval),
        ms(joined),
        ms(pct(0.5)),
        ms(pct(0.95)),
        ms(*times.last().expect("rounds > 0")),
        dead.map(ms).unwrap_or_else(|| "> 120 s".into()),
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let big: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    println!("{rounds} writes per row, each at a random node; time until every node holds it.\n");
    println!(
        "| cluster | gossip interval | formed in | write visible everywhere (median / p95 / max) | silent node dropped by all others |"
    );
    println!("|---|---|---|---|---|");
    for interval in [Duration::from_millis(100), Duration::from_secs(1)] {
        measure(
            "3 nodes, UDP on loopback",
            udp_nodes(3, interval).await,
            interval,
            rounds,
        )
        .await;
        measure(
            &format!("{big} nodes, in-memory network"),
            memory_nodes(big, interval).await,
            interval,
            rounds,
        )
        .await;
    }
}
