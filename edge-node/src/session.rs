//! Agent sessions: authentication, binds, heartbeats, the pool of parked data
//! streams each session offers the gateway, and the registry of them all.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use futures_util::{Stream, future::BoxFuture};
use postern_ingress::{
    ClaimedStream, DomainPattern, EndpointSpec, Gateway, Location, PolicyDocument, Protocol,
    StreamSource, TerminateAt,
};
use postern_net::{
    CaResolver, IpPolicy, MAX_CAS, MtlsPolicy, Pem, certified_key_from_pem, parse_ca_bundle,
    random_id,
};
use postern_proto::{ErrorCode, Failure, Take, TokenBucket, negotiate, pb};
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::{
    auth::{Authtokens, CredentialRef},
    ca_store::{CaStore, ca_error_code},
    cluster::ClusterNode,
    config::{EndpointPolicy, Limits, SessionSettings},
    service::PeerInfo,
};

type ControlTx = mpsc::Sender<Result<pb::EdgeMessage, Status>>;

fn edge_message(msg: pb::edge_message::Msg) -> Result<pb::EdgeMessage, Status> {
    Ok(pb::EdgeMessage { msg: Some(msg) })
}

/// Everything the registry needs from the node.
pub struct RegistrySettings {
    pub region: String,
    pub node_id: String,
    pub session: SessionSettings,
    pub limits: Limits,
    pub endpoint_policies: Vec<EndpointPolicy>,
    /// CAs that endpoints reference by id.
    pub cas: Arc<CaStore>,
    /// OAuth/OIDC for endpoints that ask for it.
    pub oauth: Arc<postern_ingress::OAuthService>,
}

/// All agent sessions of this node.
pub struct Registry {
    gateway: Gateway,
    tokens: Arc<Authtokens>,
    settings: RegistrySettings,
    /// The cluster, told of endpoints and sessions, asked about binds.
    cluster: OnceLock<Arc<ClusterNode>>,
    sessions: Mutex<HashMap<String, Arc<AgentSession>>>,
    tracker: TaskTracker,
    draining: AtomicBool,
    counters: SessionCounters,
}

/// What happened to sessions and binds, for `/metrics`. Refusals are
/// counted by error code (a fixed set).
#[derive(Default)]
pub struct SessionCounters {
    pub opened: AtomicU64,
    /// Replaced by a newer session of the same agent (it reconnected
    /// before the old one timed out).
    pub superseded: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    binds_refused: Mutex<BTreeMap<String, u64>>,
}

impl SessionCounters {
    /// A hello refused with `failure`.
    pub fn session_refused(&self, failure: &Failure) {
        *self
            .refused
            .lock()
            .expect("counters lock")
            .entry(failure.code.id())
            .or_default() += 1;
    }

    fn bind_refused(&self, failure: &Failure) {
        *self
            .binds_refused
            .lock()
            .expect("counters lock")
            .entry(failure.code.id())
            .or_default() += 1;
    }

    /// Session refusals by error code.
    pub fn sessions_refused(&self) -> BTreeMap<String, u64> {
        self.refused.lock().expect("counters lock").clone()
    }

    /// Bind refusals by error code.
    pub fn binds_refused(&self) -> BTreeMap<String, u64> {
        self.binds_refused.lock().expect("counters lock").clone()
    }
}

/// One agent's session.
pub struct AgentSession {
    pub id: String,
    token_hash: String,
    instance_id: String,
    stream_token: String,
    acl: crate::acl::Acl,
    /// The API credential the token is, with its owner.
    pub credential: Option<CredentialRef>,
    pub agent_version: String,
    pub os: String,
    pub started_at: SystemTime,
    /// The agent's address.
    pub peer: Option<SocketAddr>,
    control: ControlTx,
    pool: Arc<Mutex<StreamPool>>,
    endpoints: Mutex<Vec<Bound>>,
    cancel: CancellationToken,
    end_reason: Mutex<Option<Failure>>,
    stream_wait: std::time::Duration,
    /// Cuts the agent's connection, and with it every data stream.
    cut_connection: Option<CancellationToken>,
    /// Permits for simultaneous proxied connections.
    streams: Arc<tokio::sync::Semaphore>,
}

/// An endpoint a session bound, with what it takes to build it again.
#[derive(Clone)]
struct Bound {
    id: String,
    /// The bind request with the name or port as bound.
    req: pb::BindRequest,
    /// The CAs endpoint policies required when it was built.
    policy_cas: Vec<String>,
}

impl Bound {
    fn domain(&self) -> Option<DomainPattern> {
        domain_of(&self.req)
    }
}

/// The name a bind request binds, if it binds one (not TCP).
pub fn domain_of(req: &pb::BindRequest) -> Option<DomainPattern> {
    base_spec(req)
        .ok()
        .filter(|spec| spec.protocol != Protocol::Tcp)
        .and_then(|spec| spec.domain)
}

struct StreamPool {
    parked: VecDeque<ClaimedStream>,
    waiters: VecDeque<oneshot::Sender<ClaimedStream>>,
    cap: usize,
    closed: bool,
}

impl Registry {
    pub fn new(
        gateway: Gateway,
        tokens: Arc<Authtokens>,
        settings: RegistrySettings,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            gateway,
            tokens,
            settings,
            cluster: OnceLock::new(),
            sessions: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            counters: SessionCounters::default(),
        })
    }

    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    /// Makes this node's endpoints and sessions known to the cluster.
    pub fn attach_cluster(&self, cluster: Arc<ClusterNode>) {
        let _ = self.cluster.set(cluster);
    }

    /// This node, as endpoints name the node serving them.
    pub fn location(&self) -> Location {
        Location {
            node_id: self.settings.node_id.clone(),
            region: self.settings.region.clone(),
        }
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Every session of this node.
    pub fn sessions(&self) -> Vec<Arc<AgentSession>> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn session(&self, id: &str) -> Option<Arc<AgentSession>> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(id)
            .cloned()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("sessions lock").len()
    }

    /// Authenticates a hello and registers the session; the caller then
    /// runs [`Registry::spawn_session`]. On refusal, the error to send.
    pub fn open_session(
        &self,
        hello: pb::Hello,
        control: ControlTx,
        peer: Option<PeerInfo>,
    ) -> Result<Arc<AgentSession>, Failure> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Failure::new(
                ErrorCode::DRAINING,
                "this edge node is shutting down",
            ));
        }
        let version = negotiate(hello.min_protocol_version, hello.protocol_version)
            .map_err(|m| Failure::new(ErrorCode::PROTOCOL_VERSION, m))?;
        let record = self.tokens.authenticate(&hello.authtoken)?;
        if let Some(cluster) = self.cluster.get() {
            let ingress = peer.as_ref().and_then(|p| p.server_name.as_deref());
            cluster.check_ingress(ingress, record.owner_id())?;
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let superseded: Vec<Arc<AgentSession>> = sessions
            .values()
            .filter(|s| {
                s.token_hash == record.sha256
                    && !hello.instance_id.is_empty()
                    && s.instance_id == hello.instance_id
            })
            .cloned()
            .collect();
        let live = sessions
            .values()
            .filter(|s| s.token_hash == record.sha256)
            .count()
            - superseded.len();
        if live >= self.settings.limits.sessions_per_token {
            return Err(Failure::new(
                ErrorCode::TOO_MANY_SESSIONS,
                format!(
                    "this authtoken already has {live} sessions (limit {})",
                    self.settings.limits.sessions_per_token
                ),
            ));
        }
        for old in &superseded {
            sessions.remove(&old.id);
        }
        let session = Arc::new(AgentSession {
            id: random_id("ts_"),
            token_hash: record.sha256.clone(),
            instance_id: hello.instance_id.clone(),
            stream_token: random_id(""),
            acl: record.acl.clone(),
            credential: record.credential.clone(),
            agent_version: hello.agent_version.clone(),
            os: hello.os.clone(),
            started_at: SystemTime::now(),
            peer: peer.as_ref().map(|p| p.addr),
            control: control.clone(),
            pool: Arc::new(Mutex::new(StreamPool {
                parked: VecDeque::new(),
                waiters: VecDeque::new(),
                cap: (self.settings.limits.stream_pool as usize * 2).max(8),
                closed: false,
            })),
            endpoints: Mutex::new(Vec::new()),
            cancel: CancellationToken::new(),
            end_reason: Mutex::new(None),
            stream_wait: self.settings.session.stream_wait,
            cut_connection: peer.map(|p| p.cut),
            streams: Arc::new(tokio::sync::Semaphore::new(
                self.settings.limits.streams_per_session,
            )),
        });
        sessions.insert(session.id.clone(), session.clone());
        drop(sessions);
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        if let Some(cluster) = self.cluster.get() {
            cluster.publish_session(&session);
        }
        for old in superseded {
            self.counters.superseded.fetch_add(1, Ordering::Relaxed);
            tracing::info!(old = %old.id, new = %session.id, "agent reconnected; the old session is superseded");
            self.close(
                &old,
                Some(Failure::new(
                    ErrorCode::SESSION_SUPERSEDED,
                    "a newer session of this agent took over",
                )),
            );
        }
        let welcome = pb::Welcome {
            protocol_version: version,
            session_id: session.id.clone(),
            stream_token: session.stream_token.clone(),
            region: self.settings.region.clone(),
            node_id: self.settings.node_id.clone(),
            heartbeat_interval_ms: self.settings.session.heartbeat_interval.as_millis() as u32,
            heartbeat_tolerance_ms: self.settings.session.heartbeat_tolerance.as_millis() as u32,
            alternate_addrs: self
                .cluster
                .get()
                .map(|c| c.region_agent_addrs())
                .unwrap_or_default(),
            control_rate: self.settings.limits.control_messages_per_second,
            control_burst: self.settings.limits.control_burst,
            endpoints_per_session: u32::try_from(self.settings.limits.endpoints_per_session)
                .unwrap_or(u32::MAX),
        };
        // The channel is new and empty: this cannot fail for lack of room.
        let _ = control.try_send(edge_message(pb::edge_message::Msg::Welcome(welcome)));
        tracing::info!(
            session.id = %session.id,
            token = %record.id(),
            agent_version = %hello.agent_version,
            "agent session opened"
        );
        Ok(session)
    }

    /// Runs the session's control loop as a tracked task.
    pub fn spawn_session(
        self: &Arc<Self>,
        session: Arc<AgentSession>,
        inbound: Streaming<pb::AgentMessage>,
    ) {
        let registry = self.clone();
        let span = tracing::info_span!(
            parent: None,
            "agent_session",
            session.id = %session.id,
            region = %self.settings.region,
            node.id = %self.settings.node_id,
        );
        self.tracker.spawn(
            async move {
                let end = registry.session_loop(&session, inbound).await;
                registry.close(&session, end);
            }
            .instrument(span),
        );
    }

    async fn session_loop(
        &self,
        session: &Arc<AgentSession>,
        mut inbound: Streaming<pb::AgentMessage>,
    ) -> Option<Failure> {
        let settings = &self.settings.session;
        let mut ticker = tokio::time::interval(settings.heartbeat_interval);
        ticker.tick().await;
        let mut last_seen = Instant::now();
        let mut nonce = 0u64;
        let limits = &self.settings.limits;
        let mut budget = TokenBucket::new(limits.control_messages_per_second, limits.control_burst);
        loop {
            let message = tokio::select! {
                _ = session.cancel.cancelled() => return None,
                _ = ticker.tick() => {
                    if last_seen.elapsed() > settings.heartbeat_tolerance {
                        tracing::info!(session.id = %session.id, "agent missed its heartbeats");
                        return Some(Failure::new(
                            ErrorCode::HEARTBEAT_TIMEOUT,
                            format!("nothing from the agent for {:?}", settings.heartbeat_tolerance),
                        ));
                    }
                    nonce += 1;
                    let ping = pb::edge_message::Msg::Ping(pb::Heartbeat { nonce });
                    let _ = session.control.try_send(edge_message(ping));
                    continue;
                }
                message = inbound.message() => message,
            };
            let msg = match message {
                Ok(Some(pb::AgentMessage { msg: Some(msg) })) => msg,
                Ok(Some(pb::AgentMessage { msg: None })) => continue,
                Ok(None) => return None,
                Err(status) => {
                    tracing::debug!(session.id = %session.id, %status, "control stream failed");
                    return None;
                }
            };
            last_seen = Instant::now();
            // Over the budget, binds and unbinds are refused one by one (a
            // heartbeat is still answered: it is what keeps the session
            // alive); a peer a whole burst beyond it is cut off.
            let throttled = match budget.take(last_seen) {
                Take::Granted => None,
                Take::Throttled { retry_after } => Some(Failure::new(
                    ErrorCode::CONTROL_THROTTLED,
                    format!(
                        "over the control budget ({} messages a second, burst {}); send it again in {} ms",
                        limits.control_messages_per_second,
                        limits.control_burst,
                        retry_after.as_millis().max(1)
                    ),
                )),
                Take::Exhausted => {
                    tracing::warn!(session.id = %session.id, "agent flooded the control stream");
                    return Some(Failure::new(
                        ErrorCode::CONTROL_FLOOD,
                        format!(
                            "a whole burst ({}) of control messages beyond the budget of {} a second",
                            limits.control_burst, limits.control_messages_per_second
                        ),
                    ));
                }
            };
            use pb::agent_message::Msg;
            let reply = match (msg, throttled) {
                (Msg::Bind(req), Some(failure)) => {
                    self.counters.bind_refused(&failure);
                    pb::edge_message::Msg::Bind(pb::BindResponse {
                        request_id: req.request_id,
                        error: Some(failure.to_pb()),
                        ..Default::default()
                    })
                }
                (Msg::Unbind(req), Some(failure)) => {
                    pb::edge_message::Msg::Unbind(pb::UnbindResponse {
                        request_id: req.request_id,
                        error: Some(failure.to_pb()),
                    })
                }
                (msg, _) => match msg {
                    Msg::Hello(_) => {
                        return Some(Failure::new(
                            ErrorCode::PROTOCOL_VIOLATION,
                            "hello sent twice",
                        ));
                    }
                    Msg::Bind(req) => {
                        let request_id = req.request_id;
                        let response = match self.bind(session, req).await {
                            Ok((endpoint_id, public_url)) => pb::BindResponse {
                                request_id,
                                endpoint_id,
                                public_url,
                                error: None,
                            },
                            Err(failure) => {
                                self.counters.bind_refused(&failure);
                                tracing::info!(session.id = %session.id, error = %failure, "bind refused");
                                pb::BindResponse {
                                    request_id,
                                    error: Some(failure.to_pb()),
                                    ..Default::default()
                                }
                            }
                        };
                        pb::edge_message::Msg::Bind(response)
                    }
                    Msg::Unbind(req) => {
                        let error = self
                            .unbind(session, &req.endpoint_id)
                            .err()
                            .map(|f| f.to_pb());
                        pb::edge_message::Msg::Unbind(pb::UnbindResponse {
                            request_id: req.request_id,
                            error,
                        })
                    }
                    Msg::Ping(hb) => pb::edge_message::Msg::Pong(hb),
                    Msg::Pong(_) => continue,
                },
            };
            if session.control.send(edge_message(reply)).await.is_err() {
                return None;
            }
        }
    }

    async fn bind(
        &self,
        session: &Arc<AgentSession>,
        req: pb::BindRequest,
    ) -> Result<(String, String), Failure> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Failure::new(
                ErrorCode::DRAINING,
                "this edge node is shutting down",
            ));
        }
        let limit = self.settings.limits.endpoints_per_session;
        if session.endpoints.lock().expect("endpoints lock").len() >= limit {
            return Err(Failure::new(
                ErrorCode::TOO_MANY_ENDPOINTS,
                format!("this session already has {limit} endpoints"),
            ));
        }
        let mut spec = base_spec(&req)?;
        if spec.protocol == Protocol::Tcp {
            if !session.acl.allows_port(spec.remote_port) {
                return Err(Failure::new(
                    ErrorCode::ACL_DENIES_ADDRESS,
                    match spec.remote_port {
                        0 => "the authtoken's ACL allows only certain ports; ask for one with --remote-addr".to_string(),
                        p => format!("the authtoken's ACL does not permit binding port {p}"),
                    },
                ));
            }
        } else {
            match &spec.domain {
                Some(domain) if !session.acl.allows_name(domain) => {
                    return Err(Failure::new(
                        ErrorCode::ACL_DENIES_NAME,
                        format!("the authtoken's ACL does not permit binding {domain}"),
                    ));
                }
                None if !session.acl.is_unrestricted() => {
                    return Err(Failure::new(
                        ErrorCode::ACL_DENIES_NAME,
                        "the authtoken's ACL allows only certain names; give one with --domain",
                    ));
                }
                _ => {}
            }
        }
        let cluster = self.cluster.get();
        if let Some(cluster) = cluster {
            cluster.check_bind(&spec, session.owner_id())?;
        }
        let policy_cas = self.policy_cas(spec.domain.as_ref());
        self.finish_spec(&mut spec, &req).await?;
        let endpoint = self.gateway.add(spec, session.clone())?;
        session
            .endpoints
            .lock()
            .expect("endpoints lock")
            .push(Bound {
                id: endpoint.id.clone(),
                req: crate::cluster::bound_request(&endpoint, &req),
                policy_cas,
            });
        tracing::info!(session.id = %session.id, endpoint = %endpoint.id, url = %endpoint.public_url, "endpoint bound");
        if let Some(cluster) = cluster {
            cluster.publish_endpoint(&endpoint, session, &req);
        }
        Ok((endpoint.id.clone(), endpoint.public_url.clone()))
    }

    /// The settings of an endpoint another node's agent serves, from its
    /// bind request as that node announced it.
    pub async fn remote_spec(&self, req: &pb::BindRequest) -> Result<EndpointSpec, Failure> {
        let mut spec = base_spec(req)?;
        self.finish_spec(&mut spec, req).await?;
        Ok(spec)
    }

    /// What the gateway needs beyond the name or port: TLS termination,
    /// client certificates, OAuth, and the pool key of a pooling endpoint.
    /// The same for an endpoint of this node's agents and for one served
    /// through another node.
    pub async fn finish_spec(
        &self,
        spec: &mut EndpointSpec,
        req: &pb::BindRequest,
    ) -> Result<(), Failure> {
        if spec.protocol == Protocol::Tls {
            self.tls_options(spec, req)?;
        }
        spec.mutual_tls = self.mutual_tls(spec, req)?;
        spec.oauth = crate::oauth::bind(&self.settings.oauth, spec, req).await?;
        spec.pool_key = req.pooling_enabled.then(|| pool_key(req));
        Ok(())
    }

    /// The client-certificate policy: the agent's PEM bundle and CA ids,
    /// plus the CAs edge policies require for this domain.
    fn mutual_tls(
        &self,
        spec: &EndpointSpec,
        req: &pb::BindRequest,
    ) -> Result<Option<Arc<MtlsPolicy>>, Failure> {
        let mut ids = req.mutual_tls_ca_ids.clone();
        ids.extend(self.policy_cas(spec.domain.as_ref()));
        ids.sort();
        ids.dedup();
        let inline = if req.mutual_tls_cas_pem.is_empty() {
            Vec::new()
        } else {
            parse_ca_bundle(&req.mutual_tls_cas_pem)
                .map_err(|e| Failure::new(ca_error_code(&e), format!("mutual_tls_cas: {e}")))?
        };
        if inline.is_empty() && ids.is_empty() {
            return Ok(None);
        }
        let terminated_here = spec.protocol == Protocol::Http
            || (spec.protocol == Protocol::Tls && spec.terminate_at == TerminateAt::Edge);
        if !terminated_here {
            return Err(Failure::new(
                ErrorCode::MTLS_NEEDS_TERMINATION,
                "mutual TLS needs terminate_at: edge (or terminate_at: agent with the CAs at the agent)",
            ));
        }
        if let Some(missing) = ids.iter().find(|id| self.settings.cas.get(id).is_none()) {
            return Err(Failure::new(
                ErrorCode::MTLS_UNKNOWN_CA,
                format!("mutual_tls_cas: {missing}"),
            ));
        }
        let count = inline.len() + ids.len();
        if count > MAX_CAS {
            return Err(Failure::new(
                ErrorCode::MTLS_TOO_MANY_CAS,
                format!("mutual_tls_cas: {count} CAs; at most {MAX_CAS}"),
            ));
        }
        let resolver: Arc<dyn CaResolver> = self.settings.cas.clone();
        Ok(Some(Arc::new(MtlsPolicy::new(inline, ids, Some(resolver)))))
    }

    fn tls_options(&self, spec: &mut EndpointSpec, req: &pb::BindRequest) -> Result<(), Failure> {
        let has_cert = !req.tls_cert_pem.is_empty() || !req.tls_key_pem.is_empty();
        spec.terminate_at = match pb::TerminateAt::try_from(req.terminate_at) {
            Ok(pb::TerminateAt::Unspecified) if has_cert => TerminateAt::Edge,
            Ok(pb::TerminateAt::Unspecified | pb::TerminateAt::Upstream) => TerminateAt::Upstream,
            Ok(pb::TerminateAt::Edge) => TerminateAt::Edge,
            Ok(pb::TerminateAt::Agent) => TerminateAt::Agent,
            Err(_) => {
                return Err(Failure::new(
                    ErrorCode::INVALID_TERMINATE_AT,
                    format!("value {}", req.terminate_at),
                ));
            }
        };
        if spec.terminate_at != TerminateAt::Edge {
            return Ok(());
        }
        if has_cert {
            let key = certified_key_from_pem(
                Pem::new("crt", &req.tls_cert_pem),
                Pem::new("key", &req.tls_key_pem),
            )
            .map_err(|e| Failure::new(ErrorCode::INVALID_BIND, e.to_string()))?;
            spec.certificate = Some(Arc::new(key));
            return Ok(());
        }
        let name = match &spec.domain {
            Some(DomainPattern::Exact(name)) => name.clone(),
            Some(DomainPattern::Wildcard(suffix)) => format!("x.{suffix}"),
            None => return Ok(()), // a random name under the base: the dev CA or a configured wildcard covers it
        };
        if self.gateway.certs().lookup(&name).is_none() {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                format!(
                    "the edge has no certificate for {name}; pass --crt and --key to terminate at the edge"
                ),
            ));
        }
        Ok(())
    }

    fn unbind(&self, session: &AgentSession, endpoint_id: &str) -> Result<(), Failure> {
        let mut endpoints = session.endpoints.lock().expect("endpoints lock");
        let Some(i) = endpoints.iter().position(|e| e.id == endpoint_id) else {
            return Err(Failure::new(
                ErrorCode::UNKNOWN_ENDPOINT,
                endpoint_id.to_string(),
            ));
        };
        endpoints.remove(i);
        self.gateway.remove(endpoint_id);
        if let Some(cluster) = self.cluster.get() {
            cluster.withdraw_endpoint(endpoint_id);
        }
        tracing::info!(session.id = %session.id, endpoint = endpoint_id, "endpoint unbound");
        Ok(())
    }

    /// Ends a session at an administrator's request: the agent exits with
    /// `ERR_POSTERN_9012` instead of reconnecting.
    pub fn stop_session(&self, session: &Arc<AgentSession>) {
        self.close(
            session,
            Some(Failure::new(
                ErrorCode::SESSION_STOPPED,
                "the session was stopped through the admin API",
            )),
        );
    }

    /// Stops one endpoint of this node's agents and tells its agent why;
    /// the session goes on. Nothing when no session has it.
    pub fn stop_endpoint(&self, endpoint_id: &str, failure: Failure) {
        let Some(session) = self.sessions().into_iter().find(|s| {
            s.endpoints
                .lock()
                .expect("endpoints lock")
                .iter()
                .any(|b| b.id == endpoint_id)
        }) else {
            return;
        };
        if self.unbind(&session, endpoint_id).is_ok() {
            tracing::warn!(session.id = %session.id, endpoint = endpoint_id, error = %failure.detail, "endpoint stopped");
            let stopped = pb::EndpointStopped {
                endpoint_id: endpoint_id.to_string(),
                error: Some(failure.to_pb()),
            };
            let _ = session
                .control
                .try_send(edge_message(pb::edge_message::Msg::EndpointStopped(
                    stopped,
                )));
        }
    }

    /// Closes the sessions whose authtoken is no longer valid (a credential
    /// revoked anywhere in the cluster).
    pub fn revalidate(&self) {
        let revoked: Vec<Arc<AgentSession>> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|s| !self.tokens.knows(&s.token_hash))
            .cloned()
            .collect();
        for session in revoked {
            tracing::info!(session.id = %session.id, "the session's authtoken was revoked");
            self.close(
                &session,
                Some(Failure::new(
                    ErrorCode::AUTHTOKEN_INVALID,
                    "the authtoken was revoked",
                )),
            );
        }
    }

    /// The CAs the edge config's and the cluster's endpoint policies
    /// require for endpoints on `domain`, sorted.
    pub fn policy_cas(&self, domain: Option<&DomainPattern>) -> Vec<String> {
        let Some(domain) = domain else {
            return Vec::new();
        };
        let cluster = self.cluster.get().map(|c| c.endpoint_policies());
        EndpointPolicy::cas_for(
            self.settings
                .endpoint_policies
                .iter()
                .chain(cluster.iter().flatten()),
            domain,
        )
    }

    /// Builds again the endpoints of this node's agents whose endpoint
    /// policies changed, in place: the agent's session and the endpoint's
    /// id stay, the next handshake asks for the new CAs. An endpoint that
    /// can no longer be built (a required CA is not known here) ends its
    /// session with the reason, so the agent reconnects and is told at
    /// bind; nothing is served without the CAs a policy requires.
    pub async fn apply_policies(&self) {
        for session in self.sessions() {
            let bound: Vec<Bound> = session.endpoints.lock().expect("endpoints lock").clone();
            for old in bound {
                let policy_cas = self.policy_cas(old.domain().as_ref());
                if policy_cas == old.policy_cas {
                    continue;
                }
                if let Err(failure) = self.rebuild(&session, &old, policy_cas).await {
                    tracing::warn!(session.id = %session.id, endpoint = %old.id, error = %failure.detail, "an endpoint policy changed and the endpoint cannot be built again");
                    self.close(&session, Some(failure));
                    break;
                }
                tracing::info!(session.id = %session.id, endpoint = %old.id, "endpoint built again for a changed endpoint policy");
            }
        }
    }

    async fn rebuild(
        &self,
        session: &Arc<AgentSession>,
        old: &Bound,
        policy_cas: Vec<String>,
    ) -> Result<(), Failure> {
        let mut spec = base_spec(&old.req)?;
        spec.id = Some(old.id.clone());
        self.finish_spec(&mut spec, &old.req).await?;
        let mut endpoints = session.endpoints.lock().expect("endpoints lock");
        let Some(bound) = endpoints.iter_mut().find(|b| b.id == old.id) else {
            return Ok(()); // unbound meanwhile
        };
        self.gateway.remove(&old.id);
        self.gateway.add(spec, session.clone())?;
        bound.policy_cas = policy_cas;
        Ok(())
    }

    /// Ends a session: unbinds its endpoints, drops its parked streams and,
    /// when `reason` is given, tells the agent why. Idempotent.
    pub fn close(&self, session: &Arc<AgentSession>, reason: Option<Failure>) {
        {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions
                .get(&session.id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.id);
            }
        }
        if let Some(reason) = reason {
            let mut end = session.end_reason.lock().expect("end lock");
            if end.is_none() {
                let _ = session
                    .control
                    .try_send(edge_message(pb::edge_message::Msg::Error(reason.to_pb())));
                *end = Some(reason);
            }
        }
        let cluster = self.cluster.get();
        for bound in session.endpoints.lock().expect("endpoints lock").drain(..) {
            self.gateway.remove(&bound.id);
            if let Some(cluster) = cluster {
                cluster.withdraw_endpoint(&bound.id);
            }
        }
        {
            let mut pool = session.pool.lock().expect("pool lock");
            pool.closed = true;
            pool.parked.clear();
            pool.waiters.clear();
        }
        if !session.cancel.is_cancelled() {
            session.cancel.cancel();
            if let Some(cluster) = cluster {
                cluster.withdraw_session(&session.id);
            }
            tracing::info!(session.id = %session.id, "agent session closed");
            if let Some(cut) = session.cut_connection.clone() {
                // Let the goodbye message go out first.
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    cut.cancel();
                });
            }
        }
    }

    /// Tells every agent the node is draining and refuses new sessions.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for session in self.sessions.lock().expect("sessions lock").values() {
            let drain = pb::edge_message::Msg::Drain(pb::Drain {
                reason: "the edge node is shutting down".into(),
            });
            let _ = session.control.try_send(edge_message(drain));
        }
    }

    /// Closes every session and waits for their tasks.
    pub async fn shutdown(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .cloned()
            .collect();
        for session in sessions {
            self.close(
                &session,
                Some(Failure::new(
                    ErrorCode::DRAINING,
                    "the edge node is shutting down",
                )),
            );
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The name or port, protocol and IP policy a bind asks for, checked for
/// form only.
pub fn base_spec(req: &pb::BindRequest) -> Result<EndpointSpec, Failure> {
    let protocol = match pb::Protocol::try_from(req.protocol) {
        Ok(pb::Protocol::Http) => Protocol::Http,
        Ok(pb::Protocol::Tls) => Protocol::Tls,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        _ => {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                "protocol must be http, tls or tcp",
            ));
        }
    };
    let mut spec = EndpointSpec {
        id: None,
        name: req.name.clone(),
        protocol,
        domain: None,
        remote_port: 0,
        terminate_at: TerminateAt::Upstream,
        certificate: None,
        proxy_proto: req.proxy_proto != 0,
        mutual_tls: None,
        oauth: None,
        ip_policy: match &req.ip_restriction {
            Some(r) if !(r.allow_cidrs.is_empty() && r.deny_cidrs.is_empty()) => Some(Arc::new(
                IpPolicy::parse(&r.allow_cidrs, &r.deny_cidrs).map_err(|e| {
                    Failure::new(ErrorCode::INVALID_BIND, format!("ip_restriction.{e}"))
                })?,
            )),
            _ => None,
        },
        pool_key: None,
        remote: None,
        traffic_policy: match req.traffic_policy.trim() {
            "" => None,
            text => Some(PolicyDocument::parse(text).map_err(|e| {
                Failure::new(
                    ErrorCode::POLICY_INVALID,
                    format!("the traffic policy is not a policy document: {e}"),
                )
            })?),
        },
        operator_policy: None,
        http_modules: req.modules.clone(),
    };
    if protocol == Protocol::Tcp {
        spec.remote_port = u16::try_from(req.remote_port).map_err(|_| {
            Failure::new(
                ErrorCode::INVALID_BIND,
                format!("{} is not a port", req.remote_port),
            )
        })?;
    } else if !req.domain.is_empty() {
        spec.domain = Some(DomainPattern::parse(&req.domain).map_err(|e| {
            Failure::new(ErrorCode::INVALID_DOMAIN, format!("{:?}: {e}", req.domain))
        })?);
    }
    Ok(spec)
}

/// What endpoints of one pool must share, as a digest: everything a bind
/// sets but its request id, tunnel name, upstream, name and port.
fn pool_key(req: &pb::BindRequest) -> String {
    use prost::Message;
    let mut settings = req.clone();
    settings.request_id = 0;
    settings.name.clear();
    settings.forwards_to.clear();
    settings.domain.clear();
    settings.remote_port = 0;
    settings.mutual_tls_ca_ids.sort();
    let digest = ring::digest::digest(&ring::digest::SHA256, &settings.encode_to_vec());
    hex::encode(&digest.as_ref()[..16])
}

impl AgentSession {
    /// The owner of the session's credential, if any.
    pub fn owner_id(&self) -> Option<&str> {
        self.credential.as_ref()?.owner_id.as_deref()
    }

    pub fn stream_token_matches(&self, presented: &str) -> bool {
        let (a, b) = (self.stream_token.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The agent opened a data stream: hand it to a waiting visitor, or park it.
    pub fn park(&self, mut stream: ClaimedStream) {
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.closed {
            return;
        }
        while let Some(waiter) = pool.waiters.pop_front() {
            match waiter.send(stream) {
                Ok(()) => return,
                Err(back) => stream = back,
            }
        }
        if pool.parked.len() < pool.cap {
            pool.parked.push_back(stream);
        }
    }

    /// Ends the control stream once queued messages are out.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }
}

impl StreamSource for AgentSession {
    fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
        let pool = self.pool.clone();
        let control = self.control.clone();
        let wait = self.stream_wait;
        let permit = self.streams.clone().try_acquire_owned();
        Box::pin(async move {
            let permit = permit.map_err(|_| {
                Failure::new(
                    ErrorCode::AGENT_CONNECTION_LIMIT,
                    "the agent is at its limit of simultaneous connections",
                )
            })?;
            let mut claimed = Self::take_stream(pool, control, wait).await?;
            claimed.permit = Some(permit);
            Ok(claimed)
        })
    }

    fn session_id(&self) -> &str {
        &self.id
    }
}

impl AgentSession {
    /// A parked data stream, or one the agent opens on request.
    async fn take_stream(
        pool: Arc<Mutex<StreamPool>>,
        control: ControlTx,
        wait: std::time::Duration,
    ) -> Result<ClaimedStream, Failure> {
        let rx = {
            let mut pool = pool.lock().expect("pool lock");
            if pool.closed {
                return Err(Failure::new(
                    ErrorCode::AGENT_FORWARD_FAILED,
                    "the agent session has ended",
                ));
            }
            while let Some(parked) = pool.parked.pop_front() {
                if !parked.attach.is_closed() {
                    return Ok(parked);
                }
            }
            let (tx, rx) = oneshot::channel();
            pool.waiters.push_back(tx);
            rx
        };
        // An agent without a pool opens a stream only when asked: wait for
        // room on a busy control stream rather than drop the request.
        let deadline = tokio::time::Instant::now() + wait;
        let ask = pb::edge_message::Msg::OpenStreams(pb::OpenStreams { count: 1 });
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, control.send(edge_message(ask))).await
        {
            return Err(Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent session has ended",
            ));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(_)) => Err(Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent session has ended",
            )),
            Err(_) => Err(Failure::new(
                ErrorCode::STREAM_UNAVAILABLE,
                format!("no data stream from the agent within {wait:?}"),
            )),
        }
    }
}

use std::future::Future;

/// The control stream the edge sends: queued messages, then the end once
/// the session is cancelled.
pub struct ControlOut {
    rx: mpsc::Receiver<Result<pb::EdgeMessage, Status>>,
    cancelled: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl ControlOut {
    pub fn new(
        rx: mpsc::Receiver<Result<pb::EdgeMessage, Status>>,
        cancelled: Option<tokio_util::sync::WaitForCancellationFutureOwned>,
    ) -> Self {
        ControlOut {
            rx,
            cancelled: cancelled.map(Box::pin),
        }
    }
}

impl Stream for ControlOut {
    type Item = Result<pb::EdgeMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = self.rx.poll_recv(cx) {
            return Poll::Ready(item);
        }
        let cancelled = self
            .cancelled
            .as_mut()
            .is_some_and(|c| c.as_mut().poll(cx).is_ready());
        if cancelled {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
