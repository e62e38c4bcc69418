//! Cluster config and live routing state for Postern edge nodes, gossiped
//! with chitchat. This is the only crate that imports chitchat: the rest of
//! Postern sees a [`Cluster`] handle, typed objects ([`Kind`]), a change
//! stream ([`Change`]) and nothing of the gossip library.
//!
//! - **Signed.** Every value is an envelope signed with the cluster key
//!   (HMAC-SHA256) and naming its own key; a forged, altered or misplaced
//!   value is refused and counted before anything reads it.
//! - **Merged.** Config objects can be written at any node. Every node
//!   keeps a copy of every object in its own key space; the winner is the
//!   copy with the highest hybrid-logical-clock timestamp (ties: node id),
//!   deletions are tombstones that win the same way, and every node
//!   re-publishes the winner, so an object outlives the node that took it.
//! - **Live state** (which node serves what) is read only from live nodes
//!   (chitchat's phi-accrual detector), so a dead node's routes vanish.
//! - **Durable.** The merged config is snapshotted to disk and loaded at
//!   start, before gossip catches up.
//!
//! It must never depend on the gateway, the edge or the agent.

mod cluster;
mod envelope;
mod hlc;
mod key;
mod snapshot;
mod transport;

use std::path::PathBuf;

pub use cluster::{Change, Cluster, ClusterSettings, Kind, Local, Member};
pub use hlc::Hlc;
pub use key::{ClusterKey, MIN_SECRET_LEN, WeakKey};
pub use transport::{GossipTransport, InMemoryNetwork, Partition};

/// What can go wrong joining or writing.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{field}: {reason}")]
    Settings { field: String, reason: String },
    #[error("gossip: {0}")]
    Gossip(String),
    #[error("the cluster snapshot {}: {reason}", path.display())]
    Snapshot { path: PathBuf, reason: String },
    #[error("the value for {key} is {size} bytes; at most {max}")]
    TooLarge {
        key: String,
        size: usize,
        max: usize,
    },
    #[error("encoding a value: {0}")]
    Encode(String),
}
