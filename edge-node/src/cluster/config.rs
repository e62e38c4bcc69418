//! `[cluster]`: how a node joins the others. Without it the node runs
//! alone and keeps its admin objects in its own files.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use postern_config_sync::ClusterKey;
use postern_net::Secret;
use serde::Deserialize;

use crate::{
    config::duration,
    error::{ConfigError, invalid},
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Name of the cluster; nodes gossip only with the same id. Required.
    pub cluster_id: String,
    /// The shared secret (at least 32 characters) that signs every gossiped
    /// value and derives the internal CA. Give this or `key_file`.
    pub key: Option<Secret>,
    /// A file holding the secret (trimmed), e.g. a mounted Kubernetes Secret.
    pub key_file: Option<PathBuf>,
    /// UDP address for gossip. Default `0.0.0.0:7946`.
    pub gossip_listen: Option<String>,
    /// Gossip address the other nodes use. Default: `gossip_listen`, which
    /// then must not be `0.0.0.0`.
    pub gossip_advertise: Option<String>,
    /// `host:port` gossip addresses of other nodes (names are resolved again
    /// while running, so a headless Kubernetes service works).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Gossip round interval. Default `1s`.
    pub gossip_interval: Option<String>,
    /// Phi-accrual threshold: a node silent for about this many mean
    /// heartbeat intervals is dead. Default 6 (≈ 6–7 s at 1 s gossip).
    pub phi_threshold: Option<f64>,
    /// How long deletions are remembered; a node cut off for longer can
    /// bring a deleted object back. Default `7d`.
    pub tombstone_ttl: Option<String>,
    /// TCP address of the link between nodes (gRPC over mutual TLS), over
    /// which visitors reach agents connected to other nodes. Without it
    /// this node serves only its own agents and is not forwarded to.
    pub rpc_listen: Option<String>,
    /// The link address the other nodes dial. Default: `rpc_listen`, which
    /// then must not be `0.0.0.0`.
    pub rpc_advertise: Option<String>,
    /// `host:port` agents dial to reach this node, told to agents of its
    /// region as where to reconnect when their node goes away. Default:
    /// `listen.agent` unless that is `0.0.0.0`.
    pub agent_advertise: Option<String>,
    /// `/readyz` says not ready until the node has caught up with a peer's
    /// config (a peer seen and two gossip rounds without a config change),
    /// or, when no peer answers, until this long after the start: then it
    /// serves the config of its snapshot (the first node of a cluster
    /// started cold). Default `10s`.
    pub catch_up_timeout: Option<String>,
}

/// Validated `[cluster]`.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub cluster_id: String,
    pub key: ClusterKey,
    pub gossip_listen: SocketAddr,
    pub gossip_advertise: Option<SocketAddr>,
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub tombstone_ttl: Duration,
    pub rpc_listen: Option<SocketAddr>,
    pub rpc_advertise: Option<SocketAddr>,
    pub agent_advertise: Option<String>,
    pub catch_up_timeout: Duration,
}

fn addr(field: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or(default);
    v.parse().map_err(|e| {
        ConfigError::field(
            format!("{field}: {v:?} is not an address like \"0.0.0.0:7946\""),
            e,
        )
    })
}

impl RawCluster {
    pub fn validate(self) -> Result<ClusterConfig, ConfigError> {
        if self.cluster_id.trim().is_empty() {
            return Err(invalid!("cluster.cluster_id: must not be empty"));
        }
        let secret = match (self.key, self.key_file) {
            (Some(k), None) => k,
            (None, Some(path)) => Secret::new(
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        ConfigError::field(
                            format!("cluster.key_file: reading {}", path.display()),
                            e,
                        )
                    })?
                    .trim(),
            ),
            _ => return Err(invalid!("cluster: give exactly one of key and key_file")),
        };
        let key = ClusterKey::from_secret(secret.expose())
            .map_err(|e| ConfigError::field("cluster.key", e))?;
        let gossip_listen = addr(
            "cluster.gossip_listen",
            self.gossip_listen.as_deref(),
            "0.0.0.0:7946",
        )?;
        let gossip_advertise = self
            .gossip_advertise
            .as_deref()
            .map(|a| addr("cluster.gossip_advertise", Some(a), ""))
            .transpose()?;
        if gossip_advertise.is_none() && gossip_listen.ip().is_unspecified() {
            return Err(invalid!(
                "cluster.gossip_advertise: required when cluster.gossip_listen is {gossip_listen}"
            ));
        }
        let phi_threshold = self.phi_threshold.unwrap_or(6.0);
        if !(1.0..=50.0).contains(&phi_threshold) {
            return Err(invalid!(
                "cluster.phi_threshold: {phi_threshold} is outside 1–50"
            ));
        }
        let gossip_interval = duration(
            "cluster.gossip_interval",
            &self.gossip_interval,
            Duration::from_secs(1),
        )?;
        if gossip_interval < Duration::from_millis(10) {
            return Err(invalid!("cluster.gossip_interval: at least 10ms"));
        }
        let rpc_listen = self
            .rpc_listen
            .as_deref()
            .map(|a| addr("cluster.rpc_listen", Some(a), ""))
            .transpose()?;
        let rpc_advertise = self
            .rpc_advertise
            .as_deref()
            .map(|a| addr("cluster.rpc_advertise", Some(a), ""))
            .transpose()?;
        match (rpc_listen, rpc_advertise) {
            (None, Some(_)) => {
                return Err(invalid!("cluster.rpc_advertise: needs cluster.rpc_listen"));
            }
            (Some(listen), None) if listen.ip().is_unspecified() => {
                return Err(invalid!(
                    "cluster.rpc_advertise: required when cluster.rpc_listen is {listen}"
                ));
            }
            _ => {}
        }
        if let Some(agent) = &self.agent_advertise
            && agent
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(invalid!(
                "cluster.agent_advertise: {agent:?} is not host:port"
            ));
        }
        Ok(ClusterConfig {
            rpc_listen,
            rpc_advertise,
            agent_advertise: self.agent_advertise,
            cluster_id: self.cluster_id,
            key,
            gossip_listen,
            gossip_advertise,
            seeds: self.seeds,
            gossip_interval,
            phi_threshold,
            tombstone_ttl: duration(
                "cluster.tombstone_ttl",
                &self.tombstone_ttl,
                Duration::from_secs(7 * 24 * 3600),
            )?,
            catch_up_timeout: duration(
                "cluster.catch_up_timeout",
                &self.catch_up_timeout,
                Duration::from_secs(10),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ClusterConfig> {
        Ok(toml::from_str::<RawCluster>(text)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .validate()?)
    }

    #[test]
    fn errors_name_the_field() {
        let key = "key = \"0123456789abcdef0123456789abcdef\"";
        for (text, field) in [
            (format!("cluster_id = \"\"\n{key}"), "cluster.cluster_id"),
            (
                "cluster_id = \"c\"\nkey = \"short\"".to_string(),
                "cluster.key",
            ),
            ("cluster_id = \"c\"".to_string(), "key_file"),
            (
                format!("cluster_id = \"c\"\n{key}"),
                "cluster.gossip_advertise",
            ),
            (
                format!("cluster_id = \"c\"\n{key}\ngossip_listen = \"x\""),
                "cluster.gossip_listen",
            ),
            (
                format!(
                    "cluster_id = \"c\"\n{key}\ngossip_listen = \"127.0.0.1:0\"\nphi_threshold = 0.1"
                ),
                "cluster.phi_threshold",
            ),
            (
                format!(
                    "cluster_id = \"c\"\n{key}\ngossip_listen = \"127.0.0.1:0\"\nrpc_listen = \"0.0.0.0:7947\""
                ),
                "cluster.rpc_advertise",
            ),
            (
                format!(
                    "cluster_id = \"c\"\n{key}\ngossip_listen = \"127.0.0.1:0\"\nrpc_listen = \"nowhere\""
                ),
                "cluster.rpc_listen",
            ),
            (
                format!(
                    "cluster_id = \"c\"\n{key}\ngossip_listen = \"127.0.0.1:0\"\nagent_advertise = \"edge-1\""
                ),
                "cluster.agent_advertise",
            ),
        ] {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(field), "{field:?} not named in: {err}");
        }
        let ok = parse(&format!(
            "cluster_id = \"c\"\n{key}\ngossip_listen = \"127.0.0.1:0\""
        ))
        .unwrap();
        assert_eq!(ok.gossip_interval, Duration::from_secs(1));
        assert!(format!("{ok:?}").contains("********"));
        assert!(!format!("{ok:?}").contains("0123456789abcdef"));
    }
}
