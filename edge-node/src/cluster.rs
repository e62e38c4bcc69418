//! This node's part in a cluster (`[cluster]` in the config): it joins the
//! gossip of the other nodes through config-sync, from a seed list, and
//! keeps two things in step with the cluster's objects:
//!
//! - the certificate-authority store: a CA uploaded or deleted through the
//!   admin API of any node is written to the cluster (signed, merged by
//!   hybrid logical clock, tombstoned on delete) and every node's store
//!   follows it, each CA checked again on arrival as an upload is;
//! - the API credentials (authtokens created through `/credentials`, kept
//!   as SHA-256 hashes with their ACLs): an agent may connect to any node
//!   with one, and a credential deleted anywhere closes its sessions
//!   everywhere.
//!
//! Without `[cluster]` the node keeps its CAs on its own and has no API
//! credentials.

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

use crate::{
    acl::Acl,
    auth::{AuthtokenRecord, Authtokens},
    ca_store::{CaRecord, CaStore, StoredCa},
    session::Registry,
};

pub use config::{ClusterConfig, RawCluster};

impl Kind for CaRecord {
    const KIND: &'static str = "ca";
}

/// An authtoken created through the admin API (`/credentials`): only its
/// hash is kept, with ngrok's `acl` rules.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Credential {
    pub token_sha256: String,
    #[serde(default)]
    pub acl: Vec<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    pub created_at: String,
}

impl Kind for Credential {
    const KIND: &'static str = "credential";
}

/// The node's membership and the task that applies the cluster's CAs and
/// credentials.
pub struct ClusterNode {
    cluster: Cluster,
    cas: Arc<CaStore>,
    tokens: Arc<Authtokens>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn cluster_failure(e: postern_config_sync::ClusterError) -> Failure {
    Failure::new(ErrorCode::INTERNAL, format!("cluster: {e}"))
}

impl ClusterNode {
    /// Joins the cluster (the snapshot in `data_dir` gives the config before
    /// gossip catches up) and applies its CAs to `cas` and its credentials
    /// to `tokens`; [`ClusterNode::follow`] keeps them applied.
    pub async fn start(
        config: &ClusterConfig,
        node_id: &str,
        region: &str,
        data_dir: &Path,
        cas: Arc<CaStore>,
        tokens: Arc<Authtokens>,
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
        apply_credentials(&cluster, &tokens);
        Ok(ClusterNode {
            cluster,
            cas,
            tokens,
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        })
    }

    /// Applies every change as it is merged, and closes the sessions of
    /// revoked credentials in `registry`.
    pub fn follow(&self, registry: Arc<Registry>) {
        // Subscribed before applying, so a change merged in between is
        // applied here or seen by the task, never lost.
        let changes = self.cluster.subscribe();
        apply_cas(&self.cluster, &self.cas);
        apply_credentials(&self.cluster, &self.tokens);
        registry.revalidate();
        let task = tokio::spawn(follow(
            changes,
            self.cluster.clone(),
            self.cas.clone(),
            self.tokens.clone(),
            registry,
            self.stop.clone(),
        ));
        *self.task.lock().expect("task lock") = Some(task);
    }

    /// Creates a credential: a new authtoken, returned once, whose hash
    /// every node learns.
    pub async fn create_credential(
        &self,
        acl: Vec<String>,
        description: String,
        metadata: String,
    ) -> Result<(String, String, Credential), Failure> {
        Acl::parse(&acl)
            .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("acl: {e:#}")))?;
        let token = postern_ingress::random_id("pt_");
        let record = AuthtokenRecord::from_token(&token, Acl::default(), String::new())
            .map_err(|e| Failure::new(ErrorCode::INTERNAL, format!("a new token: {e:#}")))?;
        let id = postern_ingress::random_id("cr_");
        let credential = Credential {
            token_sha256: record.sha256,
            acl,
            description,
            metadata,
            created_at: crate::ca_store::now_rfc3339(),
        };
        self.cluster
            .put(&id, &credential)
            .await
            .map_err(cluster_failure)?;
        apply_credentials(&self.cluster, &self.tokens);
        Ok((id, token, credential))
    }

    /// Every credential, by id.
    pub fn credentials(&self) -> Vec<(String, Credential)> {
        self.cluster.list::<Credential>()
    }

    /// Revokes a credential cluster-wide; `false` when there is none.
    pub async fn delete_credential(&self, id: &str) -> Result<bool, Failure> {
        let deleted = self
            .cluster
            .delete::<Credential>(id)
            .await
            .map_err(cluster_failure)?;
        apply_credentials(&self.cluster, &self.tokens);
        Ok(deleted)
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

/// Makes the API credentials those of the cluster; a credential whose ACL
/// does not parse is left out.
fn apply_credentials(cluster: &Cluster, tokens: &Authtokens) {
    let records = cluster
        .list::<Credential>()
        .into_iter()
        .filter_map(|(id, c)| {
            let acl = Acl::parse(&c.acl)
                .inspect_err(
                    |e| tracing::warn!(id, error = %e, "a credential from the cluster is refused"),
                )
                .ok()?;
            let description = format!("credential {id}");
            AuthtokenRecord::from_sha256_hex(&c.token_sha256, acl, description)
                .inspect_err(
                    |e| tracing::warn!(id, error = %e, "a credential from the cluster is refused"),
                )
                .ok()
        })
        .collect();
    tokens.set_credentials(records);
}

async fn follow(
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    cluster: Cluster,
    cas: Arc<CaStore>,
    tokens: Arc<Authtokens>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => break,
            change = changes.recv() => change,
        };
        match change {
            Ok(Change::Config(kind)) if kind == CaRecord::KIND => apply_cas(&cluster, &cas),
            Ok(Change::Config(kind)) if kind == Credential::KIND => {
                apply_credentials(&cluster, &tokens);
                registry.revalidate();
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                apply_cas(&cluster, &cas);
                apply_credentials(&cluster, &tokens);
                registry.revalidate();
            }
            Err(RecvError::Closed) => break,
        }
    }
}
