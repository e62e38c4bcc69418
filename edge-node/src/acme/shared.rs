//! What the nodes of a cluster share about ACME, carried by the cluster's
//! gossip (signed with the cluster key like every gossiped value):
//!
//! - `acme_certificate` (a config object: merged by timestamp, kept in the
//!   snapshot, outliving the node that wrote it): the chain issued for a
//!   name, its key sealed with the cluster key, and the node that ordered
//!   it. Every node serves it.
//! - `acme_lease` (a value of the ordering node, gone when that node dies
//!   or leaves): "this node orders this name until then". Of the live,
//!   unexpired leases of a name the earliest taken wins, ties going to the
//!   lowest node id ([`lease_holder`]); a node orders only under the
//!   winning lease.
//! - `acme_answer` (a value of the ordering node): an HTTP-01 token and its
//!   key authorization, or a TLS-ALPN-01 name and its digest, while the
//!   order is in flight. Every node answers it ([`RemoteAnswers`]).
//! - `acme_answering` (a value of each node): "I answer that one"; the
//!   ordering node asks the CA to validate once every live node says so,
//!   or after [`ANSWER_WAIT`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use postern_config_sync::{Kind, Local};
use postern_ingress::{AcmeChallenges, ServingCert};
use serde::{Deserialize, Serialize};

use crate::cluster::{AgentIngress, ClusterNode, KeyType, ReservedDomain, open_certificate};

/// The longest the ordering node waits for every node to answer a
/// challenge before it asks the CA to validate anyway (a node that runs an
/// older version, or is cut off, must not hold every order).
pub(super) const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// The certificate ACME issued for a name, shared with every node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcmeCertificate {
    pub name: String,
    /// The chain, leaf first.
    pub certificate_pem: String,
    /// Its key, sealed with the cluster key.
    pub private_key_sealed: String,
    /// The node that ordered it.
    pub ordered_by: String,
}

impl Kind for AcmeCertificate {
    const KIND: &'static str = "acme_certificate";
}

impl AcmeCertificate {
    /// The certificate as this node serves it, its key opened with `open`,
    /// checked as an uploaded one is (an expired one is refused).
    pub fn serving(&self, open: impl Fn(&str) -> Option<String>) -> Result<ServingCert, String> {
        open_certificate(&self.certificate_pem, &self.private_key_sealed, open)
    }
}

/// A node's claim to order one name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcmeLease {
    pub name: String,
    /// When it was taken, in milliseconds since the epoch on the holder's
    /// clock; kept while the holder keeps the lease.
    pub taken_at: u64,
    /// When it lapses if the holder does not renew or withdraw it.
    pub expires_at: u64,
    /// The holder's failed orders in a row, the last error and the next
    /// try: after a failure the holder keeps the lease until its retry,
    /// so the back-off holds for the whole cluster.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub retries_at: Option<u64>,
}

impl Kind for AcmeLease {
    const KIND: &'static str = "acme_lease";
}

/// A pending challenge's answer, published by the ordering node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "challenge")]
pub enum AcmeAnswer {
    #[serde(rename = "http-01")]
    Http01 {
        name: String,
        token: String,
        key_authorization: String,
    },
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01 {
        name: String,
        /// The key authorization's SHA-256, hex.
        digest: String,
    },
}

impl Kind for AcmeAnswer {
    const KIND: &'static str = "acme_answer";
}

impl AcmeAnswer {
    /// Its gossip id (the acknowledgements use the same).
    pub fn id(&self) -> String {
        match self {
            AcmeAnswer::Http01 { token, .. } => format!("http-01-{}", key_of(token)),
            AcmeAnswer::TlsAlpn01 { name, .. } => format!("tls-alpn-01-{}", key_of(name)),
        }
    }

    fn name(&self) -> &str {
        match self {
            AcmeAnswer::Http01 { name, .. } | AcmeAnswer::TlsAlpn01 { name, .. } => name,
        }
    }
}

/// A node's acknowledgement: it answers the challenge of the same id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcmeAnswering {
    pub name: String,
}

impl Kind for AcmeAnswering {
    const KIND: &'static str = "acme_answering";
}

/// The gossip id for a name or token: itself, or its SHA-256 when it is
/// too long for an id (names may have 253 characters; ids 200).
pub fn key_of(name: &str) -> String {
    if name.len() <= 120 {
        return name.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    format!("sha256-{}", hex::encode(digest))
}

/// Milliseconds since the epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time of [`millis`].
pub fn time_of(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// The lease under which `name` is ordered: of the live nodes' leases
/// for it that have not expired at `now_ms`, the earliest taken, ties
/// going to the lowest node id. Every node that sees the same leases
/// picks the same one; a holder is never displaced by a lease taken after
/// its own.
pub fn lease_holder<'a>(
    leases: &'a [Local<AcmeLease>],
    name: &str,
    now_ms: u64,
) -> Option<&'a Local<AcmeLease>> {
    leases
        .iter()
        .filter(|l| l.value.name == name && l.value.expires_at > now_ms)
        .min_by(|a, b| {
            (a.value.taken_at, &a.node.node_id).cmp(&(b.value.taken_at, &b.node.node_id))
        })
}

/// The names the cluster asks certificates for, with their key types:
/// those of reserved domains with a policy, and every region's name of
/// the agent ingresses with one. Every node serves these and answers
/// their challenges, whether it orders them or not.
pub fn policy_names(cluster: &ClusterNode) -> Vec<(String, KeyType)> {
    let mut names = reserved_policy_names(cluster);
    names.extend(ingress_policy_names(cluster, &cluster.regions()));
    names
}

/// The names the cluster may hold ACME certificates for: those of
/// [`policy_names`], and the names under a wildcard reserved domain with a
/// policy (ordered on demand, see `on_demand`). Every node serves these
/// and answers their challenges.
pub struct Cover {
    names: BTreeSet<String>,
    /// The wildcards' suffixes (`.example.com`).
    under: Vec<String>,
}

impl Cover {
    pub fn of(cluster: &ClusterNode) -> Cover {
        let names: BTreeSet<String> = policy_names(cluster).into_iter().map(|(n, _)| n).collect();
        let under = names
            .iter()
            .filter_map(|n| n.strip_prefix('*'))
            .map(str::to_string)
            .collect();
        Cover { names, under }
    }

    pub fn covers(&self, name: &str) -> bool {
        self.names.contains(name) || self.under.iter().any(|suffix| name.ends_with(suffix))
    }
}

/// The reserved domains with a policy, with their key types.
pub fn reserved_policy_names(cluster: &ClusterNode) -> Vec<(String, KeyType)> {
    cluster
        .objects::<ReservedDomain>()
        .into_iter()
        .filter_map(|(_, reserved)| {
            let policy = reserved.certificate_management_policy?;
            Some((reserved.domain, policy.private_key_type))
        })
        .collect()
}

/// The names in `regions` (`tunnel.<region>.<domain>`) of the agent
/// ingresses with a policy, with their key types.
pub fn ingress_policy_names(
    cluster: &ClusterNode,
    regions: &BTreeSet<String>,
) -> Vec<(String, KeyType)> {
    cluster
        .objects::<AgentIngress>()
        .into_iter()
        .filter_map(|(_, ingress)| {
            let key_type = ingress
                .certificate_management_policy
                .as_ref()?
                .private_key_type;
            Some(
                regions
                    .iter()
                    .map(move |region| (ingress.region_domain(region), key_type))
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

/// The shared certificates this node serves: those of the names the
/// cluster's policies [`Cover`]. One that cannot be served (its key
/// sealed with another cluster key, or expired) is left out and logged.
pub fn shared_certificates(cluster: &ClusterNode) -> Vec<(String, ServingCert)> {
    let cover = Cover::of(cluster);
    cluster
        .objects::<AcmeCertificate>()
        .into_iter()
        .filter(|(_, shared)| cover.covers(&shared.name))
        .filter_map(|(_, shared)| {
            shared
                .serving(|sealed| cluster.open_sealed(sealed))
                .inspect_err(|e| tracing::warn!(name = shared.name, error = %e, "a shared ACME certificate is not served"))
                .ok()
                .map(|cert| (shared.name, cert))
        })
        .collect()
}

/// Deletes from the cluster the shared certificates this node ordered for
/// names no policy [`Cover`]s any more (a name ordered on demand stays while
/// its wildcard's policy does, whether an agent binds it or not), so that their
/// sealed keys do not stay in the gossip for good. Only once the node has
/// caught up with the cluster's config: before, a reservation that seems
/// missing may just not have arrived. (One whose orderer never comes back
/// stays; nothing serves it.)
pub async fn prune_shared_certificates(cluster: &ClusterNode) {
    if !cluster.caught_up() {
        return;
    }
    let cover = Cover::of(cluster);
    for (id, shared) in cluster.objects::<AcmeCertificate>() {
        if shared.ordered_by != cluster.node_id() || cover.covers(&shared.name) {
            continue;
        }
        match cluster.delete_object::<AcmeCertificate>(&id).await {
            Ok(_) => {
                tracing::info!(
                    name = shared.name,
                    "shared ACME certificate deleted: no reserved domain asks for it"
                )
            }
            Err(e) => {
                tracing::warn!(name = shared.name, error = %e, "deleting a shared ACME certificate")
            }
        }
    }
}

/// The challenge answers of other nodes' orders, kept in this node's
/// gateway, and this node's acknowledgements of them. Every node runs one,
/// with `[acme]` or without: the CA may reach any node.
pub struct RemoteAnswers {
    challenges: Arc<AcmeChallenges>,
    acknowledged: BTreeSet<String>,
}

impl RemoteAnswers {
    pub fn new(challenges: Arc<AcmeChallenges>) -> RemoteAnswers {
        RemoteAnswers {
            challenges,
            acknowledged: BTreeSet::new(),
        }
    }

    /// Makes the gateway answer exactly the other live nodes' pending
    /// challenges for names the cluster's policies [`Cover`] (an answer for
    /// any other name is refused: nothing but such a name is ever
    /// ordered), and acknowledges them.
    pub async fn apply(&mut self, cluster: &ClusterNode) {
        let cover = Cover::of(cluster);
        let mut http01 = Vec::new();
        let mut tls_alpn01 = Vec::new();
        let mut ids: HashMap<String, String> = HashMap::new();
        for local in cluster.live::<AcmeAnswer>() {
            if local.node.is_self {
                continue;
            }
            let answer = local.value;
            if !cover.covers(answer.name()) {
                tracing::warn!(node = %local.node.node_id, name = answer.name(), "a challenge answer for a name no certificate policy covers is refused");
                continue;
            }
            let (id, name) = (answer.id(), answer.name().to_string());
            match answer {
                AcmeAnswer::Http01 {
                    token,
                    key_authorization,
                    ..
                } => http01.push((token, key_authorization)),
                AcmeAnswer::TlsAlpn01 { digest, .. } => match hex::decode(&digest) {
                    Ok(digest) if digest.len() == 32 => tls_alpn01.push((name.clone(), digest)),
                    _ => {
                        tracing::warn!(node = %local.node.node_id, name, "a TLS-ALPN-01 answer with a malformed digest is refused");
                        continue;
                    }
                },
            }
            ids.insert(id, name);
        }
        for (name, error) in self.challenges.replace_remote(http01, tls_alpn01) {
            tracing::warn!(
                name,
                error,
                "another node's TLS-ALPN-01 answer is not served here"
            );
            ids.retain(|_, n| *n != name);
        }
        let gone: Vec<String> = self
            .acknowledged
            .iter()
            .filter(|id| !ids.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            cluster.withdraw_local::<AcmeAnswering>(&id).await;
            self.acknowledged.remove(&id);
        }
        for (id, name) in ids {
            if self.acknowledged.contains(&id) {
                continue;
            }
            match cluster
                .publish_local(&id, &AcmeAnswering { name: name.clone() })
                .await
            {
                Ok(()) => {
                    self.acknowledged.insert(id);
                }
                Err(e) => {
                    tracing::warn!(name, error = %e.detail, "acknowledging a challenge answer")
                }
            }
        }
    }
}

/// Waits until every other live node acknowledges answer `id`, or
/// [`ANSWER_WAIT`]; says which nodes did not.
pub(super) async fn answered_everywhere(cluster: &ClusterNode, id: &str) -> Vec<String> {
    let poll = (cluster.gossip_interval() / 2)
        .clamp(Duration::from_millis(20), Duration::from_millis(500));
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    loop {
        let acknowledged: BTreeSet<String> = cluster
            .live::<AcmeAnswering>()
            .into_iter()
            .filter(|l| l.id == id)
            .map(|l| l.node.node_id)
            .collect();
        let missing: Vec<String> = cluster
            .member_ids()
            .into_iter()
            .filter(|n| n != cluster.node_id() && !acknowledged.contains(n))
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, taken_at: u64, expires_at: u64) -> Local<AcmeLease> {
        Local {
            node: crate::cluster::test_member(node, false),
            id: "app.example.test".into(),
            value: AcmeLease {
                name: "app.example.test".into(),
                taken_at,
                expires_at,
                failures: 0,
                last_error: None,
                retries_at: None,
            },
        }
    }

    fn holder(leases: &[Local<AcmeLease>], now: u64) -> Option<&str> {
        lease_holder(leases, "app.example.test", now).map(|l| l.node.node_id.as_str())
    }

    #[test]
    fn the_earliest_live_lease_wins_and_ties_go_to_the_lowest_node_id() {
        let leases = vec![
            lease("edge-b", 100, 1000),
            lease("edge-c", 90, 1000),
            lease("edge-a", 100, 1000),
        ];
        assert_eq!(holder(&leases, 0), Some("edge-c"));
        // Taken at once: the lowest node id, whatever the order seen.
        let tie = vec![lease("edge-b", 100, 1000), lease("edge-a", 100, 1000)];
        let mut reversed = tie.clone();
        reversed.reverse();
        assert_eq!(holder(&tie, 0), Some("edge-a"));
        assert_eq!(holder(&reversed, 0), Some("edge-a"));
        // An expired lease holds nothing, however early.
        let expired = vec![lease("edge-a", 10, 50), lease("edge-b", 100, 1000)];
        assert_eq!(holder(&expired, 60), Some("edge-b"));
        assert_eq!(holder(&expired, 1000), None);
        // Another name's lease is not this name's.
        let mut other = lease("edge-a", 1, 1000);
        other.value.name = "other.example.test".into();
        assert_eq!(holder(&[other], 0), None);
    }

    #[test]
    fn answer_ids_are_short_and_distinct() {
        let http = AcmeAnswer::Http01 {
            name: "a.example.test".into(),
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        };
        let alpn = AcmeAnswer::TlsAlpn01 {
            name: "a.example.test".into(),
            digest: "00".repeat(32),
        };
        assert_eq!(http.id(), "http-01-tok");
        assert_eq!(alpn.id(), "tls-alpn-01-a.example.test");
        let long = format!("{}.example.test", "a".repeat(240));
        assert!(key_of(&long).len() < 100);
        assert_ne!(key_of(&long), key_of(&format!("b{long}")));
        let json = serde_json::to_value(&alpn).unwrap();
        assert_eq!(json["challenge"], "tls-alpn-01");
    }
}
