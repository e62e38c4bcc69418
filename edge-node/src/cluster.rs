//! This node's part in a cluster (`[cluster]` in the config): it joins the
//! gossip of the other nodes through config-sync, from a seed list, and
//! keeps two things in step with the cluster's objects:
//!
//! - the certificate-authority store: a CA uploaded or deleted through the
//!   admin API of any node is written to the cluster (signed, merged by
//!   hybrid logical clock, tombstoned on delete) and every node's store
//!   follows it, each CA checked again on arrival as an upload is;
//! - the API credentials (authtokens created through `/credentials`, kept
//!   as SHA-256 hashes with their ACLs, and SSH public keys registered
//!   through `/ssh_credentials`): an agent or SSH client may connect to any
//!   node with one, and a credential deleted anywhere closes its sessions
//!   everywhere.
//!
//! - bot users, reserved domains and agent ingresses (`objects`): who owns
//!   credentials, which names only one owner may bind, and the names agents
//!   connect to, with certificates from the cluster's agent-ingress CA
//!   (`pki`);
//! - event subscriptions (`/event_subscriptions`): every node runs each
//!   of them for its own events, beside its edge config's;
//! - TLS certificates (`/tls_certificates`): every node serves each one
//!   by SNI from the gateway's certificate store;
//! - ACME (`crate::acme`): the certificates one node ordered for reserved
//!   domains, which a node without `[acme]` serves from here (a node with
//!   it installs them itself), and the challenge answers of an order in
//!   flight, which every node answers, since the CA may reach any node;
//! - the live routing state (`routes`): the endpoints and sessions of every
//!   node; the other nodes' endpoints are installed in this node's gateway
//!   and reached over the link between nodes (`crate::node_link`).
//!
//! Without `[cluster]` the node keeps its CAs on its own and has no API
//! credentials.

mod config;
mod objects;
mod pki;
mod routes;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use postern_config_sync::{Change, Cluster, ClusterSettings, GossipTransport, Kind, Local, Member};
use postern_events::{RuntimeSubscriptions, Subscription};
use postern_ingress::{
    AcmeChallenges, CertSource, CertStore, DevCa, DomainPattern, EndpointSpec, Protocol,
    ServingCert,
};
use postern_net::TlsError;
use postern_proto::{ErrorCode, Failure};
use tokio::{net::TcpListener, sync::broadcast::error::RecvError, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    acl::Acl,
    acme::{
        Acme, AcmeAnswer, AcmeCertificate, RemoteAnswers, prune_shared_certificates,
        shared_certificates,
    },
    auth::{AuthtokenRecord, Authtokens, CredentialRef},
    ca_store::{CaRecord, CaStore},
    config::EndpointPolicy,
    node_link::{LinkError, NodeLinks},
    registry::SessionCommand,
    registry::{ClusterView, Registry},
    ssh::AuthorizedKey,
};

pub use config::{ClusterConfig, RawCluster};
pub use objects::{
    AgentIngress, BotUser, CertificatePolicy, EndpointPolicyRecord, EventSubscription, KeyType,
    ReservedDomain, TlsCertificate, bad, check_certificate, check_text, open_certificate,
    parse_domain,
};
pub use pki::{AgentCerts, IngressCerts};
use routes::RemoteEndpoints;
pub use routes::{EndpointAd, SessionAd, session_ad};

impl Kind for CaRecord {
    const KIND: &'static str = "ca";
}

/// A live member as unit tests make one: region `us`, no addresses.
#[cfg(test)]
pub(crate) fn test_member(node_id: &str, is_self: bool) -> Member {
    Member {
        node_id: node_id.into(),
        region: "us".into(),
        rpc_addr: None,
        agent_addr: None,
        gossip_addr: "127.0.0.1:1".parse().expect("an address"),
        generation: 1,
        is_self,
    }
}

/// What every credential of the admin API holds besides its secret.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CredentialCommon {
    /// ngrok's `bind:` rules; none: any name.
    #[serde(default)]
    pub acl: Vec<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    pub created_at: String,
    /// The bot user it belongs to, if any.
    #[serde(default)]
    pub owner_id: Option<String>,
}

/// An authtoken created through the admin API (`/credentials`): only its
/// hash is kept.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Credential {
    pub token_sha256: String,
    #[serde(flatten)]
    pub common: CredentialCommon,
}

impl Kind for Credential {
    const KIND: &'static str = "credential";
}

/// An SSH public key registered through the admin API
/// (`/ssh_credentials`): an SSH client logging in with it binds under its
/// `acl`, as an agent with a credential's token does.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SshCredential {
    /// The key as an `authorized_keys` line (`ssh-ed25519 AAAA… comment`).
    pub public_key: String,
    #[serde(flatten)]
    pub common: CredentialCommon,
}

impl Kind for SshCredential {
    const KIND: &'static str = "ssh_credential";
}

/// What a node joins with.
pub struct Joining<'a> {
    pub config: &'a ClusterConfig,
    pub node_id: &'a str,
    pub region: &'a str,
    pub data_dir: PathBuf,
    pub cas: Arc<CaStore>,
    pub tokens: Arc<Authtokens>,
    /// The gateway's certificates, where uploaded ones are served.
    pub certs: Arc<CertStore>,
    /// The link between nodes, when `rpc_listen` is set.
    pub link: Option<TcpListener>,
    /// Where agents reach this node.
    pub agent_addr: Option<String>,
    /// How long a forwarded visitor waits for a stream.
    pub stream_wait: Duration,
}

/// The node's membership, the task that applies the cluster's objects and
/// follows the other nodes' endpoints, and the one that announces this
/// node's.
pub struct ClusterNode {
    cluster: Cluster,
    cas: Arc<CaStore>,
    tokens: Arc<Authtokens>,
    certs: Arc<CertStore>,
    links: Arc<NodeLinks>,
    link_listener: Mutex<Option<TcpListener>>,
    ingress_certs: Arc<IngressCerts>,
    catch_up: CatchUp,
    gossip_interval: Duration,
    stop: CancellationToken,
    /// The follow task, then the announcer: stopped and joined in that
    /// order.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    link_server: Mutex<Option<JoinHandle<()>>>,
    /// The link listener's connection tasks.
    link_connections: TaskTracker,
    /// This node's certificate manager (`[acme]`), for the reserved
    /// domains' `certificate_management_status`.
    acme: OnceLock<Arc<Acme>>,
}

fn cluster_failure(e: postern_config_sync::ClusterError) -> Failure {
    Failure::new(ErrorCode::INTERNAL, format!("cluster: {e}"))
}

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("reading the address of the link listener (cluster.rpc_listen)")]
    LinkAddress(#[source] std::io::Error),
    #[error("joining the cluster")]
    Join(#[source] postern_config_sync::ClusterError),
    #[error("deriving the cluster's {which} CA from cluster.key")]
    Ca {
        which: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("the link between nodes")]
    Link(#[source] LinkError),
}

impl ClusterNode {
    /// Joins the cluster (the snapshot in `data_dir` gives the config before
    /// gossip catches up) and applies its CAs to `cas` and its credentials
    /// to `tokens`; [`ClusterNode::follow`] keeps them applied.
    pub async fn start(joining: Joining<'_>) -> Result<ClusterNode, JoinError> {
        let config = joining.config;
        let rpc_addr = match &joining.link {
            Some(listener) => Some(match config.rpc_advertise {
                Some(addr) => addr,
                None => listener.local_addr().map_err(JoinError::LinkAddress)?,
            }),
            None => None,
        };
        let cluster = Cluster::start(ClusterSettings {
            cluster_id: config.cluster_id.clone(),
            node_id: joining.node_id.to_string(),
            region: joining.region.to_string(),
            key: config.key.clone(),
            transport: GossipTransport::Udp {
                listen: config.gossip_listen,
                advertise: config.gossip_advertise,
            },
            seeds: config.seeds.clone(),
            gossip_interval: config.gossip_interval,
            phi_threshold: config.phi_threshold,
            tombstone_ttl: config.tombstone_ttl,
            data_dir: Some(joining.data_dir),
            rpc_addr,
            agent_addr: joining.agent_addr,
        })
        .await
        .map_err(JoinError::Join)?;
        let ca = |which, ca: Result<DevCa, TlsError>| {
            ca.map_err(|source| JoinError::Ca { which, source })
        };
        let node_ca = ca("node-link", pki::node_ca(&config.cluster_id, &config.key))?;
        let links = NodeLinks::new(joining.node_id, &node_ca, joining.stream_wait)
            .map_err(JoinError::Link)?;
        let ingress_certs = Arc::new(IngressCerts::new(
            ca(
                "agent ingress",
                pki::agent_ca(&config.cluster_id, &config.key),
            )?,
            joining.certs.clone(),
            joining.region,
        ));
        let node = ClusterNode {
            cluster,
            cas: joining.cas,
            tokens: joining.tokens,
            certs: joining.certs,
            links: Arc::new(links),
            link_listener: Mutex::new(joining.link),
            ingress_certs,
            catch_up: CatchUp::new(config.gossip_interval, config.catch_up_timeout),
            gossip_interval: config.gossip_interval,
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            link_server: Mutex::new(None),
            link_connections: TaskTracker::new(),
            acme: OnceLock::new(),
        };
        node.apply_all();
        Ok(node)
    }

    /// Makes this node's stores hold the cluster's objects.
    fn apply_all(&self) {
        apply_cas(&self.cluster, &self.cas);
        apply_credentials(&self.cluster, &self.tokens);
        apply_tls_certificates(&self.cluster, &self.certs);
        self.apply_acme_certificates();
        self.apply_ingresses();
    }

    /// Serves the certificates ACME issued to the cluster, on a node
    /// without `[acme]` (a node with it installs and keeps them itself).
    fn apply_acme_certificates(&self) {
        if self.acme.get().is_none() {
            self.certs
                .replace(CertSource::Acme, shared_certificates(self));
        }
    }

    fn apply_ingresses(&self) {
        let domains: BTreeSet<String> = self
            .cluster
            .list::<AgentIngress>()
            .into_iter()
            .map(|(_, ingress)| ingress.domain)
            .collect();
        self.ingress_certs.set_domains(domains);
    }

    /// Certificates for agents connecting through agent ingresses.
    pub fn ingress_certs(&self) -> Arc<IngressCerts> {
        self.ingress_certs.clone()
    }

    /// Applies every change as it is merged, closes the sessions of
    /// revoked credentials in `registry`, runs the cluster's event
    /// subscriptions in `events`, answers the other nodes' ACME challenges
    /// in `challenges`, and announces the sessions and endpoints of
    /// `registry` to the other nodes.
    pub fn follow(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        events: RuntimeSubscriptions,
        challenges: Arc<AcmeChallenges>,
    ) {
        let announcer = routes::spawn_announcer(
            self.cluster.clone(),
            registry.subscribe(),
            self.stop.clone(),
        );
        // Subscribed before applying, so a change merged in between is
        // applied here or seen by the task, never lost.
        let changes = self.cluster.subscribe();
        self.apply_all();
        registry.revalidate();
        if let Some(listener) = self.link_listener.lock().expect("link lock").take() {
            let server = self.links.serve(
                listener,
                registry.clone(),
                &self.link_connections,
                self.stop.clone(),
            );
            *self.link_server.lock().expect("link lock") = Some(server);
        }
        let answers = RemoteAnswers::new(challenges);
        let task = tokio::spawn(follow(changes, self.clone(), registry, events, answers));
        self.tasks
            .lock()
            .expect("tasks lock")
            .extend([task, announcer]);
    }

    /// Whether the node holds the cluster's config (see
    /// `catch_up_timeout`); once true, it stays true (a partitioned node
    /// keeps serving with its last config).
    pub fn caught_up(&self) -> bool {
        self.catch_up.done()
    }

    /// Gossip counters: refused (forged, altered, replayed) values, live
    /// members, objects.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut stats = self.cluster.stats();
        let shared = self.cluster.list::<AcmeCertificate>().len() as u64;
        stats.push(("acme_shared_certificates", shared));
        stats
    }

    /// Stops applying changes and announcing (once the announcements
    /// queued are written), tells the others this node leaves, saves the
    /// snapshot. Idempotent.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a cluster task failed");
            }
        }
        let server = self.link_server.lock().expect("link lock").take();
        self.link_connections.close();
        let stopped = async {
            if let Some(server) = server {
                let _ = server.await;
            }
            self.link_connections.wait().await;
            self.links.close().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .is_err()
        {
            tracing::warn!("the link between nodes did not stop within 5s");
        }
        self.cluster.shutdown().await;
    }

    /// Writes an object of the admin API to the cluster and applies it here
    /// at once (the other nodes apply it as it arrives).
    pub async fn put_object<T: Kind>(&self, id: &str, value: &T) -> Result<(), Failure> {
        self.cluster.put(id, value).await.map_err(cluster_failure)?;
        self.apply_all();
        Ok(())
    }

    /// Encrypts a secret of an object so that only the cluster's nodes can
    /// read it.
    pub fn seal(&self, plaintext: &[u8]) -> String {
        self.cluster.seal(plaintext)
    }

    /// A sealed secret as text; `None` when it was sealed with another key
    /// or is not UTF-8.
    pub fn open_sealed(&self, sealed: &str) -> Option<String> {
        self.cluster
            .open_sealed(sealed)
            .and_then(|plain| String::from_utf8(plain).ok())
    }

    /// Deletes an object cluster-wide; `false` when there is none.
    pub async fn delete_object<T: Kind>(&self, id: &str) -> Result<bool, Failure> {
        let deleted = self
            .cluster
            .delete::<T>(id)
            .await
            .map_err(cluster_failure)?;
        self.apply_all();
        Ok(deleted)
    }

    /// Changes to the cluster's objects and members, as they are taken.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.cluster.subscribe()
    }

    /// Publishes a value this node owns (gone when it leaves or dies).
    pub async fn publish_local<T: Kind>(&self, id: &str, value: &T) -> Result<(), Failure> {
        self.cluster
            .set_local(id, value)
            .await
            .map_err(cluster_failure)
    }

    /// Withdraws a value this node owns.
    pub async fn withdraw_local<T: Kind>(&self, id: &str) {
        self.cluster.remove_local::<T>(id).await
    }

    pub fn node_id(&self) -> &str {
        self.cluster.node_id()
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        self.cluster.region()
    }

    /// The gossip round; how fast news spreads scales with it.
    pub fn gossip_interval(&self) -> Duration {
        self.gossip_interval
    }

    /// The ids of the live nodes, this one included.
    pub fn member_ids(&self) -> Vec<String> {
        self.cluster
            .members()
            .into_iter()
            .map(|m| m.node_id)
            .collect()
    }

    /// Hands the node's certificate manager to the admin API.
    pub fn set_acme(&self, acme: Arc<Acme>) {
        let _ = self.acme.set(acme);
    }

    /// The gateway's certificates.
    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// The node's certificate manager, when it has `[acme]`.
    pub fn acme(&self) -> Option<&Arc<Acme>> {
        self.acme.get()
    }

    /// Every object of a kind, by id.
    pub fn objects<T: Kind>(&self) -> Vec<(String, T)> {
        self.cluster.list::<T>()
    }

    /// One object.
    pub fn object<T: Kind>(&self, id: &str) -> Option<T> {
        self.cluster.get::<T>(id)
    }

    /// Whether the CA store holds `id`.
    pub fn has_ca(&self, id: &str) -> bool {
        self.cas.get_stored(id).is_some()
    }

    /// Every region a node has announced.
    pub fn regions(&self) -> BTreeSet<String> {
        self.cluster.regions()
    }

    /// Live values of a kind (endpoints, sessions) of every live node.
    pub fn live<T: Kind>(&self) -> Vec<Local<T>> {
        self.cluster.locals::<T>()
    }

    /// Runs `command` on the agent session `id` of another node, over the
    /// link between nodes; `None` when no live node announces it.
    pub async fn remote_command(
        &self,
        id: &str,
        command: &SessionCommand,
    ) -> Option<Result<(), Failure>> {
        let local = self
            .cluster
            .locals::<routes::SessionAd>()
            .into_iter()
            .find(|l| l.id == id && !l.node.is_self)?;
        let node = &local.node.node_id;
        Some(match local.node.rpc_addr {
            Some(addr) => self.links.command(node, addr, id, command).await,
            None => Err(Failure::new(
                ErrorCode::NODE_UNREACHABLE,
                format!(
                    "tunnel session {id} is connected to node {node}, which has no rpc_listen; send the {} there",
                    command.name()
                ),
            )),
        })
    }
}

impl ClusterView for ClusterNode {
    /// Agent addresses of the other live nodes of this node's region.
    fn region_agent_addrs(&self) -> Vec<String> {
        self.cluster
            .members()
            .into_iter()
            .filter(|m: &Member| !m.is_self && m.region == self.cluster.region())
            .filter_map(|m| m.agent_addr)
            .collect()
    }

    /// Refuses an agent connecting through an agent ingress its token's
    /// owner may not use.
    fn check_ingress(&self, server_name: Option<&str>, owner: Option<&str>) -> Result<(), Failure> {
        let Some(domain) = server_name.and_then(|n| self.ingress_certs.ingress_of(n)) else {
            return Ok(());
        };
        let refused = self
            .cluster
            .list::<AgentIngress>()
            .into_iter()
            .find(|(_, ingress)| ingress.domain == domain)
            .and_then(|(id, ingress)| {
                let allowed = ingress.owner_id.is_none() || ingress.owner_id.as_deref() == owner;
                (!allowed).then_some((id, ingress))
            });
        match refused {
            Some((id, ingress)) => Err(Failure::new(
                ErrorCode::AGENT_INGRESS_NOT_PERMITTED,
                format!(
                    "agent ingress {id} ({}) belongs to {}; this authtoken belongs to {}",
                    ingress.domain,
                    ingress.owner_id.as_deref().unwrap_or("nobody"),
                    owner.unwrap_or("no bot user"),
                ),
            )),
            None => Ok(()),
        }
    }

    /// Refuses binding a name reserved for another owner.
    fn check_bind(&self, spec: &EndpointSpec, owner: Option<&str>) -> Result<(), Failure> {
        let Some(domain) = spec
            .domain
            .as_ref()
            .filter(|_| spec.protocol != Protocol::Tcp)
        else {
            return Ok(());
        };
        let reservations = self.cluster.list::<ReservedDomain>();
        match ReservedDomain::refusing(&reservations, domain, owner) {
            Some((id, reserved)) => Err(Failure::new(
                ErrorCode::DOMAIN_RESERVED,
                format!(
                    "{domain} falls under {} (reserved domain {id}), reserved for {}",
                    reserved.domain,
                    reserved
                        .owner_id
                        .as_deref()
                        .unwrap_or("tokens without an owner"),
                ),
            )),
            None => Ok(()),
        }
    }

    /// The endpoint policies of the cluster; one that does not parse is
    /// left out (and logged).
    fn endpoint_policies(&self) -> Vec<EndpointPolicy> {
        self.cluster
            .list::<EndpointPolicyRecord>()
            .into_iter()
            .filter_map(|(id, record)| {
                // Sealed with this cluster's key, which also signs every
                // value: it opens wherever the record verified.
                let traffic_policy = record
                    .traffic_policy_sealed
                    .as_deref()
                    .and_then(|sealed| self.cluster.open_sealed(sealed))
                    .and_then(|plain| String::from_utf8(plain).ok());
                EndpointPolicy::parse(&record.domain, record.mutual_tls_cas, traffic_policy)
                    .inspect_err(|(field, reason)| {
                        tracing::warn!(
                            id,
                            field,
                            reason,
                            "an endpoint policy from the cluster is refused"
                        )
                    })
                    .ok()
            })
            .collect()
    }
}

/// When a starting node holds the cluster's config: a peer was seen and
/// the config has not changed for two gossip rounds since, or no peer
/// answered within the timeout.
struct CatchUp {
    started: Instant,
    settle: Duration,
    timeout: Duration,
    state: Mutex<CatchUpState>,
}

#[derive(Default)]
struct CatchUpState {
    peer_seen: Option<Instant>,
    last_change: Option<Instant>,
    done: bool,
}

impl CatchUp {
    fn new(gossip_interval: Duration, timeout: Duration) -> CatchUp {
        CatchUp {
            started: Instant::now(),
            settle: gossip_interval * 2,
            timeout,
            state: Mutex::default(),
        }
    }

    fn members(&self, live: usize) {
        let mut state = self.state.lock().expect("catch-up lock");
        if live > 1 && state.peer_seen.is_none() {
            state.peer_seen = Some(Instant::now());
        }
    }

    fn config_changed(&self) {
        self.state.lock().expect("catch-up lock").last_change = Some(Instant::now());
    }

    fn done(&self) -> bool {
        let mut state = self.state.lock().expect("catch-up lock");
        let settled = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= self.settle);
        if !state.done {
            state.done = self.started.elapsed() >= self.timeout
                || (state.peer_seen.is_some()
                    && settled(state.peer_seen)
                    && settled(state.last_change));
        }
        state.done
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

/// Makes the API credentials those of the cluster: tokens and SSH keys of
/// active owners (or of none). One whose ACL or key does not parse is left
/// out.
fn apply_credentials(cluster: &Cluster, tokens: &Authtokens) {
    let active: HashMap<String, bool> = cluster
        .list::<BotUser>()
        .into_iter()
        .map(|(id, bot)| (id, bot.active))
        .collect();
    let usable = |owner: &Option<String>| {
        owner
            .as_ref()
            .is_none_or(|owner| active.get(owner).copied().unwrap_or(false))
    };
    let api_tokens = cluster
        .list::<Credential>()
        .into_iter()
        .filter(|(_, c)| usable(&c.common.owner_id))
        .filter_map(|(id, c)| credential_record(id, c.common, Ok(c.token_sha256)))
        .collect();
    let ssh_keys = cluster
        .list::<SshCredential>()
        .into_iter()
        .filter(|(_, c)| usable(&c.common.owner_id))
        .filter_map(|(id, c)| {
            let hash = AuthorizedKey::parse(&c.public_key).map(|key| key.sha256);
            credential_record(id, c.common, hash)
        })
        .collect();
    tokens.set_credentials(api_tokens, ssh_keys);
}

/// The record of the cluster's credential `id` (a token's or an SSH key's
/// `sha256`); `None`, logged, when it cannot be used.
fn credential_record(
    id: String,
    common: CredentialCommon,
    sha256: Result<String, String>,
) -> Option<AuthtokenRecord> {
    let refused = |e: &dyn std::fmt::Display| tracing::warn!(id, error = %e, "a credential from the cluster is refused");
    let acl = Acl::parse(&common.acl).inspect_err(|e| refused(e)).ok()?;
    let sha256 = sha256.inspect_err(|e| refused(e)).ok()?;
    let mut record = AuthtokenRecord::from_sha256_hex(&sha256, acl, format!("credential {id}"))
        .inspect_err(|e| refused(e))
        .ok()?;
    record.credential = Some(CredentialRef {
        id,
        owner_id: common.owner_id,
    });
    Some(record)
}

/// Makes the uploaded certificates served those of the cluster, and
/// those reserved domains name (`certificate_id`) served for their
/// domains first; one that cannot be served here (its key sealed with
/// another cluster key, or expired since) is left out and logged.
fn apply_tls_certificates(cluster: &Cluster, certs: &CertStore) {
    let serving: Vec<(String, ServingCert)> = cluster
        .list::<TlsCertificate>()
        .into_iter()
        .filter_map(|(id, stored)| {
            stored
                .serving(|sealed| cluster.open_sealed(sealed).and_then(|p| String::from_utf8(p).ok()))
                .inspect_err(|e| tracing::warn!(id, error = %e, "a TLS certificate from the cluster is not served"))
                .ok()
                .map(|cert| (id, cert))
        })
        .collect();
    let named = cluster
        .list::<ReservedDomain>()
        .into_iter()
        .filter_map(|(rd, reserved)| {
            let id = reserved.certificate_id?;
            let domain = DomainPattern::parse(&reserved.domain).ok()?;
            let Some((_, cert)) = serving.iter().find(|(other, _)| *other == id) else {
                tracing::warn!(
                    rd,
                    id,
                    "the certificate a reserved domain names is not served here"
                );
                return None;
            };
            let named = ServingCert {
                key: cert.key.clone(),
                names: vec![domain],
            };
            Some((rd, named))
        })
        .collect();
    certs.replace(CertSource::Uploaded, serving);
    certs.replace(CertSource::Named, named);
}

/// Makes the pipeline's runtime subscriptions the cluster's event
/// subscriptions. One that cannot run here (it does not validate, its
/// password was sealed with another key, its destination does not open)
/// is left out and logged; the others run.
async fn apply_event_subscriptions(cluster: &Cluster, events: &RuntimeSubscriptions) {
    let mut subscriptions: Vec<Subscription> = cluster
        .list::<EventSubscription>()
        .into_iter()
        .filter_map(|(id, stored)| {
            stored
                .runnable(&id, |sealed| cluster.open_sealed(sealed))
                .inspect_err(|e| tracing::warn!(id, error = %e, "an event subscription from the cluster is refused"))
                .ok()
        })
        .collect();
    let events = events.clone();
    let applied = tokio::task::spawn_blocking(move || {
        loop {
            let error = match events.set(subscriptions.clone()) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let Some(id) = error.subscription_id().map(str::to_string) else {
                return Err(error);
            };
            tracing::warn!(id, error = %error, "an event subscription from the cluster does not run here");
            subscriptions.retain(|s| s.id != id);
        }
    })
    .await;
    match applied {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "applying the cluster's event subscriptions"),
        Err(e) => tracing::warn!(error = %e, "applying the cluster's event subscriptions"),
    }
}

async fn follow(
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    node: Arc<ClusterNode>,
    registry: Arc<Registry>,
    events: RuntimeSubscriptions,
    mut answers: RemoteAnswers,
) {
    apply_event_subscriptions(&node.cluster, &events).await;
    answers.apply(&node).await;
    let mut remote = RemoteEndpoints::default();
    remote
        .reconcile(&node.cluster, &registry, &node.links)
        .await;
    node.catch_up.members(node.cluster.members().len());
    loop {
        let change = tokio::select! {
            _ = node.stop.cancelled() => break,
            change = changes.recv() => change,
        };
        match &change {
            Ok(Change::Config(_)) | Err(RecvError::Lagged(_)) => node.catch_up.config_changed(),
            Ok(Change::Members) => node.catch_up.members(node.cluster.members().len()),
            _ => {}
        }
        match change {
            Ok(Change::Config(kind)) if kind == CaRecord::KIND => {
                apply_cas(&node.cluster, &node.cas)
            }
            Ok(Change::Config(kind))
                if kind == Credential::KIND
                    || kind == SshCredential::KIND
                    || kind == BotUser::KIND =>
            {
                apply_credentials(&node.cluster, &node.tokens);
                registry.revalidate();
            }
            Ok(Change::Config(kind)) if kind == TlsCertificate::KIND => {
                apply_tls_certificates(&node.cluster, &node.certs)
            }
            Ok(Change::Config(kind)) if kind == EndpointPolicyRecord::KIND => {
                registry.apply_policies().await;
                remote
                    .reconcile(&node.cluster, &registry, &node.links)
                    .await;
            }
            Ok(Change::Config(kind)) if kind == EventSubscription::KIND => {
                apply_event_subscriptions(&node.cluster, &events).await
            }
            Ok(Change::Config(kind))
                if kind == ReservedDomain::KIND
                    || kind == AcmeCertificate::KIND
                    || kind == AgentIngress::KIND =>
            {
                if kind == AgentIngress::KIND {
                    node.apply_ingresses();
                }
                if kind == ReservedDomain::KIND {
                    apply_tls_certificates(&node.cluster, &node.certs);
                }
                node.apply_acme_certificates();
                answers.apply(&node).await;
                prune_shared_certificates(&node).await;
            }
            Ok(Change::Local(kind)) if kind == AcmeAnswer::KIND => answers.apply(&node).await,
            Ok(Change::Local(kind)) if kind == EndpointAd::KIND => {
                remote
                    .reconcile(&node.cluster, &registry, &node.links)
                    .await;
            }
            Ok(Change::Members) => {
                let live: BTreeSet<String> = node
                    .cluster
                    .members()
                    .into_iter()
                    .map(|m| m.node_id)
                    .collect();
                node.links.retain(&live);
                remote
                    .reconcile(&node.cluster, &registry, &node.links)
                    .await;
                answers.apply(&node).await;
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                node.apply_all();
                registry.revalidate();
                registry.apply_policies().await;
                apply_event_subscriptions(&node.cluster, &events).await;
                remote
                    .reconcile(&node.cluster, &registry, &node.links)
                    .await;
                answers.apply(&node).await;
            }
            Err(RecvError::Closed) => break,
        }
    }
}
