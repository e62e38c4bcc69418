//! The node's durable copy of the cluster config: the winning envelope of
//! every object (tombstones included), as signed, in one JSON file written
//! atomically. A restarted node, or a whole cluster started cold, serves
//! its last config before gossip catches up; entries are verified again on
//! load, so an edited file gains nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClusterError;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u32,
    /// `(gossip key, envelope)` pairs.
    pub entries: Vec<(String, String)>,
}

pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-config.json")
}

pub(crate) fn load(path: &Path) -> Result<Snapshot, ClusterError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ClusterError::Snapshot {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
        Err(e) => Err(ClusterError::Snapshot {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

pub(crate) fn save(path: &Path, snapshot: &Snapshot) -> Result<(), ClusterError> {
    let text = serde_json::to_string(snapshot).expect("snapshots serialise");
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| ClusterError::Snapshot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
