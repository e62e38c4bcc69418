//! Live routing state: each node publishes the endpoints its agents serve
//! and its agent sessions (gossip values owned by the node, gone with it),
//! and installs the endpoints of the other nodes in its gateway, served
//! over the link between nodes.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use postern_config_sync::{Cluster, ClusterError, Kind, Local, Member};
use postern_ingress::{DomainPattern, Endpoint, Location};
use postern_proto::{ErrorCode, Failure, pb};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Required,
    node_link::{NodeLinks, RemoteSource},
    registry::{AgentSession, Registry, RegistryEvent, host_of},
};

/// An endpoint an agent of the publishing node serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointAd {
    pub public_url: String,
    /// `https`, `tls` or `tcp`.
    pub proto: String,
    /// The tunnel's name in the agent's config.
    pub name: String,
    pub session_id: String,
    pub forwards_to: String,
    pub pooling_enabled: bool,
    pub created_at: String,
    /// When it was bound, in milliseconds since the Unix epoch by the
    /// binding node's clock: of two endpoints that conflict, the earlier
    /// stays.
    #[serde(default)]
    pub bound_at_ms: u64,
    /// The bind request with the name or port as bound (protobuf), sealed
    /// with the cluster key: it may carry a private key and an OAuth client
    /// secret. Every node builds the endpoint's settings from it.
    pub bind: String,
}

impl Kind for EndpointAd {
    const KIND: &'static str = "endpoint";
}

/// An agent session of the publishing node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionAd {
    pub agent_version: String,
    pub os: String,
    pub started_at: String,
    /// The agent's address as the node saw it.
    pub ip: String,
    pub credential_id: Option<String>,
}

impl Kind for SessionAd {
    const KIND: &'static str = "session";
}

/// Writes this node's registry events to the gossip one after another, so
/// a withdrawal never overtakes the announcement it withdraws. It ends when
/// the registry ends its events, or at `stop` once those queued are written.
pub fn spawn_announcer(
    cluster: Cluster,
    mut events: mpsc::UnboundedReceiver<RegistryEvent>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                biased;
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            if let Err(e) = announce(&cluster, event).await {
                tracing::warn!(error = %e, "announcing to the cluster");
            }
        }
    })
}

async fn announce(cluster: &Cluster, event: RegistryEvent) -> Result<(), ClusterError> {
    match event {
        RegistryEvent::SessionOpened(session) => {
            cluster.set_local(&session.id, &session_ad(&session)).await
        }
        RegistryEvent::SessionClosed(id) => {
            cluster.remove_local::<SessionAd>(&id).await;
            Ok(())
        }
        RegistryEvent::EndpointBound {
            endpoint,
            session_id,
            request,
            bound_at,
        } => {
            let ad = endpoint_ad(cluster, &endpoint, session_id, &request, bound_at);
            cluster.set_local(&endpoint.id, &ad).await
        }
        RegistryEvent::EndpointUnbound(id) => {
            cluster.remove_local::<EndpointAd>(&id).await;
            Ok(())
        }
    }
}

/// The announcement of an endpoint bound here, from its bind request as
/// bound.
fn endpoint_ad(
    cluster: &Cluster,
    endpoint: &Endpoint,
    session_id: String,
    bound: &pb::BindRequest,
    bound_at: SystemTime,
) -> EndpointAd {
    EndpointAd {
        public_url: endpoint.public_url.clone(),
        proto: endpoint.kind.scheme().to_string(),
        name: endpoint.name.clone(),
        session_id,
        forwards_to: bound.forwards_to.clone(),
        pooling_enabled: bound.pooling_enabled,
        created_at: humantime::format_rfc3339_seconds(bound_at).to_string(),
        bound_at_ms: bound_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        bind: cluster.seal(&bound.encode_to_vec()),
    }
}

/// The announcement of a session opened here.
pub fn session_ad(session: &AgentSession) -> SessionAd {
    SessionAd {
        agent_version: session.agent_version.clone(),
        os: session.os.clone(),
        started_at: humantime::format_rfc3339_seconds(session.started_at).to_string(),
        ip: session.peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        credential_id: session.credential.as_ref().map(|c| c.id.clone()),
    }
}

/// The name two endpoints conflict on: the host, or a TCP endpoint's port.
fn name_of(ad: &EndpointAd) -> String {
    match ad.proto.as_str() {
        "tcp" => format!(
            "tcp port {}",
            ad.public_url.rsplit(':').next().unwrap_or("")
        ),
        _ => host_of(&ad.public_url).to_string(),
    }
}

/// This node's endpoints that lose a conflict, each with the winner: an
/// endpoint of another node on the same name (or TCP port), where not both
/// pool, that was bound earlier (ties: node id, then endpoint id). Every
/// node ranks the same way, so once the view has converged exactly one of
/// them stays. Such conflicts arise only from binds the nodes could not
/// see in time: in one gossip round, or on two sides of a partition.
pub fn losing_endpoints(ads: &[Local<EndpointAd>]) -> Vec<(String, Local<EndpointAd>)> {
    let rank = |l: &Local<EndpointAd>| (l.value.bound_at_ms, l.node.node_id.clone(), l.id.clone());
    ads.iter()
        .filter(|own| own.node.is_self)
        .filter_map(|own| {
            ads.iter()
                .filter(|other| !other.node.is_self && name_of(&other.value) == name_of(&own.value))
                .filter(|other| !(other.value.pooling_enabled && own.value.pooling_enabled))
                .filter(|other| rank(other) < rank(own))
                .min_by_key(|other| rank(other))
                .map(|winner| (own.id.clone(), winner.clone()))
        })
        .collect()
}

/// The endpoints of other nodes installed in this node's gateway.
#[derive(Default)]
pub struct RemoteEndpoints {
    /// By endpoint id: the node and announcement installed, or refused.
    known: HashMap<String, Known>,
}

struct Known {
    node: Member,
    ad: EndpointAd,
    installed: bool,
    /// What endpoint policies required when it was built.
    required: Required,
}

/// What this node's endpoint policies require of an endpoint of another
/// node.
fn required(registry: &Registry, ad: &EndpointAd) -> Required {
    let domain = (ad.proto != "tcp")
        .then(|| DomainPattern::parse(host_of(&ad.public_url)).ok())
        .flatten();
    registry.binder().required(domain.as_ref())
}

impl RemoteEndpoints {
    /// Makes the gateway hold exactly the other live nodes' endpoints that
    /// can be reached (nodes with a link address), each built with the
    /// endpoint policies as they are now.
    pub async fn reconcile(
        &mut self,
        cluster: &Cluster,
        registry: &Registry,
        links: &Arc<NodeLinks>,
    ) {
        let ads = cluster.locals::<EndpointAd>();
        for (own, winner) in losing_endpoints(&ads) {
            registry.stop_endpoint(
                &own,
                Failure::new(
                    ErrorCode::ENDPOINT_ALREADY_BOUND,
                    format!(
                        "{} is online at {} ({}) since before this endpoint was bound; \
                         the two binds did not see each other in time",
                        name_of(&winner.value),
                        winner.node.node_id,
                        winner.node.region,
                    ),
                ),
            );
        }
        let wanted: HashMap<String, Local<EndpointAd>> = ads
            .into_iter()
            .filter(|l| !l.node.is_self && l.node.rpc_addr.is_some())
            .map(|l| (l.id.clone(), l))
            .collect();
        let gone: Vec<String> = self
            .known
            .iter()
            .filter(|(id, known)| {
                wanted.get(*id).is_none_or(|l| {
                    l.node != known.node
                        || l.value != known.ad
                        || required(registry, &l.value) != known.required
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(known) = self.known.remove(&id)
                && known.installed
            {
                registry.gateway().remove(&id);
                tracing::info!(endpoint = %id, node = %known.node.node_id, "endpoint of another node withdrawn");
            }
        }
        for (id, local) in wanted {
            if self.known.get(&id).is_some_and(|known| known.installed) {
                continue;
            }
            let required = required(registry, &local.value);
            let first_try = !self.known.contains_key(&id);
            let installed = match install(cluster, registry, links, &id, &local).await {
                Ok(endpoint) => {
                    tracing::info!(endpoint = %id, url = %endpoint.public_url, node = %local.node.node_id, region = %local.node.region, "serving an endpoint of another node");
                    true
                }
                Err(e) => {
                    if first_try {
                        tracing::warn!(endpoint = %id, node = %local.node.node_id, error = %e, "an endpoint of another node is not served here");
                    }
                    false
                }
            };
            self.known.insert(
                id,
                Known {
                    node: local.node,
                    ad: local.value,
                    installed,
                    required,
                },
            );
        }
    }
}

/// Why an endpoint another node announced is not served here.
#[derive(Debug, thiserror::Error)]
enum InstallError {
    #[error("the bind request does not open with the cluster key")]
    Sealed,
    #[error("the bind request does not decode: {0}")]
    Decode(prost::DecodeError),
    /// Building or adding the endpoint.
    #[error(transparent)]
    Refused(#[from] Failure),
}

async fn install(
    cluster: &Cluster,
    registry: &Registry,
    links: &Arc<NodeLinks>,
    id: &str,
    local: &Local<EndpointAd>,
) -> Result<Arc<Endpoint>, InstallError> {
    let sealed = cluster
        .open_sealed(&local.value.bind)
        .ok_or(InstallError::Sealed)?;
    let req = pb::BindRequest::decode(sealed.as_slice()).map_err(InstallError::Decode)?;
    let mut spec = registry.binder().build(&req).await?;
    spec.id = Some(id.to_string());
    spec.remote = Some(Location {
        node_id: local.node.node_id.clone(),
        region: local.node.region.clone(),
    });
    let source = RemoteSource {
        links: links.clone(),
        node_id: local.node.node_id.clone(),
        addr: local.node.rpc_addr.expect("filtered on a link address"),
        endpoint_id: id.to_string(),
        session_id: local.value.session_id.clone(),
    };
    Ok(registry.gateway().add(spec, Arc::new(source))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(
        node: &str,
        is_self: bool,
        id: &str,
        url: &str,
        at: u64,
        pooled: bool,
    ) -> Local<EndpointAd> {
        Local {
            node: crate::cluster::test_member(node, is_self),
            id: id.into(),
            value: EndpointAd {
                public_url: url.into(),
                proto: url.split("://").next().unwrap().into(),
                name: "web".into(),
                session_id: "ts_1".into(),
                forwards_to: String::new(),
                pooling_enabled: pooled,
                created_at: String::new(),
                bound_at_ms: at,
                bind: String::new(),
            },
        }
    }

    fn losers(ads: &[Local<EndpointAd>]) -> Vec<(String, String)> {
        losing_endpoints(ads)
            .into_iter()
            .map(|(own, winner)| (own, winner.id))
            .collect()
    }

    #[test]
    fn of_two_binds_on_one_name_the_earlier_stays_whatever_the_port() {
        let mine = ad(
            "a",
            true,
            "ep_mine",
            "https://app.example.com:8443",
            20,
            false,
        );
        let theirs = ad(
            "b",
            false,
            "ep_theirs",
            "https://app.example.com",
            10,
            false,
        );
        assert_eq!(
            losers(&[mine.clone(), theirs.clone()]),
            [("ep_mine".to_string(), "ep_theirs".to_string())]
        );
        let later = ad(
            "b",
            false,
            "ep_theirs",
            "https://app.example.com",
            30,
            false,
        );
        assert!(losers(&[mine.clone(), later]).is_empty(), "mine is earlier");
        let other_name = ad("b", false, "ep_x", "https://other.example.com", 1, false);
        assert!(losers(&[mine.clone(), other_name]).is_empty());
    }

    #[test]
    fn ties_go_to_the_lower_node_id_and_pooled_pairs_do_not_conflict() {
        let mine = ad("b", true, "ep_mine", "tcp://1.2.3.4:20001", 10, false);
        let tie = ad("a", false, "ep_a", "tcp://5.6.7.8:20001", 10, false);
        assert_eq!(losers(&[mine.clone(), tie]).len(), 1);
        let other_port = ad("a", false, "ep_a", "tcp://5.6.7.8:20002", 1, false);
        assert!(losers(&[mine, other_port]).is_empty());
        let pooled = ad("b", true, "ep_mine", "https://app.example.com", 20, true);
        let pooled_too = ad("a", false, "ep_a", "https://app.example.com", 10, true);
        assert!(losers(&[pooled.clone(), pooled_too]).is_empty());
        let unpooled = ad("a", false, "ep_a", "https://app.example.com", 10, false);
        assert_eq!(
            losers(&[pooled, unpooled]).len(),
            1,
            "one side does not pool"
        );
    }
}
