//! This node's part in a cluster (`[cluster]` in the config): it joins the
//! gossip of the other nodes through config-sync, from a seed list, and
//! keeps the certificate-authority store in step with the cluster's CA
//! objects. A CA uploaded or deleted through the admin API of any node is
//! written to the cluster (signed, merged by hybrid logical clock,
//! tombstoned on delete) and every node's store follows it, so an endpoint
//! on any node enforces it; each CA is checked again when it arrives, as an
//! upload is. Without `[cluster]` the node keeps its CAs on its own.

mod config;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use postern_config_sync::{Change, Cluster, ClusterSettings, GossipTransport, Kind};
use postern_proto::{ErrorCode, Failure};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::ca_store::{CaRecord, CaStore, StoredCa};

pub use config::{ClusterConfig, RawCluster};

impl Kind for CaRecord {
    const KIND: &'static str = "ca";
}

/// The node's membership and the task that applies the cluster's CAs.
pub struct ClusterNode {
    cluster: Cluster,
    cas: Arc<CaStore>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn cluster_failure(e: postern_config_sync::ClusterError) -> Failure {
    Failure::new(ErrorCode::INTERNAL, format!("cluster: {e}"))
}

impl ClusterNode {
    /// Joins the cluster (the snapshot in `data_dir` gives the config before
    /// gossip catches up) and starts applying its CAs to `cas`.
    pub async fn start(
        config: &ClusterConfig,
        node_id: &str,
        region: &str,
        data_dir: &Path,
        cas: Arc<CaStore>,
    ) -> anyhow::Result<ClusterNode> {
        let cluster = Cluster::start(ClusterSettings {
            cluster_id: config.cluster_id.clone(),
            node_id: node_id.to_string(),
            region: region.to_string(),
            key: config.key.clone(),
            transport: GossipTransport::Udp {
                listen: config.gossip_listen,
                advertise: config.gossip_advertise,
            },
            seeds: config.seeds.clone(),
            gossip_interval: config.gossip_interval,
            phi_threshold: config.phi_threshold,
            tombstone_ttl: config.tombstone_ttl,
            data_dir: Some(data_dir.to_path_buf()),
            rpc_addr: None,
        })
        .await
        .context("joining the cluster")?;
        apply_cas(&cluster, &cas);
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow(cluster.clone(), cas.clone(), stop.clone()));
        Ok(ClusterNode {
            cluster,
            cas,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    /// Publishes a checked upload to the cluster and stores it here.
    pub async fn put_ca(&self, stored: &StoredCa) -> Result<(), Failure> {
        self.cluster
            .put(&stored.id, &stored.record())
            .await
            .map_err(cluster_failure)?;
        apply_cas(&self.cluster, &self.cas);
        Ok(())
    }

    /// Deletes a CA cluster-wide; `false` when the cluster has no such CA.
    pub async fn delete_ca(&self, id: &str) -> Result<bool, Failure> {
        let deleted = self
            .cluster
            .delete::<CaRecord>(id)
            .await
            .map_err(cluster_failure)?;
        apply_cas(&self.cluster, &self.cas);
        Ok(deleted)
    }

    /// Gossip counters: refused (forged, altered, replayed) values, live
    /// members, objects.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.cluster.stats()
    }

    /// The address other nodes gossip with this one on.
    pub fn gossip_addr(&self) -> std::net::SocketAddr {
        self.cluster.gossip_addr()
    }

    /// Stops applying changes, tells the others this node leaves, saves the
    /// snapshot. Idempotent.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.cluster.shutdown().await;
    }
}

/// Makes the store hold the cluster's CAs.
fn apply_cas(cluster: &Cluster, cas: &CaStore) {
    let records = cluster
        .list::<CaRecord>()
        .into_iter()
        .map(|(id, mut record)| {
            // The gossip key is what was signed; the id inside must agree.
            record.id = id;
            record
        })
        .collect();
    if let Err(e) = cas.replace_all(records) {
        tracing::warn!(error = %e, "applying the cluster's certificate authorities");
    }
}

async fn follow(cluster: Cluster, cas: Arc<CaStore>, stop: CancellationToken) {
    let mut changes = cluster.subscribe();
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => break,
            change = changes.recv() => change,
        };
        match change {
            Ok(Change::Config(kind)) if kind == CaRecord::KIND => apply_cas(&cluster, &cas),
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => apply_cas(&cluster, &cas),
            Err(RecvError::Closed) => break,
        }
    }
}
