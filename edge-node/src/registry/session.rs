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
use crate::{acl::Acl, auth::CredentialRef};

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
    pub(super) control: ControlTx,
    pub(super) pool: Arc<Mutex<StreamPool>>,
    pub(super) endpoints: Mutex<Vec<Bound>>,
    pub(super) cancel: CancellationToken,
    pub(super) end_reason: Mutex<Option<Failure>>,
    pub(super) stream_wait: Duration,
    /// Cuts the agent's connection, and with it every data stream.
    pub(super) cut_connection: Option<CancellationToken>,
    /// Permits for simultaneous proxied connections.
    pub(super) streams: Arc<Semaphore>,
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

    /// Whether the session bound the endpoint `id`.
    pub(super) fn has_endpoint(&self, id: &str) -> bool {
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .iter()
            .any(|b| b.id == id)
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
