//! A routed name or port and the pool of endpoints that serve it: one
//! agent's endpoint, or several (ngrok's endpoint pooling), bound at this
//! node or at other nodes of the cluster.
//!
//! A connection or request picks one member: members in this node's region
//! first (this node's own agents and other nodes of the region), round
//! robin among them, members that just failed last. A claim that fails
//! because the member is gone (its session ended, its node is unreachable)
//! marks it failed for a while and moves on to the next member, so a dead
//! agent costs at most one failed claim, not a visitor's error.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use postern_proto::{ErrorCode, Failure};
use rustls::ServerConfig;

use crate::{
    endpoint::{ClaimedStream, Endpoint, EndpointKind},
    http::UpstreamPool,
    policy::TrafficPolicy,
};

/// How long a member that failed a claim is tried only when nothing else is
/// left.
const QUARANTINE: Duration = Duration::from_secs(3);

/// What serving a routed name or port needs, shared by all its members:
/// they were admitted with the same settings.
pub(crate) struct Route {
    pub kind: EndpointKind,
    /// `Some` when the endpoints pool: another endpoint with the same key
    /// may join. `None`: the first endpoint holds the name alone.
    pub pool_key: Option<String>,
    /// How TLS ends at the edge (HTTP, and TLS endpoints terminated here).
    pub termination: Option<Arc<ServerConfig>>,
    /// What happens to its traffic: the operator's policy, the bind's
    /// modules and the agent's policy, compiled.
    pub policy: Arc<TrafficPolicy>,
    /// HTTP endpoints: whether it is served on plain HTTP and on HTTPS
    /// (ngrok's `schemes`; both unless the bind names one).
    pub schemes: (bool, bool),
    pub pool: Arc<Pool>,
}

/// The endpoints serving one route.
pub(crate) struct Pool {
    members: RwLock<Arc<[Arc<Member>]>>,
    next: AtomicUsize,
    /// This node's region: its members are preferred.
    region: Arc<str>,
}

/// One endpoint of a pool.
pub(crate) struct Member {
    pub endpoint: Arc<Endpoint>,
    /// HTTP endpoints without PROXY headers share one upstream pool.
    pub shared_pool: Option<UpstreamPool>,
    pub forwarding: Forwarding,
    /// What Traffic Policy sees of the endpoint (`endpoint.*`), made once.
    pub facts: crate::policy::EndpointFacts,
    failed_at_ms: AtomicU64,
}

/// How an HTTP endpoint's requests reach its upstream.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Forwarding {
    /// `websocket_tcp_converter`: visitors' WebSockets become TCP streams.
    pub websocket_tcp: bool,
    /// The upstream speaks HTTP/2.
    pub upstream_http2: bool,
}

impl Member {
    pub fn new(
        endpoint: Arc<Endpoint>,
        shared_pool: Option<UpstreamPool>,
        forwarding: Forwarding,
    ) -> Arc<Member> {
        Arc::new(Member {
            facts: crate::policy::EndpointFacts::of(&endpoint),
            endpoint,
            shared_pool,
            forwarding,
            failed_at_ms: AtomicU64::new(0),
        })
    }

    fn failed(&self) {
        self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        at == 0 || now_ms().saturating_sub(at) >= QUARANTINE.as_millis() as u64
    }

    /// 0 for this node and its region, 1 for other regions.
    fn distance(&self, region: &str) -> u8 {
        match &self.endpoint.remote {
            Some(location) if location.region != region => 1,
            _ => 0,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Failures after which another member may serve: nothing reached an
/// upstream yet.
pub(crate) fn try_another(failure: &Failure) -> bool {
    [
        ErrorCode::AGENT_FORWARD_FAILED,
        ErrorCode::NODE_UNREACHABLE,
        ErrorCode::STREAM_UNAVAILABLE,
        ErrorCode::AGENT_CONNECTION_LIMIT,
        ErrorCode::ENDPOINT_OFFLINE,
    ]
    .contains(&failure.code)
}

impl Pool {
    /// An empty pool; members join with [`Pool::add`].
    pub fn new(region: Arc<str>) -> Arc<Pool> {
        Arc::new(Pool {
            members: RwLock::new(Arc::from([])),
            next: AtomicUsize::new(0),
            region,
        })
    }

    pub fn members(&self) -> Arc<[Arc<Member>]> {
        self.members.read().expect("pool lock").clone()
    }

    pub fn add(&self, member: Arc<Member>) {
        let mut members = self.members.write().expect("pool lock");
        let mut list = members.to_vec();
        list.push(member);
        *members = Arc::from(list);
    }

    /// Removes an endpoint; whether any member is left.
    pub fn remove(&self, endpoint_id: &str) -> bool {
        let mut members = self.members.write().expect("pool lock");
        let list: Vec<_> = members
            .iter()
            .filter(|m| m.endpoint.id != endpoint_id)
            .cloned()
            .collect();
        *members = Arc::from(list);
        !members.is_empty()
    }

    /// The member to serve the next connection or request, skipping the
    /// endpoints in `tried`.
    pub fn pick(&self, tried: &[&str]) -> Option<Arc<Member>> {
        let members = self.members();
        if let [only] = &members[..] {
            return (!tried.contains(&only.endpoint.id.as_str())).then(|| only.clone());
        }
        let rank = |m: &Member| (!m.healthy() as u8, m.distance(&self.region));
        let open = || {
            members
                .iter()
                .filter(|m| !tried.contains(&m.endpoint.id.as_str()))
        };
        let best = open().map(|m| rank(m)).min()?;
        let count = open().filter(|m| rank(m) == best).count();
        let n = self.next.fetch_add(1, Ordering::Relaxed) % count;
        open().filter(|m| rank(m) == best).nth(n).cloned()
    }

    /// A data stream from `first` or, when it is gone, from another member.
    pub async fn claim(&self, first: Arc<Member>) -> Result<(Arc<Member>, ClaimedStream), Failure> {
        let mut member = first;
        let mut tried: Vec<String> = Vec::new();
        loop {
            match member.endpoint.source.claim().await {
                Ok(claimed) => return Ok((member, claimed)),
                Err(failure) if try_another(&failure) => {
                    member.failed();
                    tried.push(member.endpoint.id.clone());
                    let skip: Vec<&str> = tried.iter().map(String::as_str).collect();
                    match self.pick(&skip) {
                        Some(next) => {
                            tracing::debug!(endpoint = %member.endpoint.id, error = %failure, next = %next.endpoint.id, "pool member failed; trying another");
                            member = next;
                        }
                        None => return Err(failure),
                    }
                }
                Err(failure) => return Err(failure),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::endpoint::{Location, StreamSource};
    use futures_util::future::BoxFuture;

    /// A stream source whose agent has gone.
    pub(crate) struct Gone;

    impl StreamSource for Gone {
        fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
            Box::pin(async {
                Err(Failure::new(
                    ErrorCode::AGENT_FORWARD_FAILED,
                    "the agent session has ended",
                ))
            })
        }
        fn session_id(&self) -> &str {
            "ts_gone"
        }
    }

    fn member(id: &str, region: Option<&str>) -> Arc<Member> {
        Member::new(
            Arc::new(Endpoint {
                id: id.to_string(),
                name: "web".into(),
                kind: EndpointKind::Http,
                public_url: "https://app.example.test".into(),
                source: Arc::new(Gone),
                remote: region.map(|r| Location {
                    node_id: format!("edge-{r}-1"),
                    region: r.to_string(),
                }),
            }),
            None,
            Forwarding::default(),
        )
    }

    fn picks(pool: &Pool, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| pool.pick(&[]).unwrap().endpoint.id.clone())
            .collect()
    }

    #[test]
    fn own_region_first_round_robin_then_others() {
        let pool = Pool::new("us".into());
        pool.add(member("ep_local", None));
        pool.add(member("ep_ap", Some("ap")));
        pool.add(member("ep_us2", Some("us")));
        let mut seen = picks(&pool, 4);
        seen.sort();
        assert_eq!(seen, ["ep_local", "ep_local", "ep_us2", "ep_us2"]);
        assert!(pool.remove("ep_local"));
        assert!(pool.remove("ep_us2"));
        assert_eq!(picks(&pool, 2), ["ep_ap", "ep_ap"]);
        assert!(!pool.remove("ep_ap"));
        assert!(pool.pick(&[]).is_none());
    }

    #[tokio::test]
    async fn a_failed_member_is_skipped_and_quarantined() {
        let pool = Pool::new("us".into());
        pool.add(member("ep_a", None));
        pool.add(member("ep_b", None));
        let first = pool.pick(&[]).unwrap();
        let failure = match pool.claim(first).await {
            Err(f) => f,
            Ok(_) => panic!("every member is gone"),
        };
        assert_eq!(failure.code, ErrorCode::AGENT_FORWARD_FAILED);
        // Both failed: both quarantined, so both still picked rather than none.
        assert!(pool.pick(&[]).is_some());
        pool.add(member("ep_c", Some("eu")));
        // A healthy member of another region beats quarantined local ones.
        assert_eq!(picks(&pool, 3), ["ep_c", "ep_c", "ep_c"]);
        assert!(pool.pick(&["ep_a", "ep_b", "ep_c"]).is_none());
    }
}
