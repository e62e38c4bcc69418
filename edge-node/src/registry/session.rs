//! One agent's session: who it is, the endpoints it bound, and the pool of
//! data streams it parks for the gateway to claim.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::future::BoxFuture;
use postern_ingress::{ClaimedStream, DomainPattern, StreamSource};
use postern_proto::{ErrorCode, Failure, pb};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{
    bind::domain_of,
    control::{ControlTx, edge_message},
};
use crate::{acl::Acl, auth::CredentialRef, service::PeerInfo};

/// One agent's session.
pub struct AgentSession {
    pub id: String,
    pub(super) token_hash: String,
    pub(super) instance_id: String,
    pub(super) stream_token: String,
    pub(super) acl: Acl,
    /// The API credential the token is, with its owner.
    pub credential: Option<CredentialRef>,
    pub agent_version: String,
    pub os: String,
    pub started_at: SystemTime,
    /// The agent's address.
    pub peer: Option<SocketAddr>,
    /// How the edge reaches the agent.
    pub(super) link: Link,
    pub(super) endpoints: Mutex<Vec<Bound>>,
    pub(super) cancel: CancellationToken,
    pub(super) end_reason: Mutex<Option<Failure>>,
    pub(super) stream_wait: Duration,
    /// The agent's connections (the control stream's first, then those
    /// it opened for data streams).
    pub(super) connections: Mutex<Vec<PeerInfo>>,
    /// Permits for simultaneous proxied connections.
    pub(super) streams: Arc<Semaphore>,
}

/// How the edge reaches an agent: a Postern agent's control stream and the
/// data streams it parks, or an ngrok SDK's session.
pub(super) enum Link {
    Postern {
        control: ControlTx,
        pool: Arc<Mutex<StreamPool>>,
    },
    Sdk(Arc<dyn SdkLink>),
}

/// An agent session of ngrok's protocol, as the registry uses it.
pub trait SdkLink: Send + Sync {
    /// A new stream toward the agent for one proxied connection.
    fn open_stream(&self) -> Result<ClaimedStream, Failure>;
    /// The edge no longer serves the endpoint; the session goes on.
    fn endpoint_stopped(&self, endpoint_id: &str, failure: &Failure);
    /// Asks the agent to run `command` (its handler decides what that
    /// means); done when the agent says it did.
    fn command(&self, command: SessionCommand) -> BoxFuture<'static, Result<(), Failure>>;
}

/// Connections one session may use at most (the agent's `connections`
/// accepts up to as many).
pub const MAX_CONNECTIONS: usize = 16;

/// How long an agent's handler may take to answer a command.
pub const COMMAND_WAIT: Duration = Duration::from_secs(10);

/// What an operator can ask of a session through the admin API, as
/// ngrok's `/tunnel_sessions/{id}/restart`, `/stop` and `/update`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand {
    Restart,
    Stop,
    Update {
        version: String,
        permit_major_version: bool,
    },
}

impl SessionCommand {
    /// The command as the admin API's path names it.
    pub fn name(&self) -> &'static str {
        match self {
            SessionCommand::Restart => "restart",
            SessionCommand::Stop => "stop",
            SessionCommand::Update { .. } => "update",
        }
    }

    /// The command a node link's request carries.
    pub fn from_pb(request: &pb::StopSessionRequest) -> SessionCommand {
        match request.command() {
            pb::SessionCommand::Stop => SessionCommand::Stop,
            pb::SessionCommand::Restart => SessionCommand::Restart,
            pb::SessionCommand::Update => SessionCommand::Update {
                version: request.version.clone(),
                permit_major_version: request.permit_major_version,
            },
        }
    }

    /// The node link's request for this command on `session_id`.
    pub fn to_pb(&self, session_id: &str, from_node: &str) -> pb::StopSessionRequest {
        let mut request = pb::StopSessionRequest {
            session_id: session_id.to_string(),
            from_node: from_node.to_string(),
            ..Default::default()
        };
        let command = match self {
            SessionCommand::Restart => pb::SessionCommand::Restart,
            SessionCommand::Stop => pb::SessionCommand::Stop,
            SessionCommand::Update {
                version,
                permit_major_version,
            } => {
                request.version = version.clone();
                request.permit_major_version = *permit_major_version;
                pb::SessionCommand::Update
            }
        };
        request.set_command(command);
        request
    }
}

/// An endpoint a session bound, with what it takes to build it again.
#[derive(Clone)]
pub(super) struct Bound {
    pub id: String,
    /// The bind request with the name or port as bound.
    pub req: pb::BindRequest,
    /// What endpoint policies required when it was built.
    pub required: crate::config::Required,
}

impl Bound {
    pub fn domain(&self) -> Option<DomainPattern> {
        domain_of(&self.req)
    }
}

/// Data streams the agent opened that no visitor has claimed yet, and the
/// visitors waiting for one.
pub(super) struct StreamPool {
    parked: VecDeque<ClaimedStream>,
    waiters: VecDeque<oneshot::Sender<ClaimedStream>>,
    cap: usize,
    closed: bool,
}

impl StreamPool {
    /// An empty pool that parks at most `cap` streams.
    pub fn new(cap: usize) -> StreamPool {
        StreamPool {
            parked: VecDeque::new(),
            waiters: VecDeque::new(),
            cap,
            closed: false,
        }
    }

    /// Drops the parked streams and the waiters; nothing parks any more.
    pub fn close(&mut self) {
        self.closed = true;
        self.parked.clear();
        self.waiters.clear();
    }
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

    /// Counts `peer`'s connection as one of the session's, to be cut with
    /// it; cut at once when the session has ended already. False when the
    /// session has [`MAX_CONNECTIONS`] already and this is another.
    pub fn join(&self, peer: &PeerInfo) -> bool {
        let mut connections = self.connections.lock().expect("connections lock");
        if self.cancel.is_cancelled() {
            peer.cut.cancel();
        } else if !connections.iter().any(|c| c.id == peer.id) {
            // Connections that ended (a cut one the agent dialled again)
            // make room.
            connections.retain(|c| !c.closed.is_cancelled());
            if connections.len() >= MAX_CONNECTIONS {
                return false;
            }
            connections.push(peer.clone());
        }
        true
    }

    /// How many of its connections are open.
    pub(super) fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .expect("connections lock")
            .iter()
            .filter(|c| !c.closed.is_cancelled())
            .count()
    }

    /// Whether the session bound the endpoint `id`.
    pub(super) fn has_endpoint(&self, id: &str) -> bool {
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .iter()
            .any(|b| b.id == id)
    }

    /// The link of an ngrok SDK session.
    pub(super) fn sdk_link(&self) -> Option<Arc<dyn SdkLink>> {
        match &self.link {
            Link::Sdk(link) => Some(link.clone()),
            Link::Postern { .. } => None,
        }
    }

    /// The control stream of a Postern agent.
    pub(super) fn control(&self) -> Option<&ControlTx> {
        match &self.link {
            Link::Postern { control, .. } => Some(control),
            Link::Sdk(_) => None,
        }
    }

    /// Tells the agent something; an SDK session has no control stream,
    /// so only what ngrok's protocol can say reaches it (a stopped
    /// endpoint; the end of the session is its GOAWAY).
    pub(super) fn tell(&self, msg: pb::edge_message::Msg) {
        match (&self.link, msg) {
            (Link::Postern { control, .. }, msg) => {
                let _ = control.try_send(edge_message(msg));
            }
            (Link::Sdk(link), pb::edge_message::Msg::EndpointStopped(stopped)) => {
                let failure = stopped.error.as_ref().map(Failure::from_pb);
                let failure = failure.unwrap_or_else(|| {
                    Failure::new(ErrorCode::UNKNOWN_ENDPOINT, "the endpoint was stopped")
                });
                link.endpoint_stopped(&stopped.endpoint_id, &failure);
            }
            (Link::Sdk(_), _) => {}
        }
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<Failure> {
        self.end_reason.lock().expect("end lock").clone()
    }

    /// Drops the parked streams and the waiters of a Postern agent.
    pub(super) fn close_pool(&self) {
        if let Link::Postern { pool, .. } = &self.link {
            pool.lock().expect("pool lock").close();
        }
    }

    /// The agent opened a data stream: hand it to a waiting visitor, or park it.
    pub fn park(&self, mut stream: ClaimedStream) {
        let Link::Postern { pool, .. } = &self.link else {
            return;
        };
        let mut pool = pool.lock().expect("pool lock");
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
    pub fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    /// A parked data stream, or one the agent opens on request.
    async fn take_stream(
        pool: Arc<Mutex<StreamPool>>,
        control: ControlTx,
        wait: Duration,
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

impl StreamSource for AgentSession {
    fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Failure::new(
                ErrorCode::AGENT_CONNECTION_LIMIT,
                "the agent is at its limit of simultaneous connections",
            )
        });
        let claimed: BoxFuture<'static, Result<ClaimedStream, Failure>> = match &self.link {
            Link::Postern { control, pool } => {
                let (pool, control, wait) = (pool.clone(), control.clone(), self.stream_wait);
                Box::pin(Self::take_stream(pool, control, wait))
            }
            Link::Sdk(link) => {
                let link = link.clone();
                Box::pin(async move { link.open_stream() })
            }
        };
        Box::pin(async move {
            let permit = permit?;
            let mut claimed = claimed.await?;
            claimed.permit = Some(permit);
            Ok(claimed)
        })
    }

    fn session_id(&self) -> &str {
        &self.id
    }
}
