//! Keeps the node in step with the cluster: routes names other nodes serve
//! (mirrors, forwarded over the link), keeps pools' lists of holding nodes
//! current (a dead node's go with it), resolves a name bound by two owners
//! on two nodes (the earlier bind wins; the loser's sessions are closed
//! with `ERR_POSTERN_334`), and disconnects agents whose credential was
//! revoked anywhere.

use std::{collections::BTreeMap, sync::Arc};

use postern_config_sync::{Change, Kind};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{
    ClusterNode,
    link::Holder,
    objects::{BotUser, Credential, RouteEntry},
};
use crate::session::Registry;

/// The running sync task.
pub struct SyncHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SyncHandle {
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub fn spawn(node: Arc<ClusterNode>, registry: Arc<Registry>) -> SyncHandle {
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(node, registry, stop.clone()));
    SyncHandle { stop, task }
}

async fn run(node: Arc<ClusterNode>, registry: Arc<Registry>, stop: CancellationToken) {
    let mut changes = node.cluster.subscribe();
    mirror(&node, &registry).await;
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => break,
            change = changes.recv() => change,
        };
        match change {
            Ok(Change::Config(kind)) if kind == Credential::KIND || kind == BotUser::KIND => {
                registry.revalidate();
            }
            Ok(Change::Local(kind)) if kind == RouteEntry::KIND => mirror(&node, &registry).await,
            Ok(Change::Members) => mirror(&node, &registry).await,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                registry.revalidate();
                mirror(&node, &registry).await;
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// Makes the pools match what the other live nodes serve.
async fn mirror(node: &ClusterNode, registry: &Arc<Registry>) {
    if node.links.is_none() {
        return;
    }
    let mut remote: BTreeMap<String, Vec<(Holder, RouteEntry)>> = BTreeMap::new();
    let mut local_bound_at: BTreeMap<String, u64> = BTreeMap::new();
    for entry in node.cluster.locals::<RouteEntry>() {
        let route = entry.value;
        if entry.node.is_self {
            let at = local_bound_at.entry(route.name.clone()).or_insert(u64::MAX);
            *at = (*at).min(route.bound_at);
            continue;
        }
        let holder = Holder {
            node_id: entry.node.node_id.clone(),
            region: entry.node.region.clone(),
            rpc_addr: entry.node.rpc_addr,
            endpoint_id: route.endpoint_id.clone(),
        };
        remote.entry(route.name.clone()).or_default().push((holder, route));
    }
    let pools = registry.pools();
    let gateway = registry.gateway();
    for pool in pools.all() {
        let (_, _, key) = pool.bound();
        if !remote.contains_key(key) && !pool.remotes().is_empty() {
            pools.set_remotes(gateway, &key.to_string(), Vec::new());
        }
    }
    for (key, mut holders) in remote {
        holders.sort_by(|a, b| (a.1.bound_at, &a.0.node_id).cmp(&(b.1.bound_at, &b.0.node_id)));
        let first = holders[0].1.clone();
        let mut same: Vec<Holder> = Vec::new();
        for (holder, route) in &holders {
            if route.identity == first.identity && !same.iter().any(|h| h.node_id == holder.node_id) {
                same.push(holder.clone());
            }
        }
        match pools.by_key(&key) {
            Some(pool) if pool.identity == first.identity => pools.set_remotes(gateway, &key, same),
            Some(pool) => {
                let ours = local_bound_at.get(&key).copied().unwrap_or(u64::MAX);
                let theirs = (first.bound_at, holders[0].0.node_id.as_str());
                let mine = (ours, node.cluster.node_id());
                if !pool.local_sessions().is_empty() && theirs < mine {
                    tracing::warn!(name = %key, winner = %holders[0].0.node_id, "name bound by two owners on two nodes; the earlier bind wins");
                    registry.evict(&pool);
                } else if pool.local_sessions().is_empty() {
                    pools.set_remotes(gateway, &key, Vec::new());
                }
            }
            None => match registry.mirror_spec(&first).await {
                Ok(spec) => {
                    if let Err(e) = pools.add_mirror(gateway, spec, &first.identity, same) {
                        tracing::debug!(name = %key, error = %e, "cannot route a name served elsewhere here");
                    }
                }
                Err(e) => tracing::warn!(name = %key, error = %e, "a route from another node cannot be rebuilt here"),
            },
        }
    }
}
