//! What the session and the agent API share: the tunnels this agent runs
//! (from the config, and started through the API), each one's bind state and
//! counters, the session's latency to the edge, and the command channel
//! through which the API asks the session to bind and unbind.
//!
//! The session is the only writer of bind state; the API only reads it and
//! sends [`Command`]s.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use postern_proto::Failure;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{config::AgentConfig, forward::Target, inspect::Captures, session::Status};

/// Everything the session and the API share, for the agent's lifetime.
pub(crate) struct AgentState {
    tunnels: Mutex<Vec<Tunnel>>,
    latency: Mutex<Option<Duration>>,
    /// The inspector's store; `None` when inspection is off.
    pub captures: Option<Arc<Captures>>,
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<Status>,
    pub config: AgentConfig,
}

/// Where a tunnel came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The config files or the command line: bound at every connect, and a
    /// refusal at the first connect stops the agent.
    Config,
    /// `POST /api/tunnels`: bound at every connect for as long as the agent
    /// runs (not persisted); a refusal after a reconnect is retried.
    Api,
}

/// A tunnel's state in the current session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BindState {
    /// Asked for, not answered yet (or the session is reconnecting).
    Binding,
    Bound {
        endpoint_id: String,
        public_url: String,
    },
    /// The edge refused it (after a reconnect, or for an API tunnel that
    /// was bound before) or stopped it; asked for again at `retry_at`,
    /// paced, with the delay doubling per refusal (see
    /// `session::retry_delay`). Kept across reconnects, so a reconnect
    /// sends no burst of binds the edge refused before.
    Failed {
        error: String,
        attempts: u32,
        retry_at: std::time::Instant,
    },
}

/// One tunnel the agent runs.
#[derive(Clone)]
pub(crate) struct Tunnel {
    pub target: Arc<Target>,
    pub origin: Origin,
    pub state: BindState,
    pub started: SystemTime,
}

impl Tunnel {
    pub fn name(&self) -> &str {
        &self.target.spec.name
    }

    pub fn public_url(&self) -> Option<&str> {
        match &self.state {
            BindState::Bound { public_url, .. } => Some(public_url),
            _ => None,
        }
    }
}

/// Counters of one tunnel, kept across reconnects.
#[derive(Debug, Default)]
pub(crate) struct TunnelMetrics {
    conns_total: AtomicU64,
    conns_open: AtomicU64,
    /// From visitors toward the upstream.
    bytes_in: AtomicU64,
    /// From the upstream toward visitors.
    bytes_out: AtomicU64,
    http_requests: AtomicU64,
}

/// A snapshot of [`TunnelMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MetricsSnapshot {
    pub conns_total: u64,
    pub conns_open: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub http_requests: u64,
}

impl TunnelMetrics {
    /// Counts a connection (a data stream) until the guard is dropped.
    pub fn open_conn(self: &Arc<Self>) -> ConnGuard {
        self.conns_total.fetch_add(1, Ordering::Relaxed);
        self.conns_open.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone())
    }

    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    pub fn add_request(&self) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            conns_total: self.conns_total.load(Ordering::Relaxed),
            conns_open: self.conns_open.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            http_requests: self.http_requests.load(Ordering::Relaxed),
        }
    }
}

/// An open connection of a tunnel; see [`TunnelMetrics::open_conn`].
pub(crate) struct ConnGuard(Arc<TunnelMetrics>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.conns_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the API asks of the session.
pub(crate) enum Command {
    /// Bind a new tunnel and keep it bound across reconnects.
    Start {
        target: Arc<Target>,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Unbind a tunnel and forget it.
    Stop {
        name: String,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
}

/// Why a [`Command`] failed.
#[derive(Clone, Debug)]
pub(crate) enum CommandError {
    /// A tunnel with this name already runs.
    Exists(String),
    NotFound(String),
    /// The edge refused the bind.
    Refused(Failure),
    /// No session to bind on.
    Offline(String),
    /// The session already holds as many endpoints as the edge allows
    /// (`Welcome.endpoints_per_session`); not sent to the edge.
    OverLimit(Failure),
    /// Too many binds wait to be sent within the edge's control budget.
    Busy {
        retry_after: Duration,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Exists(name) => write!(f, "a tunnel named {name:?} is already running"),
            CommandError::NotFound(name) => write!(f, "no tunnel named {name:?} is running"),
            CommandError::Refused(failure) => write!(f, "the edge refused the tunnel: {failure}"),
            CommandError::Offline(why) => {
                write!(f, "the agent is not connected to the edge ({why})")
            }
            CommandError::OverLimit(failure) => write!(f, "{failure}"),
            CommandError::Busy { retry_after } => write!(
                f,
                "{}: {} tunnel starts are waiting to be sent to the edge; try again in {} s",
                postern_proto::ErrorCode::AGENT_QUEUE_FULL.id(),
                crate::session::OUTBOX_MAX,
                retry_after.as_secs().max(1)
            ),
        }
    }
}

impl AgentState {
    pub fn new(
        config: AgentConfig,
        tunnels: Vec<Arc<Target>>,
        captures: Option<Arc<Captures>>,
        commands: mpsc::Sender<Command>,
        status: watch::Receiver<Status>,
    ) -> AgentState {
        let now = SystemTime::now();
        let tunnels = tunnels
            .into_iter()
            .map(|target| Tunnel {
                target,
                origin: Origin::Config,
                state: BindState::Binding,
                started: now,
            })
            .collect();
        AgentState {
            tunnels: Mutex::new(tunnels),
            latency: Mutex::new(None),
            captures,
            commands,
            status,
            config,
        }
    }

    /// The tunnels, in the order they were started.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.lock().clone()
    }

    pub fn tunnel(&self, name: &str) -> Option<Tunnel> {
        self.lock().iter().find(|t| t.name() == name).cloned()
    }

    /// Changes the tunnel list (the session's side).
    pub fn update<R>(&self, f: impl FnOnce(&mut Vec<Tunnel>) -> R) -> R {
        f(&mut self.lock())
    }

    /// Bound tunnels as (name, public URL), for [`Status::tunnels`].
    pub fn bound_urls(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter_map(|t| Some((t.name().to_string(), t.public_url()?.to_string())))
            .collect()
    }

    /// The last heartbeat round trip to the edge.
    pub fn latency(&self) -> Option<Duration> {
        *self.latency.lock().expect("latency lock")
    }

    pub fn set_latency(&self, rtt: Option<Duration>) {
        *self.latency.lock().expect("latency lock") = rtt;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tunnel>> {
        self.tunnels.lock().expect("tunnels lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_follows_open_connections() {
        let metrics = Arc::new(TunnelMetrics::default());
        let a = metrics.open_conn();
        let b = metrics.open_conn();
        metrics.add_bytes(10, 20);
        metrics.add_request();
        drop(a);
        let s = metrics.snapshot();
        assert_eq!((s.conns_total, s.conns_open), (2, 1));
        assert_eq!((s.bytes_in, s.bytes_out, s.http_requests), (10, 20, 1));
        drop(b);
        assert_eq!(metrics.snapshot().conns_open, 0);
    }
}
