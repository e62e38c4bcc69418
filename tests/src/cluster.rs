//! Clusters of real edge nodes on loopback, each with its own listeners,
//! data directory, UDP gossip socket and link between nodes: in-process,
//! or as the `postern-edge` binary where a test kills one.

use std::net::SocketAddr;

use crate::{TestEdge, eventually};

/// The cluster key of every test cluster.
pub const SECRET: &str = "cluster-test-key-0123456789abcdef-0123";
/// Gossip round of the test clusters; detection and convergence scale
/// with it.
pub const GOSSIP: &str = "100ms";

/// The three nodes of [`TestCluster::start`].
pub const NODES: [(&str, &str); 3] = [
    ("edge-us-1", "us"),
    ("edge-eu-1", "eu"),
    ("edge-ap-1", "ap"),
];

/// A free UDP port on loopback.
pub fn udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Node `i`'s `[cluster]` table: gossip on `gossip[i]`, seeded with the
/// others, the link between nodes on a free port of the same address.
pub fn cluster_toml(cluster_id: &str, gossip: &[SocketAddr], i: usize) -> String {
    let seeds: Vec<String> = gossip
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, a)| format!("\"{a}\""))
        .collect();
    format!(
        "[cluster]\ncluster_id = \"{cluster_id}\"\nkey = \"{SECRET}\"\n\
         gossip_listen = \"{listen}\"\nrpc_listen = \"{ip}:0\"\n\
         seeds = [{seeds}]\ngossip_interval = \"{GOSSIP}\"\n",
        listen = gossip[i],
        ip = gossip[i].ip(),
        seeds = seeds.join(", "),
    )
}

/// How a node of a test cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    InProcess,
    /// The binary, so that it can be SIGKILLed.
    Binary,
}

pub struct TestCluster {
    pub cluster_id: String,
    /// Each node's gossip address.
    pub gossip: Vec<SocketAddr>,
    pub nodes: Vec<TestEdge>,
}

impl TestCluster {
    /// us, eu and ap in-process, once each sees three members.
    pub async fn start() -> TestCluster {
        Self::start_with("").await
    }

    /// As [`TestCluster::start`], with `extra` in every node's config.
    pub async fn start_with(extra: &str) -> TestCluster {
        let nodes: Vec<(&str, &str, Run)> = NODES
            .iter()
            .map(|(n, r)| (*n, *r, Run::InProcess))
            .collect();
        Self::start_nodes(&nodes, extra).await
    }

    /// Nodes `(node_id, region, run)`, each seeded with all the others,
    /// once the in-process ones see them all.
    pub async fn start_nodes(specs: &[(&str, &str, Run)], extra: &str) -> TestCluster {
        let cluster_id = format!("test-{}", postern_net::random_label());
        let gossip: Vec<SocketAddr> = specs
            .iter()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], udp_port())))
            .collect();
        let mut nodes = Vec::new();
        for (i, (node, region, run)) in specs.iter().enumerate() {
            let config = format!("{extra}\n{}", cluster_toml(&cluster_id, &gossip, i));
            nodes.push(match run {
                Run::InProcess => TestEdge::start_node(node, region, &config).await,
                Run::Binary => TestEdge::start_process_node(node, region, &config).await,
            });
        }
        let cluster = TestCluster {
            cluster_id,
            gossip,
            nodes,
        };
        let all: Vec<usize> = (0..specs.len()).collect();
        cluster.wait_members(&all, specs.len() as u64).await;
        cluster
    }

    /// Waits until each of the nodes `which` counts `n` live members.
    pub async fn wait_members(&self, which: &[usize], n: u64) {
        let nodes: Vec<&TestEdge> = which.iter().map(|i| &self.nodes[*i]).collect();
        eventually(60, &format!("{n} members at nodes {which:?}"), || {
            let nodes = nodes.clone();
            async move {
                for edge in nodes {
                    if members(edge).await != Some(n) {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }

    pub fn us(&self) -> &TestEdge {
        &self.nodes[0]
    }
}

/// The live members a node counts: its counter in-process, its
/// `/metrics` when it runs as the binary.
pub async fn members(edge: &TestEdge) -> Option<u64> {
    if edge.in_process() {
        return Some(edge.stat("cluster_members"));
    }
    let url = format!("http://{}/metrics", edge.addrs.metrics?);
    let out = crate::curl(&["-fsS", &url]).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("postern_cluster_members "))
        .and_then(|v| v.trim().parse().ok())
}
