//! The agent sessions of this node and the endpoints they bound: a hello
//! authenticated into a session, binds and unbinds, closing, drain.
//!
//! The registry tells what happens to its sessions and endpoints as
//! [`RegistryEvent`]s to every subscriber (the cluster announces them), and
//! asks what it needs to know of the cluster through [`ClusterView`], which
//! the composition root wires in. It never imports the cluster.

mod bind;
mod control;
mod session;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::Stream;
use postern_ingress::{Endpoint, EndpointSpec, Gateway, Location, OAuthService};
use postern_net::random_id;
use postern_proto::{ErrorCode, Failure, TokenBucket, negotiate, pb};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;
use tracing::Instrument;

pub use bind::{Binder, host_of};
pub use control::{ControlOut, ControlTx};
pub use session::{AgentSession, COMMAND_WAIT, MAX_CONNECTIONS, SdkLink, SessionCommand};

use bind::{base_spec, bound_request, resolve_url};
use control::edge_message;
use session::{Bound, Link, StreamPool};

use crate::{
    auth::{AuthtokenRecord, Authtokens, CredentialRef},
    ca_store::CaStore,
    config::{EndpointPolicy, Limits, Required, SessionSettings},
    service::PeerInfo,
};

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
    pub oauth: Arc<OAuthService>,
    /// The cluster the node is in, asked about hellos and binds.
    pub cluster: Option<Arc<dyn ClusterView>>,
}

/// What the registry asks of the cluster this node is in.
pub trait ClusterView: Send + Sync {
    /// Refuses an agent connecting through an agent ingress (the TLS
    /// `server_name`) its token's owner may not use.
    fn check_ingress(&self, server_name: Option<&str>, owner: Option<&str>) -> Result<(), Failure>;
    /// Refuses binding a name reserved for another owner.
    fn check_bind(&self, spec: &EndpointSpec, owner: Option<&str>) -> Result<(), Failure>;
    /// The cluster's endpoint policies, beside the edge config's.
    fn endpoint_policies(&self) -> Vec<EndpointPolicy>;
    /// Where agents reach the other live nodes of this node's region.
    fn region_agent_addrs(&self) -> Vec<String>;
}

/// Something that happened to this node's sessions or endpoints, in the
/// order it happened.
#[derive(Clone)]
pub enum RegistryEvent {
    SessionOpened(Arc<AgentSession>),
    SessionClosed(String),
    EndpointBound {
        endpoint: Arc<Endpoint>,
        session_id: String,
        /// The bind request with the name or port as bound.
        request: Box<pb::BindRequest>,
        bound_at: SystemTime,
    },
    EndpointUnbound(String),
}

/// Who an agent says it is: from a Postern agent's hello, or an ngrok
/// SDK's Auth.
pub struct AgentHello {
    pub authtoken: String,
    pub agent_version: String,
    /// The same for every session of one agent process: a newer session
    /// with it supersedes the older.
    pub instance_id: String,
    pub os: String,
}

/// All agent sessions of this node.
pub struct Registry {
    gateway: Gateway,
    tokens: Arc<Authtokens>,
    settings: RegistrySettings,
    binder: Binder,
    sessions: Mutex<HashMap<String, Arc<AgentSession>>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<RegistryEvent>>>,
    /// The sessions' control loops.
    tracker: TaskTracker,
    /// Closed sessions' connections, cut once the goodbye is out, or at
    /// once when `cut_now` is cancelled.
    cuts: TaskTracker,
    cut_now: CancellationToken,
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

fn draining() -> Failure {
    Failure::new(ErrorCode::DRAINING, "this edge node is shutting down")
}

impl Registry {
    pub fn new(
        gateway: Gateway,
        tokens: Arc<Authtokens>,
        settings: RegistrySettings,
    ) -> Arc<Registry> {
        let binder = Binder {
            certs: gateway.certs().clone(),
            cas: settings.cas.clone(),
            oauth: settings.oauth.clone(),
            endpoint_policies: settings.endpoint_policies.clone(),
            cluster: settings.cluster.clone(),
        };
        Arc::new(Registry {
            gateway,
            tokens,
            settings,
            binder,
            sessions: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            tracker: TaskTracker::new(),
            cuts: TaskTracker::new(),
            cut_now: CancellationToken::new(),
            draining: AtomicBool::new(false),
            counters: SessionCounters::default(),
        })
    }

    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    /// Every event from now on, in order, until the registry shuts down.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<RegistryEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().expect("subscribers lock").push(tx);
        rx
    }

    fn publish(&self, event: RegistryEvent) {
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .retain(|tx| tx.send(event.clone()).is_ok());
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

    /// Checks binds and builds endpoints, for this node's agents and for
    /// endpoints served through other nodes.
    pub fn binder(&self) -> &Binder {
        &self.binder
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

    /// The connections the agents of this node's sessions have open.
    pub fn connection_count(&self) -> usize {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(|s| s.open_connections())
            .sum()
    }

    /// Authenticates a hello and registers the session; the caller then
    /// runs [`Registry::spawn_session`]. On refusal, the error to send.
    pub fn open_session(
        &self,
        hello: pb::Hello,
        control: ControlTx,
        peer: Option<PeerInfo>,
    ) -> Result<Arc<AgentSession>, Failure> {
        let record = self.tokens.authenticate(&hello.authtoken)?;
        self.admit(hello, record, control, peer)
    }

    /// Registers a session whose credential is already known (an SSH
    /// session logged in with its authtoken) as [`Registry::open_session`]
    /// does for an agent's hello: its `authtoken` is not looked at.
    pub fn admit(
        &self,
        hello: pb::Hello,
        record: AuthtokenRecord,
        control: ControlTx,
        peer: Option<PeerInfo>,
    ) -> Result<Arc<AgentSession>, Failure> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(draining());
        }
        let version = negotiate(hello.min_protocol_version, hello.protocol_version)
            .map_err(|m| Failure::new(ErrorCode::PROTOCOL_VERSION, m))?;
        let limits = &self.settings.limits;
        let link = Link::Postern {
            control: control.clone(),
            pool: Arc::new(Mutex::new(StreamPool::new(
                (limits.stream_pool as usize * 2).max(8),
            ))),
        };
        let who = AgentHello {
            authtoken: hello.authtoken,
            agent_version: hello.agent_version,
            instance_id: hello.instance_id,
            os: hello.os,
        };
        let session = self.register_session(who, record, link, peer, limits.streams_per_session)?;
        // The channel is new and empty: this cannot fail for lack of room.
        let welcome = self.welcome(version, &session);
        let _ = control.try_send(edge_message(pb::edge_message::Msg::Welcome(welcome)));
        Ok(session)
    }

    /// Authenticates an ngrok SDK's Auth and registers its session, which
    /// carries at most `stream_cap` proxied connections at once.
    pub fn open_sdk_session(
        &self,
        hello: AgentHello,
        link: Arc<dyn SdkLink>,
        peer: Option<PeerInfo>,
        stream_cap: usize,
    ) -> Result<Arc<AgentSession>, Failure> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(draining());
        }
        let record = self.tokens.authenticate(&hello.authtoken)?;
        let streams = self.settings.limits.streams_per_session.min(stream_cap);
        self.register_session(hello, record, Link::Sdk(link), peer, streams)
    }

    /// Checks the agent ingress, registers the session and supersedes the
    /// older ones of the same agent.
    fn register_session(
        &self,
        hello: AgentHello,
        record: AuthtokenRecord,
        link: Link,
        peer: Option<PeerInfo>,
        streams: usize,
    ) -> Result<Arc<AgentSession>, Failure> {
        if let Some(cluster) = &self.settings.cluster {
            let ingress = peer.as_ref().and_then(|p| p.server_name.as_deref());
            cluster.check_ingress(ingress, record.owner_id())?;
        }
        let session = self.new_session(&hello, &record, link, peer, streams);
        let superseded = self.register(&session, &record)?;
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.publish(RegistryEvent::SessionOpened(session.clone()));
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
        tracing::info!(
            session.id = %session.id,
            token = %record.id(),
            agent_version = %hello.agent_version,
            "agent session opened"
        );
        Ok(session)
    }

    fn new_session(
        &self,
        hello: &AgentHello,
        record: &AuthtokenRecord,
        link: Link,
        peer: Option<PeerInfo>,
        streams: usize,
    ) -> Arc<AgentSession> {
        Arc::new(AgentSession {
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
            link,
            endpoints: Mutex::new(Vec::new()),
            cancel: CancellationToken::new(),
            end_reason: Mutex::new(None),
            stream_wait: self.settings.session.stream_wait,
            connections: Mutex::new(peer.into_iter().collect()),
            streams: Arc::new(tokio::sync::Semaphore::new(streams)),
        })
    }

    /// Adds `session` within its token's session limit; the sessions of
    /// the same agent instance it supersedes are out of the registry and
    /// returned, to be closed.
    fn register(
        &self,
        session: &Arc<AgentSession>,
        record: &AuthtokenRecord,
    ) -> Result<Vec<Arc<AgentSession>>, Failure> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let superseded: Vec<Arc<AgentSession>> = sessions
            .values()
            .filter(|s| {
                s.token_hash == record.sha256
                    && !session.instance_id.is_empty()
                    && s.instance_id == session.instance_id
            })
            .cloned()
            .collect();
        let live = sessions
            .values()
            .filter(|s| s.token_hash == record.sha256)
            .count()
            - superseded.len();
        let limit = self.settings.limits.sessions_per_token;
        if live >= limit {
            return Err(Failure::new(
                ErrorCode::TOO_MANY_SESSIONS,
                format!("this authtoken already has {live} sessions (limit {limit})"),
            ));
        }
        for old in &superseded {
            sessions.remove(&old.id);
        }
        sessions.insert(session.id.clone(), session.clone());
        Ok(superseded)
    }

    fn welcome(&self, protocol_version: u32, session: &AgentSession) -> pb::Welcome {
        let settings = &self.settings;
        pb::Welcome {
            protocol_version,
            session_id: session.id.clone(),
            stream_token: session.stream_token.clone(),
            region: settings.region.clone(),
            node_id: settings.node_id.clone(),
            heartbeat_interval_ms: settings.session.heartbeat_interval.as_millis() as u32,
            heartbeat_tolerance_ms: settings.session.heartbeat_tolerance.as_millis() as u32,
            alternate_addrs: settings
                .cluster
                .as_ref()
                .map(|c| c.region_agent_addrs())
                .unwrap_or_default(),
            control_rate: settings.limits.control_messages_per_second,
            control_burst: settings.limits.control_burst,
            endpoints_per_session: u32::try_from(settings.limits.endpoints_per_session)
                .unwrap_or(u32::MAX),
        }
    }

    /// Runs the session's control loop as a tracked task.
    pub fn spawn_session(
        self: &Arc<Self>,
        session: Arc<AgentSession>,
        inbound: impl Stream<Item = Result<pb::AgentMessage, Status>> + Send + Unpin + 'static,
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
                let end = control::run(&registry, &session, inbound).await;
                registry.close(&session, end);
            }
            .instrument(span),
        );
    }

    /// Binds an endpoint for `session`: its public id and URL.
    pub(crate) async fn bind(
        &self,
        session: &Arc<AgentSession>,
        req: pb::BindRequest,
    ) -> Result<(String, String), Failure> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(draining());
        }
        let limit = self.settings.limits.endpoints_per_session;
        if session.endpoints.lock().expect("endpoints lock").len() >= limit {
            return Err(Failure::new(
                ErrorCode::TOO_MANY_ENDPOINTS,
                format!("this session already has {limit} endpoints"),
            ));
        }
        let req = resolve_url(req, self.gateway.config())?;
        let mut spec = base_spec(&req)?;
        self.binder.check(&spec, &session.acl, session.owner_id())?;
        let required = self.binder.required(spec.domain.as_ref());
        self.binder.finish_spec(&mut spec, &req).await?;
        let endpoint = self.gateway.add(spec, session.clone())?;
        let request = bound_request(&endpoint, &req);
        session
            .endpoints
            .lock()
            .expect("endpoints lock")
            .push(Bound {
                id: endpoint.id.clone(),
                req: request.clone(),
                required,
            });
        tracing::info!(session.id = %session.id, endpoint = %endpoint.id, url = %endpoint.public_url, "endpoint bound");
        let bound = (endpoint.id.clone(), endpoint.public_url.clone());
        self.publish(RegistryEvent::EndpointBound {
            endpoint,
            session_id: session.id.clone(),
            request: Box::new(request),
            bound_at: SystemTime::now(),
        });
        Ok(bound)
    }

    pub(crate) fn unbind(&self, session: &AgentSession, endpoint_id: &str) -> Result<(), Failure> {
        let mut endpoints = session.endpoints.lock().expect("endpoints lock");
        let Some(i) = endpoints.iter().position(|e| e.id == endpoint_id) else {
            return Err(Failure::new(
                ErrorCode::UNKNOWN_ENDPOINT,
                endpoint_id.to_string(),
            ));
        };
        endpoints.remove(i);
        self.gateway.remove(endpoint_id);
        self.publish(RegistryEvent::EndpointUnbound(endpoint_id.to_string()));
        tracing::info!(session.id = %session.id, endpoint = endpoint_id, "endpoint unbound");
        Ok(())
    }

    /// A session's control budget, full: an SDK's RPCs spend it as a
    /// Postern agent's control messages do.
    pub(crate) fn control_budget(&self) -> TokenBucket {
        let limits = &self.settings.limits;
        TokenBucket::new(limits.control_messages_per_second, limits.control_burst)
    }

    /// Takes one message from `budget`: `Ok(Some(refusal))` over it, `Err`
    /// a whole burst beyond it (the session ends).
    pub(crate) fn spend(&self, budget: &mut TokenBucket) -> Result<Option<Failure>, Failure> {
        control::within_budget(budget, &self.settings.limits, std::time::Instant::now())
    }

    /// Whether the node is draining (new sessions are refused).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The region of this node.
    pub fn region(&self) -> &str {
        &self.settings.region
    }

    /// Counts a refused bind (for `/metrics`).
    pub(crate) fn bind_refused(&self, failure: &Failure) {
        self.counters.bind_refused(failure);
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

    /// Runs an operator's `command` on a session of this node. An SDK
    /// session gets ngrok's command RPC and its handler answers; any other
    /// session is ended by a stop (a Postern agent then exits with
    /// `ERR_POSTERN_9012`) and takes no restart or update.
    pub async fn command(
        &self,
        session: &Arc<AgentSession>,
        command: SessionCommand,
    ) -> Result<(), Failure> {
        tracing::info!(session.id = %session.id, command = command.name(), "session command through the admin API");
        match (session.sdk_link(), command) {
            (Some(link), command) => link.command(command).await,
            (None, SessionCommand::Stop) => {
                self.stop_session(session);
                Ok(())
            }
            (None, command) => Err(Failure::new(
                ErrorCode::COMMAND_UNSUPPORTED,
                format!(
                    "session {} is not an ngrok SDK session, and only those take {}; stop it instead and let what runs the agent start it again",
                    session.id,
                    command.name()
                ),
            )),
        }
    }

    /// Stops one endpoint of this node's agents and tells its agent why;
    /// the session goes on. Nothing when no session has it.
    pub fn stop_endpoint(&self, endpoint_id: &str, failure: Failure) {
        let Some(session) = self
            .sessions()
            .into_iter()
            .find(|s| s.has_endpoint(endpoint_id))
        else {
            return;
        };
        if self.unbind(&session, endpoint_id).is_ok() {
            tracing::warn!(session.id = %session.id, endpoint = endpoint_id, error = %failure.detail, "endpoint stopped");
            let stopped = pb::EndpointStopped {
                endpoint_id: endpoint_id.to_string(),
                error: Some(failure.to_pb()),
            };
            session.tell(pb::edge_message::Msg::EndpointStopped(stopped));
        }
    }

    /// Closes the sessions whose authtoken or SSH key is no longer valid (a
    /// credential revoked anywhere in the cluster).
    pub fn revalidate(&self) {
        let revoked: Vec<Arc<AgentSession>> = self
            .sessions()
            .into_iter()
            .filter(|s| !self.tokens.knows(&s.token_hash))
            .collect();
        for session in revoked {
            let failure = match &session.credential {
                Some(c) if CredentialRef::is_ssh_key(&c.id) => Failure::new(
                    ErrorCode::SSH_KEY_UNKNOWN,
                    format!("the SSH key's credential {} was revoked", c.id),
                ),
                _ => Failure::new(ErrorCode::AUTHTOKEN_INVALID, "the authtoken was revoked"),
            };
            tracing::info!(session.id = %session.id, error = %failure, "the session's credential was revoked");
            self.close(&session, Some(failure));
        }
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
                let required = self.binder.required(old.domain().as_ref());
                if required == old.required {
                    continue;
                }
                if let Err(failure) = self.rebuild(&session, &old, required).await {
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
        required: Required,
    ) -> Result<(), Failure> {
        let mut spec = self.binder.build(&old.req).await?;
        spec.id = Some(old.id.clone());
        let mut endpoints = session.endpoints.lock().expect("endpoints lock");
        let Some(bound) = endpoints.iter_mut().find(|b| b.id == old.id) else {
            return Ok(()); // unbound meanwhile
        };
        self.gateway.remove(&old.id);
        self.gateway.add(spec, session.clone())?;
        bound.required = required;
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
                session.tell(pb::edge_message::Msg::Error(reason.to_pb()));
                *end = Some(reason);
            }
        }
        for bound in session.endpoints.lock().expect("endpoints lock").drain(..) {
            self.gateway.remove(&bound.id);
            self.publish(RegistryEvent::EndpointUnbound(bound.id));
        }
        session.close_pool();
        // Under the connections' lock, so that a connection joining now
        // is either cut below or cut at once by `join`.
        let connections = {
            let connections = session.connections.lock().expect("connections lock");
            if session.cancel.is_cancelled() {
                return;
            }
            session.cancel.cancel();
            connections.clone()
        };
        self.publish(RegistryEvent::SessionClosed(session.id.clone()));
        tracing::info!(session.id = %session.id, connections = connections.len(), "agent session closed");
        if !connections.is_empty() {
            // Let the goodbye message go out first.
            let now = self.cut_now.clone();
            self.cuts.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = now.cancelled() => {}
                }
                for connection in connections {
                    connection.cut.cancel();
                }
            });
        }
    }

    /// Tells every agent the node is draining and refuses new sessions.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for session in self.sessions.lock().expect("sessions lock").values() {
            let drain = pb::edge_message::Msg::Drain(pb::Drain {
                reason: "the edge node is shutting down".into(),
            });
            session.tell(drain);
        }
    }

    /// Closes every session, waits for their control loops, and ends the
    /// event streams of the subscribers. Their connections are cut a moment
    /// later, or by [`Registry::cut_connections`].
    pub async fn shutdown(&self) {
        for session in self.sessions() {
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
        self.subscribers.lock().expect("subscribers lock").clear();
    }

    /// Cuts the connections of closed sessions that still wait for their
    /// goodbye to go out, and joins those tasks: the last step of a drain,
    /// once the agent listener has stopped.
    pub async fn cut_connections(&self) {
        self.cut_now.cancel();
        self.cuts.close();
        self.cuts.wait().await;
    }
}
