//! Endpoint pooling: every routed name has one pool, the gateway's
//! `StreamSource` for it. Members are this node's agent sessions that bound
//! the name and, in a cluster, the other nodes that hold it. A claim goes
//! to a local session first (round robin), else to a holding node of this
//! region, else of any region (round robin within each), and moves on to
//! the next member when one fails, so a dead member costs a quick retry,
//! never a hang.
//!
//! Policy: a second bind of a name joins the pool when it comes from the
//! same identity — the same owner (bot user) for API credentials, the same
//! authtoken otherwise — and the same protocol; anyone else gets
//! `ERR_POSTERN_334`. The first bind's settings (TLS, mTLS, OAuth, IP
//! rules) apply to the pool.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::future::BoxFuture;
use postern_ingress::{
    ClaimedStream, DomainPattern, Endpoint, EndpointKind, EndpointSpec, Gateway, Protocol,
    StreamSource,
};
use postern_proto::{ErrorCode, Failure};

use crate::{
    cluster::link::{Holder, Links},
    session::AgentSession,
};

/// The routing key of a spec, when it names one (a domain or a TCP port).
pub fn spec_key(spec: &EndpointSpec) -> Option<String> {
    match (spec.protocol, &spec.domain) {
        (Protocol::Tcp, _) if spec.remote_port != 0 => Some(format!("tcp:{}", spec.remote_port)),
        (Protocol::Http | Protocol::Tls, Some(domain)) => Some(domain.to_string()),
        _ => None,
    }
}

/// The routing key of a bound endpoint.
pub fn endpoint_key(endpoint: &Endpoint) -> String {
    match endpoint.kind {
        EndpointKind::Tcp { port } => format!("tcp:{port}"),
        _ => {
            let host = endpoint
                .public_url
                .split_once("://")
                .map(|(_, rest)| rest)
                .unwrap_or(&endpoint.public_url);
            let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            DomainPattern::parse(host)
                .map(|d| d.to_string())
                .unwrap_or_else(|_| host.to_string())
        }
    }
}

pub fn proto_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http => "http",
        Protocol::Tls => "tls",
        Protocol::Tcp => "tcp",
    }
}

/// The sessions and nodes serving one name.
pub struct EndpointPool {
    pub identity: String,
    pub protocol: Protocol,
    bound: OnceLock<(String, String, String)>,
    label: String,
    locals: Mutex<Vec<Arc<AgentSession>>>,
    remotes: Mutex<Vec<Holder>>,
    next: AtomicUsize,
    links: Option<Arc<Links>>,
    region: String,
}

impl EndpointPool {
    fn new(
        identity: String,
        protocol: Protocol,
        label: String,
        links: Option<Arc<Links>>,
        region: String,
    ) -> EndpointPool {
        EndpointPool {
            identity,
            protocol,
            bound: OnceLock::new(),
            label,
            locals: Mutex::new(Vec::new()),
            remotes: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            links,
            region,
        }
    }

    /// `(endpoint id, public URL, routing key)`.
    pub fn bound(&self) -> (&str, &str, &str) {
        let (id, url, key) = self.bound.get().expect("a pool is bound before use");
        (id, url, key)
    }

    pub fn local_sessions(&self) -> Vec<Arc<AgentSession>> {
        self.locals.lock().expect("locals lock").clone()
    }

    pub fn remotes(&self) -> Vec<Holder> {
        self.remotes.lock().expect("remotes lock").clone()
    }

    /// A stream from one of this node's sessions (for forwarded visitors).
    pub fn claim_local(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
        let locals = self.local_sessions();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let mut last = None;
            for i in 0..locals.len() {
                match locals[(start + i) % locals.len()].claim().await {
                    Ok(claimed) => return Ok(claimed),
                    Err(f) => last = Some(f),
                }
            }
            Err(last.unwrap_or_else(|| {
                Failure::new(
                    ErrorCode::ENDPOINT_OFFLINE,
                    "no agent of this node serves the endpoint any more",
                )
            }))
        })
    }

    /// Remote holders in the order to try: this region first, round robin.
    fn ordered_remotes(&self, start: usize) -> Vec<Holder> {
        let remotes = self.remotes();
        let (mut near, mut far): (Vec<Holder>, Vec<Holder>) =
            remotes.into_iter().partition(|h| h.region == self.region);
        if !near.is_empty() {
            let n = start % near.len();
            near.rotate_left(n);
        }
        if !far.is_empty() {
            let n = start % far.len();
            far.rotate_left(n);
        }
        near.extend(far);
        near
    }
}

impl StreamSource for EndpointPool {
    fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let locals = self.local_sessions();
        let remotes = self.ordered_remotes(start);
        let links = self.links.clone();
        Box::pin(async move {
            let mut last = None;
            for i in 0..locals.len() {
                match locals[(start + i) % locals.len()].claim().await {
                    Ok(claimed) => return Ok(claimed),
                    Err(f) => last = Some(f),
                }
            }
            if let Some(links) = links {
                for holder in &remotes {
                    match links.forward(holder).await {
                        Ok(claimed) => return Ok(claimed),
                        Err(f) => {
                            tracing::debug!(node = %holder.node_id, error = %f, "forwarding failed; trying the next holder");
                            last = Some(f);
                        }
                    }
                }
            }
            Err(last.unwrap_or_else(|| {
                Failure::new(
                    ErrorCode::AGENT_FORWARD_FAILED,
                    "no agent serves this endpoint any more",
                )
            }))
        })
    }

    fn session_id(&self) -> &str {
        &self.label
    }
}

#[derive(Default)]
struct PoolsInner {
    by_key: HashMap<String, Arc<EndpointPool>>,
    by_id: HashMap<String, Arc<EndpointPool>>,
}

/// Every pool of this node.
pub struct Pools {
    inner: Mutex<PoolsInner>,
    links: Option<Arc<Links>>,
    region: String,
}

impl Pools {
    pub fn new(links: Option<Arc<Links>>, region: String) -> Pools {
        Pools {
            inner: Mutex::new(PoolsInner::default()),
            links,
            region,
        }
    }

    pub fn by_id(&self, endpoint_id: &str) -> Option<Arc<EndpointPool>> {
        self.inner
            .lock()
            .expect("pools lock")
            .by_id
            .get(endpoint_id)
            .cloned()
    }

    pub fn by_key(&self, key: &str) -> Option<Arc<EndpointPool>> {
        self.inner
            .lock()
            .expect("pools lock")
            .by_key
            .get(key)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<EndpointPool>> {
        self.inner
            .lock()
            .expect("pools lock")
            .by_id
            .values()
            .cloned()
            .collect()
    }

    /// Binds `session` to the spec's name: joins its pool, or routes a new
    /// one. Returns `(endpoint id, public URL, routing key)`.
    pub fn bind(
        &self,
        gateway: &Gateway,
        spec: EndpointSpec,
        session: &Arc<AgentSession>,
        identity: &str,
    ) -> Result<(String, String, String), Failure> {
        let mut inner = self.inner.lock().expect("pools lock");
        if let Some(key) = spec_key(&spec)
            && let Some(pool) = inner.by_key.get(&key)
        {
            if pool.identity != identity || pool.protocol != spec.protocol {
                return Err(Failure::new(
                    ErrorCode::ENDPOINT_ALREADY_BOUND,
                    format!("{key} is already bound by another agent session of another owner"),
                ));
            }
            pool.locals.lock().expect("locals lock").push(session.clone());
            let (id, url, key) = pool.bound();
            return Ok((id.to_string(), url.to_string(), key.to_string()));
        }
        let pool = Arc::new(EndpointPool::new(
            identity.to_string(),
            spec.protocol,
            session.id.clone(),
            self.links.clone(),
            self.region.clone(),
        ));
        pool.locals.lock().expect("locals lock").push(session.clone());
        let endpoint = gateway.add(spec, pool.clone())?;
        let key = endpoint_key(&endpoint);
        let bound = (endpoint.id.clone(), endpoint.public_url.clone(), key.clone());
        let _ = pool.bound.set(bound.clone());
        inner.by_key.insert(key, pool.clone());
        inner.by_id.insert(endpoint.id.clone(), pool);
        Ok(bound)
    }

    /// Takes `session` out of the endpoint's pool; the route goes when no
    /// member is left.
    pub fn unbind(&self, gateway: &Gateway, endpoint_id: &str, session_id: &str) {
        let mut inner = self.inner.lock().expect("pools lock");
        let Some(pool) = inner.by_id.get(endpoint_id).cloned() else {
            return;
        };
        pool.locals
            .lock()
            .expect("locals lock")
            .retain(|s| s.id != session_id);
        Self::drop_if_empty(&mut inner, gateway, &pool);
    }

    fn drop_if_empty(inner: &mut PoolsInner, gateway: &Gateway, pool: &Arc<EndpointPool>) {
        let empty = pool.locals.lock().expect("locals lock").is_empty()
            && pool.remotes.lock().expect("remotes lock").is_empty();
        if empty {
            let (id, _, key) = pool.bound();
            inner.by_id.remove(id);
            if inner.by_key.get(key).is_some_and(|p| Arc::ptr_eq(p, pool)) {
                inner.by_key.remove(key);
            }
            gateway.remove(id);
        }
    }

    /// Sets the other nodes holding `key`; drops the route when nobody is
    /// left.
    pub fn set_remotes(&self, gateway: &Gateway, key: &str, holders: Vec<Holder>) {
        let mut inner = self.inner.lock().expect("pools lock");
        let Some(pool) = inner.by_key.get(key).cloned() else {
            return;
        };
        *pool.remotes.lock().expect("remotes lock") = holders;
        Self::drop_if_empty(&mut inner, gateway, &pool);
    }

    /// Routes a name only other nodes hold.
    pub fn add_mirror(
        &self,
        gateway: &Gateway,
        spec: EndpointSpec,
        identity: &str,
        holders: Vec<Holder>,
    ) -> Result<(), Failure> {
        let mut inner = self.inner.lock().expect("pools lock");
        if let Some(key) = spec_key(&spec)
            && inner.by_key.contains_key(&key)
        {
            return Ok(());
        }
        let label = holders
            .first()
            .map(|h| format!("node:{}", h.node_id))
            .unwrap_or_default();
        let pool = Arc::new(EndpointPool::new(
            identity.to_string(),
            spec.protocol,
            label,
            self.links.clone(),
            self.region.clone(),
        ));
        *pool.remotes.lock().expect("remotes lock") = holders;
        let endpoint = gateway.add(spec, pool.clone())?;
        let key = endpoint_key(&endpoint);
        let _ = pool.bound.set((endpoint.id.clone(), endpoint.public_url.clone(), key.clone()));
        inner.by_key.insert(key, pool.clone());
        inner.by_id.insert(endpoint.id.clone(), pool);
        Ok(())
    }
}
