//! This node's part in the cluster: joins the gossip (config-sync), holds
//! the internal CA and the inter-node link, and answers the questions the
//! rest of the node asks of cluster config — is this token an API
//! credential, may this owner use this agent ingress, who reserved this
//! domain. Without `[cluster]` the node is a cluster of one: the same
//! objects and API, kept in its snapshot, with no peers.

pub mod config;
pub mod link;
pub mod objects;
pub mod pki;
pub mod sync;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use postern_config_sync::{Cluster, ClusterKey, ClusterSettings, GossipTransport, InMemoryNetwork};
use postern_ingress::DomainPattern;
use postern_proto::{ErrorCode, Failure};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{acl::Acl, auth::AuthtokenRecord, config::EdgeConfig, session::Registry};
use objects::{AgentIngress, BotUser, Credential, EndpointPolicyObject, ReservedDomain};
use pki::ClusterCa;

pub use config::{ClusterConfig, RawCluster};

/// The node's membership, CA and link.
pub struct ClusterNode {
    pub cluster: Cluster,
    pub ca: Arc<ClusterCa>,
    /// Forwarding to other nodes; `None` for a cluster of one.
    pub links: Option<Arc<link::Links>>,
    pub region: String,
    rpc: std::sync::Mutex<Option<TcpListener>>,
    rpc_task: std::sync::Mutex<Option<(CancellationToken, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>)>>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The time format of API objects.
pub fn timestamp() -> String {
    now_rfc3339()
}

/// The key of a cluster of one: random, kept in the data directory.
fn standalone_key(data_dir: &std::path::Path) -> anyhow::Result<ClusterKey> {
    let path = data_dir.join("cluster.key");
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().to_string(),
        Err(_) => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            std::fs::create_dir_all(data_dir)?;
            std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
            secret
        }
    };
    Ok(ClusterKey::from_secret(&secret)?)
}

/// A cluster of one on an in-process network, its config in `data_dir`.
pub async fn standalone(node_id: &str, region: &str, data_dir: &std::path::Path) -> anyhow::Result<Cluster> {
    let key = standalone_key(data_dir)?;
    Ok(Cluster::start(ClusterSettings {
        cluster_id: format!("standalone-{node_id}"),
        node_id: node_id.to_string(),
        region: region.to_string(),
        key,
        transport: GossipTransport::InMemory {
            network: InMemoryNetwork::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
        },
        seeds: Vec::new(),
        gossip_interval: Duration::from_secs(1),
        phi_threshold: 6.0,
        tombstone_ttl: Duration::from_secs(7 * 24 * 3600),
        data_dir: Some(data_dir.to_path_buf()),
        rpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    })
    .await?)
}

impl ClusterNode {
    /// Joins the cluster of `[cluster]`, or starts a cluster of one.
    pub async fn start(config: &EdgeConfig) -> anyhow::Result<Arc<ClusterNode>> {
        let (cluster, ca, links, rpc) = match &config.cluster {
            None => {
                let cluster = standalone(&config.node_id, &config.region, &config.data_dir).await?;
                let ca = ClusterCa::derive(&standalone_key(&config.data_dir)?, "standalone")?;
                (cluster, ca, None, None)
            }
            Some(c) => {
                let rpc = TcpListener::bind(c.rpc_listen)
                    .await
                    .with_context(|| format!("cluster.rpc_listen: binding {}", c.rpc_listen))?;
                let bound = rpc.local_addr()?;
                let rpc_addr = match c.rpc_advertise {
                    Some(a) => a,
                    None => bound,
                };
                let cluster = Cluster::start(ClusterSettings {
                    cluster_id: c.cluster_id.clone(),
                    node_id: config.node_id.clone(),
                    region: config.region.clone(),
                    key: c.key.clone(),
                    transport: GossipTransport::Udp {
                        listen: c.gossip_listen,
                        advertise: c.gossip_advertise,
                    },
                    seeds: c.seeds.clone(),
                    gossip_interval: c.gossip_interval,
                    phi_threshold: c.phi_threshold,
                    tombstone_ttl: c.tombstone_ttl,
                    data_dir: Some(config.data_dir.clone()),
                    rpc_addr,
                })
                .await?;
                let ca = ClusterCa::derive(&c.key, &c.cluster_id)?;
                let links = link::Links::new(config.node_id.clone(), &ca, c.forward_timeout)?;
                (cluster, ca, Some(Arc::new(links)), Some(rpc))
            }
        };
        let ca_path = config.data_dir.join(pki::CA_FILE);
        std::fs::create_dir_all(&config.data_dir)?;
        std::fs::write(&ca_path, ca.cert_pem())
            .with_context(|| format!("writing {}", ca_path.display()))?;
        Ok(Arc::new(ClusterNode {
            cluster,
            ca: Arc::new(ca),
            links,
            region: config.region.clone(),
            rpc: std::sync::Mutex::new(rpc),
            rpc_task: std::sync::Mutex::new(None),
        }))
    }

    /// Starts the inter-node link's server (in a cluster of more than one).
    pub fn serve_link(&self, registry: Arc<Registry>) -> anyhow::Result<()> {
        let Some(listener) = self.rpc.lock().expect("rpc lock").take() else {
            return Ok(());
        };
        let stop = CancellationToken::new();
        let task = link::serve(listener, &self.ca, registry, stop.clone())?;
        *self.rpc_task.lock().expect("rpc lock") = Some((stop, task));
        Ok(())
    }

    /// Stops the link and leaves the gossip.
    pub async fn shutdown(&self) {
        let task = self.rpc_task.lock().expect("rpc lock").take();
        if let Some((stop, task)) = task {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.cluster.shutdown().await;
    }

    /// An API credential's record for a presented token's hash, if the
    /// credential exists and its owner (if any) is an active bot user.
    pub fn credential(&self, sha256: &str) -> Option<AuthtokenRecord> {
        let (id, cred) = self
            .cluster
            .list::<Credential>()
            .into_iter()
            .find(|(_, c)| c.token_sha256 == sha256)?;
        if let Some(owner) = &cred.owner_id
            && !self.cluster.get::<BotUser>(owner).is_some_and(|b| b.active)
        {
            return None;
        }
        let acl = Acl::parse(&cred.acl).ok()?;
        let mut record = AuthtokenRecord::from_sha256_hex(sha256, acl, cred.description).ok()?;
        record.owner_id = cred.owner_id;
        record.credential_id = Some(id);
        Some(record)
    }

    /// Refuses an agent that came in through an agent ingress of another
    /// owner. `sni` is the name the agent dialled.
    pub fn check_ingress(&self, sni: Option<&str>, owner: Option<&str>) -> Result<(), Failure> {
        let Some(sni) = sni else { return Ok(()) };
        let sni = sni.to_ascii_lowercase();
        let Some(domain) = sni.strip_prefix(&format!("tunnel.{}.", self.region)) else {
            return Ok(());
        };
        for (id, ingress) in self.cluster.list::<AgentIngress>() {
            if ingress.domain != domain {
                continue;
            }
            if let Some(required) = &ingress.owner_id
                && owner != Some(required.as_str())
            {
                return Err(Failure::new(
                    ErrorCode::AGENT_INGRESS_NOT_PERMITTED,
                    format!("agent ingress {id} ({sni}) belongs to {required}; this authtoken's owner may not use it"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a bind on a name someone else reserved (the reservation
    /// covers its subdomains; a wider wildcard over it overlaps too).
    pub fn check_reserved(&self, pattern: &DomainPattern, owner: Option<&str>) -> Result<(), Failure> {
        for (id, reserved) in self.cluster.list::<ReservedDomain>() {
            let Ok(r) = DomainPattern::parse(&reserved.domain) else { continue };
            let covered = r.covers(pattern) || pattern.covers(&r) || subdomain_of(pattern, &r);
            if covered && reserved.owner_id.as_deref() != owner {
                return Err(Failure::new(
                    ErrorCode::DOMAIN_RESERVED,
                    format!("{pattern} is reserved ({id}, {}) for another owner", reserved.domain),
                ));
            }
        }
        Ok(())
    }

    /// `tunnel.<region>.<domain>` for every region of the cluster.
    pub fn region_domains(&self, domain: &str) -> Vec<String> {
        self.cluster
            .regions()
            .into_iter()
            .map(|r| format!("tunnel.{r}.{domain}"))
            .collect()
    }

    /// The mTLS CA ids the cluster's endpoint policies require for a name.
    pub fn policy_cas(&self, domain: &DomainPattern) -> Vec<String> {
        self.cluster
            .list::<EndpointPolicyObject>()
            .into_iter()
            .filter(|(_, p)| DomainPattern::parse(&p.domain).is_ok_and(|d| d.covers(domain)))
            .flat_map(|(_, p)| p.mutual_tls_cas)
            .collect()
    }
}

/// `a.example.com` under an exact reservation of `example.com`.
fn subdomain_of(pattern: &DomainPattern, reserved: &DomainPattern) -> bool {
    match reserved {
        DomainPattern::Exact(name) => {
            let s = pattern.to_string();
            s.ends_with(&format!(".{name}"))
        }
        DomainPattern::Wildcard(_) => false,
    }
}
