//! The agent's session with the edge: connect, hello, bind every tunnel,
//! keep data streams parked, answer heartbeats, and reconnect with
//! exponential backoff and full jitter for as long as the token is valid,
//! binding the same tunnels again each time.
//!
//! Tunnels can also be started and stopped while the session runs (the
//! agent API sends [`Command`]s); those are kept in [`AgentState`] and bound
//! again after every reconnect, for as long as the agent runs.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use postern_proto::{
    ErrorCode, Failure, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, TokenBucket,
    direct::{Driver, EdgeConnection, Inbound},
    pb,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::{AgentConfig, MutualTlsCas, Proto, TerminateAt, TunnelSpec},
    error::{AgentError, Chain},
    forward::{Channels, Routes, StreamContext, Target, join_connection, spawn_stream},
    proxy::Io,
    state::{AgentState, BindState, Command, CommandError, Origin, Tunnel},
    tls::edge_client_config,
};

/// First reconnect delay cap; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most this many alternate addresses are kept from a welcome.
const MAX_ALTERNATES: usize = 16;
/// A session that lived this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Binds and unbinds that may wait to be sent within the edge's control
/// budget; past it the API answers `429` with `Retry-After`.
pub(crate) const OUTBOX_MAX: usize = 64;
/// Of the edge's control burst, what is left to heartbeats (pings and
/// pongs are never held back).
const HEARTBEAT_RESERVE: u32 = 8;
/// A refused tunnel is asked for again after 1, 2, 4, then every 8
/// heartbeat intervals (with jitter).
const MAX_RETRY_DOUBLINGS: u32 = 3;

/// What the agent is doing, for the CLI and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub online: bool,
    pub session_id: String,
    pub region: String,
    pub node_id: String,
    /// (tunnel name, public URL) of the bound tunnels, in the order they
    /// were started.
    pub tunnels: Vec<(String, String)>,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// Why a session ended.
enum SessionEnd {
    /// Ctrl-C / shutdown: stop.
    Shutdown,
    /// Try again after a backoff.
    Lost(String),
    /// Retrying cannot help (bad token, refused bind at start-up).
    Fatal(Failure),
}

/// Runs the agent until `shutdown` is cancelled or a fatal error.
pub(crate) async fn run(
    state: Arc<AgentState>,
    mut commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let config = &state.config;
    let tls = edge_client_config(&config.root_cas)?;
    let instance_id = postern_proto_random();
    let mut attempt: u32 = 0;
    let mut ever_online = false;
    // Where to reconnect besides `server_addr`: the other nodes of the
    // region, as the last node to welcome us listed them.
    let alternates = std::sync::Mutex::new(Vec::new());
    let mut next_addr = 0usize;
    loop {
        let started = Instant::now();
        let addr = pick_addr(
            &config.server_addr,
            &alternates.lock().expect("alternates lock"),
            next_addr,
        );
        let connected = refusing_commands(
            connect(config, &addr, tls.clone()),
            &mut commands,
            "connecting",
        )
        .await;
        let end = match connected {
            Ok((connection, driver)) => {
                let session = Session {
                    state: &state,
                    instance_id: &instance_id,
                    status: &status,
                    shutdown: &shutdown,
                    ever_online,
                    alternates: &alternates,
                    addr: &addr,
                    tls: &tls,
                };
                let span = tracing::info_span!(
                    parent: None,
                    "agent_session",
                    server.addr = %addr,
                    session.id = tracing::field::Empty,
                    region = tracing::field::Empty,
                    node.id = tracing::field::Empty,
                );
                session
                    .serve(connection, driver, &mut commands)
                    .instrument(span)
                    .await
            }
            Err(e) => SessionEnd::Lost(format!("connecting to {addr}: {}", Chain(&e))),
        };
        // A node that welcomed us is tried first again; one that did not,
        // or could not be reached, gives way to the next address.
        let was_online = status.borrow().online;
        next_addr = if was_online {
            0
        } else {
            next_addr.wrapping_add(1)
        };
        ever_online |= was_online;
        // Endpoint ids die with the session.
        state.update(|tunnels| {
            for t in tunnels.iter_mut() {
                if matches!(t.state, BindState::Bound { .. }) {
                    t.state = BindState::Binding;
                }
            }
        });
        state.set_latency(None);
        status.send_modify(|s| s.online = false);
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(failure) => {
                status.send_modify(|s| s.last_error = Some(failure.to_string()));
                return Err(AgentError::Refused(failure));
            }
            SessionEnd::Lost(reason) => {
                tracing::warn!(%reason, "session lost; reconnecting");
                status.send_modify(|s| {
                    s.last_error = Some(reason);
                    s.reconnects += 1;
                });
            }
        }
        if started.elapsed() >= STABLE_SESSION {
            attempt = 0;
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        let wait = async {
            tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep(delay) => false,
            }
        };
        if refusing_commands(wait, &mut commands, "reconnecting").await {
            return Ok(());
        }
    }
}

/// Awaits `work` while there is no session: commands from the API are
/// answered at once with [`CommandError::Offline`].
async fn refusing_commands<F: Future>(
    work: F,
    commands: &mut mpsc::Receiver<Command>,
    why: &str,
) -> F::Output {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(command) = commands.recv() => command.refuse(CommandError::Offline(why.to_string())),
        }
    }
}

impl Command {
    fn refuse(self, error: CommandError) {
        let reply = match self {
            Command::Start { reply, .. } | Command::Stop { reply, .. } => reply,
        };
        let _ = reply.send(Err(error));
    }
}

/// Where to reconnect besides `server_addr`: the node that welcomed us
/// (when it is not `server_addr`) and the other nodes of its region it
/// listed, valid `host:port`s once each. The welcoming node comes first:
/// its list may still hold a node that just died, whose successor this
/// is.
fn alternates(server_addr: &str, welcomed_at: &str, listed: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for addr in std::iter::once(welcomed_at).chain(listed.iter().map(String::as_str)) {
        let valid = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if valid && addr != server_addr && !out.iter().any(|a| a == addr) {
            out.push(addr.to_string());
        }
    }
    out.truncate(MAX_ALTERNATES);
    out
}

/// The `n`th address to try, round the configured one and the alternates.
fn pick_addr(server_addr: &str, alternates: &[String], n: usize) -> String {
    match n % (alternates.len() + 1) {
        0 => server_addr.to_string(),
        i => alternates[i - 1].clone(),
    }
}

/// Full jitter: uniform in `[0, min(cap, base * 2^attempt))`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(rand::random::<f64>())
}

fn postern_proto_random() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The session's control stream: the edge's messages.
type ControlStream = Inbound<pb::EdgeMessage>;

/// What drives a connection to the edge.
type EdgeDriver = Driver<tokio_rustls::client::TlsStream<Box<dyn Io>>>;

/// Dials the edge: TCP (or the proxy), TLS with ALPN h2, the HTTP/2
/// handshake. The streams are spoken with `h2` directly
/// (`postern_proto::direct`): the control stream on the first connection
/// of a session, data streams on every one.
async fn connect(
    config: &AgentConfig,
    addr: &str,
    tls: Arc<ClientConfig>,
) -> Result<(EdgeConnection, EdgeDriver), AgentError> {
    let name = ServerName::try_from(config.server_name.clone()).map_err(AgentError::ServerName)?;
    let dialled = async {
        let io = crate::proxy::dial(config.proxy.as_ref(), addr).await?;
        let tls = TlsConnector::from(tls)
            .connect(name, io)
            .await
            .map_err(|e| AgentError::Connect(format!("TLS: {e}")))?;
        EdgeConnection::handshake(tls, config.heartbeat_interval, config.heartbeat_tolerance)
            .await
            .map_err(|e| AgentError::Connect(format!("HTTP/2: {e}")))
    };
    tokio::time::timeout(config.connect_timeout, dialled)
        .await
        .map_err(|_| AgentError::Timeout(config.connect_timeout))?
}

/// Runs the extra connection `id` of a session, and while the session
/// lasts dials it again after it broke (out of the rotation meanwhile).
async fn keep_direct(
    ctx: std::sync::Weak<StreamContext>,
    id: usize,
    mut driver: EdgeDriver,
    config: AgentConfig,
    addr: String,
    tls: Arc<ClientConfig>,
) {
    loop {
        if let Err(e) = driver.run().await {
            tracing::debug!(connection = id, error = %e, "an extra connection to the edge ended");
        }
        let live = |ctx: &std::sync::Weak<StreamContext>| {
            ctx.upgrade().filter(|ctx| !ctx.tracker.is_closed())
        };
        let Some(session) = live(&ctx) else { return };
        session.channels.remove(id);
        drop(session);
        loop {
            tokio::time::sleep(BACKOFF_BASE).await;
            if live(&ctx).is_none() {
                return;
            }
            match connect(&config, &addr, tls.clone()).await {
                Ok((connection, next)) => {
                    let Some(session) = live(&ctx) else { return };
                    session.channels.add(id, connection.clone());
                    join_connection(session, id, connection);
                    driver = next;
                    break;
                }
                Err(e) => {
                    tracing::debug!(connection = id, error = %Chain(&e), "dialling an extra connection to the edge again");
                }
            }
        }
    }
}

struct Session<'a> {
    state: &'a Arc<AgentState>,
    instance_id: &'a str,
    status: &'a watch::Sender<Status>,
    shutdown: &'a CancellationToken,
    ever_online: bool,
    alternates: &'a std::sync::Mutex<Vec<String>>,
    /// The address this session dialled, and the TLS it dialled with.
    addr: &'a str,
    tls: &'a Arc<ClientConfig>,
}

fn agent_message(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

impl Session<'_> {
    async fn serve(
        &self,
        connection: EdgeConnection,
        driver: EdgeDriver,
        commands: &mut mpsc::Receiver<Command>,
    ) -> SessionEnd {
        let config = &self.state.config;
        // Ends with an error when the edge stops answering pings, which
        // fails the control stream; otherwise once the session's handles
        // and streams are gone.
        tokio::spawn(async move {
            if let Err(e) = driver.run().await {
                tracing::debug!(error = %e, "the connection to the edge ended");
            }
        });
        let (tx, rx) = mpsc::channel(64);
        let hello = pb::Hello {
            protocol_version: MAX_PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            authtoken: config.authtoken.expose().to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            instance_id: self.instance_id.to_string(),
            os: std::env::consts::OS.to_string(),
            stream_pool: config.stream_pool,
        };
        let _ = tx.try_send(agent_message(pb::agent_message::Msg::Hello(hello)));
        let mut inbound = match connection.open_control(ReceiverStream::new(rx)).await {
            Ok(inbound) => inbound,
            Err(status) => {
                return SessionEnd::Lost(format!("control stream refused: {}", status.message()));
            }
        };
        let welcome = match inbound.message().await {
            Ok(Some(pb::EdgeMessage {
                msg: Some(pb::edge_message::Msg::Welcome(welcome)),
            })) => welcome,
            Ok(Some(pb::EdgeMessage {
                msg: Some(pb::edge_message::Msg::Error(error)),
            })) => return refused(Failure::from_pb(&error)),
            Ok(_) => {
                return SessionEnd::Lost("the edge closed the session before welcoming it".into());
            }
            Err(status) => {
                return SessionEnd::Lost(format!("control stream: {}", status.message()));
            }
        };
        // Each goes into every data stream's request headers.
        let parse = |what: &str, v: &str| {
            http::HeaderValue::from_str(v)
                .map(|_| v.to_string())
                .map_err(|_| SessionEnd::Lost(format!("the edge sent a bad {what}")))
        };
        let (session_id, stream_token) = match (
            parse("session id", &welcome.session_id),
            parse("stream token", &welcome.stream_token),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        *self.alternates.lock().expect("alternates lock") = alternates(
            &self.state.config.server_addr,
            self.addr,
            &welcome.alternate_addrs,
        );
        let routes = Arc::new(Routes::default());
        let tracker = TaskTracker::new();
        let ctx = Arc::new(StreamContext {
            channels: Channels::new(connection),
            session_id,
            stream_token,
            routes: routes.clone(),
            tracker: tracker.clone(),
        });
        self.extra_connections(&ctx).await;
        let mut live = Live {
            state: self.state,
            tx: &tx,
            routes: &routes,
            next_request: 0,
            binds: HashMap::new(),
            unbinds: HashMap::new(),
            outbox: VecDeque::new(),
            budget: pacing(&welcome),
            endpoint_limit: usize::try_from(welcome.endpoints_per_session)
                .ok()
                .filter(|&n| n > 0),
        };
        let end = self
            .run_session(&welcome, &mut live, &mut inbound, &ctx, commands)
            .await;
        tracker.close();
        end
    }

    /// Opens the session's other connections to the node that welcomed
    /// it, for data streams, and keeps them on the session's tracker; one
    /// that fails is left out (the session works with the control stream's
    /// alone).
    async fn extra_connections(&self, ctx: &Arc<StreamContext>) {
        let config = &self.state.config;
        let dials = (1..config.connections)
            .map(|id| async move { (id, connect(config, self.addr, self.tls.clone()).await) });
        for (id, dialled) in futures_util::future::join_all(dials).await {
            match dialled {
                Ok((connection, driver)) => {
                    ctx.channels.add(id, connection);
                    ctx.tracker.spawn(keep_direct(
                        Arc::downgrade(ctx),
                        id,
                        driver,
                        config.clone(),
                        self.addr.to_string(),
                        self.tls.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(connection = id, error = %Chain(&e), "an extra connection to the edge failed; the session goes on with fewer")
                }
            }
        }
        tracing::debug!(connections = ctx.channels.len(), "connections to the edge");
    }

    async fn run_session(
        &self,
        welcome: &pb::Welcome,
        live: &mut Live<'_>,
        inbound: &mut ControlStream,
        ctx: &Arc<StreamContext>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> SessionEnd {
        let config = &self.state.config;
        // Bind every tunnel the edge has not refused (those wait for their
        // retry time), paced within the edge's budget, and wait for all the
        // answers before going online.
        for tunnel in self.state.tunnels() {
            if matches!(tunnel.state, BindState::Failed { .. }) {
                continue;
            }
            if let Err(end) = live.bind(tunnel.target, PendingKind::Initial).await {
                return end;
            }
        }
        while live
            .binds
            .values()
            .any(|p| matches!(p.kind, PendingKind::Initial))
        {
            use pb::edge_message::Msg;
            let pace = live.next_send();
            let message = tokio::select! {
                _ = sleep_for(pace) => {
                    if let Err(end) = live.flush().await {
                        return end;
                    }
                    continue;
                }
                message = inbound.message() => message,
            };
            match message {
                Ok(Some(pb::EdgeMessage { msg: Some(msg) })) => match msg {
                    Msg::Bind(response) => {
                        if let Err(end) = live.bound(response, self.ever_online).await {
                            return end;
                        }
                    }
                    Msg::Ping(hb) => {
                        let _ = live
                            .tx
                            .try_send(agent_message(pb::agent_message::Msg::Pong(hb)));
                    }
                    Msg::Error(e) => return refused(Failure::from_pb(&e)),
                    _ => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => return SessionEnd::Lost("the edge closed the session".into()),
                Err(status) => {
                    return SessionEnd::Lost(format!("control stream: {}", status.message()));
                }
            }
        }
        for _ in 0..config.stream_pool {
            spawn_stream(ctx.clone(), true);
        }
        self.status.send_modify(|s| {
            s.online = true;
            s.session_id = welcome.session_id.clone();
            s.region = welcome.region.clone();
            s.node_id = welcome.node_id.clone();
            s.tunnels = self.state.bound_urls();
        });
        let span = tracing::Span::current();
        span.record("session.id", welcome.session_id.as_str());
        span.record("region", welcome.region.as_str());
        span.record("node.id", welcome.node_id.as_str());
        tracing::info!(
            session.id = %welcome.session_id,
            region = %welcome.region,
            alternates = ?welcome.alternate_addrs,
            "session online"
        );

        // A first ping at once, so the latency is known without waiting a
        // whole heartbeat interval.
        let mut nonce = 1u64;
        let mut ping_sent = Some((nonce, Instant::now()));
        let _ = live
            .tx
            .try_send(agent_message(pb::agent_message::Msg::Ping(pb::Heartbeat {
                nonce,
            })));
        let mut ticker = tokio::time::interval(config.heartbeat_interval);
        ticker.tick().await;
        let mut last_seen = Instant::now();
        loop {
            let pace = live.next_send();
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let bound: Vec<String> = self
                        .state
                        .tunnels()
                        .into_iter()
                        .filter_map(|t| match t.state {
                            BindState::Bound { endpoint_id, .. } => Some(endpoint_id),
                            _ => None,
                        })
                        .collect();
                    unbind_all(live, inbound, bound.iter()).await;
                    return SessionEnd::Shutdown;
                }
                _ = ticker.tick() => {
                    if last_seen.elapsed() > config.heartbeat_tolerance {
                        return SessionEnd::Lost(format!(
                            "no heartbeat from the edge for {:?}",
                            config.heartbeat_tolerance
                        ));
                    }
                    nonce += 1;
                    ping_sent = Some((nonce, Instant::now()));
                    let _ = live.tx.try_send(agent_message(pb::agent_message::Msg::Ping(pb::Heartbeat { nonce })));
                    if let Err(end) = live.retry_failed().await {
                        return end;
                    }
                    continue;
                }
                _ = sleep_for(pace) => {
                    if let Err(end) = live.flush().await {
                        return end;
                    }
                    continue;
                }
                Some(command) = commands.recv() => {
                    if let Err(end) = live.command(command).await {
                        return end;
                    }
                    self.publish_tunnels();
                    continue;
                }
                message = inbound.message() => message,
            };
            last_seen = Instant::now();
            use pb::edge_message::Msg;
            match message {
                Ok(Some(pb::EdgeMessage { msg: Some(msg) })) => match msg {
                    Msg::Ping(hb) => {
                        let _ = live
                            .tx
                            .try_send(agent_message(pb::agent_message::Msg::Pong(hb)));
                    }
                    Msg::Pong(hb) => {
                        if let Some((sent, at)) = ping_sent
                            && sent == hb.nonce
                        {
                            self.state.set_latency(Some(at.elapsed()));
                            ping_sent = None;
                        }
                    }
                    Msg::OpenStreams(req) => {
                        for _ in 0..req.count.min(64) {
                            spawn_stream(ctx.clone(), false);
                        }
                    }
                    Msg::Drain(drain) => {
                        tracing::info!(reason = %drain.reason, "the edge is draining")
                    }
                    Msg::Error(error) => return refused(Failure::from_pb(&error)),
                    Msg::Bind(response) => {
                        if let Err(end) = live.bound(response, true).await {
                            return end;
                        }
                        self.publish_tunnels();
                    }
                    Msg::Unbind(response) => {
                        if let Err(end) = live.unbound(response).await {
                            return end;
                        }
                        self.publish_tunnels();
                    }
                    Msg::EndpointStopped(stopped) => {
                        let failure = stopped.error.as_ref().map(Failure::from_pb);
                        if let Some(failure) = live.stopped(&stopped.endpoint_id, failure) {
                            self.status
                                .send_modify(|s| s.last_error = Some(failure.to_string()));
                        }
                        self.publish_tunnels();
                    }
                    Msg::Welcome(_) => {}
                },
                Ok(Some(pb::EdgeMessage { msg: None })) => {}
                Ok(None) => return SessionEnd::Lost("the edge closed the session".into()),
                Err(status) => {
                    return SessionEnd::Lost(format!("control stream: {}", status.message()));
                }
            }
        }
    }

    /// Puts the bound tunnels in the status when they changed.
    fn publish_tunnels(&self) {
        let urls = self.state.bound_urls();
        self.status.send_if_modified(|s| {
            let changed = s.tunnels != urls;
            if changed {
                s.tunnels = urls;
            }
            changed
        });
    }
}

/// Why a bind was sent.
enum PendingKind {
    /// At connect; a config tunnel's refusal ends the session.
    Initial,
    /// `POST /api/tunnels`: the caller waits for the answer.
    Start(oneshot::Sender<Result<(), CommandError>>),
    /// An API tunnel the edge refused after a reconnect, tried again.
    Retry,
}

struct PendingBind {
    target: Arc<Target>,
    kind: PendingKind,
}

struct PendingUnbind {
    name: String,
    endpoint_id: String,
    reply: Option<oneshot::Sender<Result<(), CommandError>>>,
}

/// The pacing of this agent's binds and unbinds: within the budget the
/// edge stated, less a reserve for heartbeats and a tenth of the rate; an
/// edge that states none allowed 100 messages in any one second.
fn pacing(welcome: &pb::Welcome) -> TokenBucket {
    if welcome.control_rate == 0 {
        return TokenBucket::new(50, 50);
    }
    TokenBucket::new(
        welcome.control_rate - welcome.control_rate / 10,
        welcome
            .control_burst
            .saturating_sub(HEARTBEAT_RESERVE)
            .max(welcome.control_burst / 2),
    )
}

/// When a tunnel refused `attempts` times is asked for again: 1, 2, 4,
/// then 8 heartbeat intervals, each between half and all of that.
fn retry_delay(heartbeat: Duration, attempts: u32) -> Duration {
    let ceiling =
        heartbeat.saturating_mul(1 << attempts.saturating_sub(1).min(MAX_RETRY_DOUBLINGS));
    ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Sleeps `pace`, or forever when there is nothing to send.
async fn sleep_for(pace: Option<Duration>) {
    match pace {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The binds and unbinds of one session: those waiting to be sent within
/// the edge's control budget, and those that await the edge's answer.
struct Live<'a> {
    state: &'a AgentState,
    tx: &'a mpsc::Sender<pb::AgentMessage>,
    routes: &'a Routes,
    next_request: u64,
    binds: HashMap<u64, PendingBind>,
    unbinds: HashMap<u64, PendingUnbind>,
    /// Binds and unbinds not sent yet, oldest first.
    outbox: VecDeque<pb::agent_message::Msg>,
    budget: TokenBucket,
    /// The edge's endpoint limit for this session, when it stated one.
    endpoint_limit: Option<usize>,
}

impl Live<'_> {
    async fn send(&mut self, msg: pb::agent_message::Msg) -> Result<(), SessionEnd> {
        self.tx
            .send(agent_message(msg))
            .await
            .map_err(|_| SessionEnd::Lost("control stream closed".into()))
    }

    /// Sends what the budget allows now, oldest first.
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        let now = Instant::now();
        while !self.outbox.is_empty() && self.budget.try_take(now) {
            if let Some(msg) = self.outbox.pop_front() {
                self.send(msg).await?;
            }
        }
        Ok(())
    }

    /// How long until the next queued message may go; `None` when none waits.
    fn next_send(&mut self) -> Option<Duration> {
        (!self.outbox.is_empty()).then(|| self.budget.wait(Instant::now()))
    }

    /// Queues `msg` (first when it was refused for the budget) and sends
    /// what the budget allows.
    async fn enqueue(
        &mut self,
        msg: pb::agent_message::Msg,
        first: bool,
    ) -> Result<(), SessionEnd> {
        if first {
            self.outbox.push_front(msg);
        } else {
            self.outbox.push_back(msg);
        }
        self.flush().await
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    async fn bind(&mut self, target: Arc<Target>, kind: PendingKind) -> Result<(), SessionEnd> {
        let request_id = self.request_id();
        let request = bind_request(request_id, &target.spec);
        self.binds.insert(request_id, PendingBind { target, kind });
        self.enqueue(pb::agent_message::Msg::Bind(request), false)
            .await
    }

    /// The edge refused a message for our budget: we were too fast (our
    /// pacing starts from the edge's numbers, but clocks and heartbeats
    /// differ), so slow down and send it again first.
    async fn resend(&mut self, msg: pb::agent_message::Msg) -> Result<(), SessionEnd> {
        self.budget.drain(Instant::now());
        self.enqueue(msg, true).await
    }

    /// Endpoints this session holds or has asked for.
    fn holding(&self) -> usize {
        self.state
            .tunnels()
            .iter()
            .filter(|t| !matches!(t.state, BindState::Failed { .. }))
            .count()
    }

    async fn unbind(
        &mut self,
        name: String,
        endpoint_id: String,
        reply: Option<oneshot::Sender<Result<(), CommandError>>>,
    ) -> Result<(), SessionEnd> {
        let request_id = self.request_id();
        let request = pb::UnbindRequest {
            request_id,
            endpoint_id: endpoint_id.clone(),
        };
        self.unbinds.insert(
            request_id,
            PendingUnbind {
                name,
                endpoint_id,
                reply,
            },
        );
        self.enqueue(pb::agent_message::Msg::Unbind(request), false)
            .await
    }

    /// Handles the edge's answer to a bind. Only a config tunnel refused
    /// before the agent was ever online ends the session (fatally: the
    /// config is wrong); any other refusal leaves the tunnel failed, asked
    /// for again with back-off, and the session goes on. A bind refused for
    /// the control budget is sent again, first in the queue.
    async fn bound(
        &mut self,
        response: pb::BindResponse,
        ever_online: bool,
    ) -> Result<(), SessionEnd> {
        let Some(pending) = self.binds.remove(&response.request_id) else {
            return Ok(());
        };
        let name = pending.target.spec.name.clone();
        if let Some(error) = response.error {
            let failure = Failure::from_pb(&error);
            if failure.code == ErrorCode::CONTROL_THROTTLED {
                let request = bind_request(response.request_id, &pending.target.spec);
                self.binds.insert(response.request_id, pending);
                return self.resend(pb::agent_message::Msg::Bind(request)).await;
            }
            let failure =
                Failure::new(failure.code, format!("tunnel {name:?}: {}", failure.detail));
            let origin = self.state.tunnel(&name).map(|t| t.origin);
            match (pending.kind, origin) {
                (PendingKind::Start(reply), _) => {
                    self.state.update(|ts| ts.retain(|t| t.name() != name));
                    let _ = reply.send(Err(CommandError::Refused(failure)));
                }
                (PendingKind::Initial, Some(Origin::Config)) if !ever_online => {
                    return Err(SessionEnd::Fatal(failure));
                }
                (PendingKind::Initial | PendingKind::Retry, _) => self.failed(&name, failure),
            }
            return Ok(());
        }
        let bound = BindState::Bound {
            endpoint_id: response.endpoint_id.clone(),
            public_url: response.public_url,
        };
        if !self.set_state(&name, bound) {
            // Stopped while the bind was in flight.
            return self.unbind(name, response.endpoint_id, None).await;
        }
        self.routes.insert(response.endpoint_id, pending.target);
        if let PendingKind::Start(reply) = pending.kind {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// Marks a tunnel refused and schedules its next bind.
    fn failed(&self, name: &str, failure: Failure) {
        let heartbeat = self.state.config.heartbeat_interval;
        self.state.update(|ts| {
            if let Some(t) = ts.iter_mut().find(|t| t.name() == name) {
                let attempts = match t.state {
                    BindState::Failed { attempts, .. } => attempts + 1,
                    _ => 1,
                };
                let delay = retry_delay(heartbeat, attempts);
                tracing::warn!(tunnel = name, error = %failure, retry_in = ?delay, "tunnel not bound");
                t.state = BindState::Failed {
                    error: failure.to_string(),
                    attempts,
                    retry_at: Instant::now() + delay,
                };
            }
        });
    }

    /// Handles the edge's answer to an unbind: the tunnel is gone either
    /// way (an unknown endpoint is not bound), unless the edge refused it
    /// for the control budget: then it is sent again.
    async fn unbound(&mut self, response: pb::UnbindResponse) -> Result<(), SessionEnd> {
        let Some(pending) = self.unbinds.remove(&response.request_id) else {
            return Ok(());
        };
        if response
            .error
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::CONTROL_THROTTLED.number)
        {
            let request = pb::UnbindRequest {
                request_id: response.request_id,
                endpoint_id: pending.endpoint_id.clone(),
            };
            self.unbinds.insert(response.request_id, pending);
            return self.resend(pb::agent_message::Msg::Unbind(request)).await;
        }
        self.routes.remove(&pending.endpoint_id);
        self.state.update(|ts| {
            ts.retain(|t| {
                !(t.name() == pending.name
                    && matches!(&t.state, BindState::Bound { endpoint_id, .. } if *endpoint_id == pending.endpoint_id))
            })
        });
        if let Some(reply) = pending.reply {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// The edge stopped an endpoint: its tunnel is refused, and asked for
    /// again with back-off (it takes over when the other endpoint goes).
    /// The failure, when the endpoint was one of this session's.
    fn stopped(&mut self, endpoint_id: &str, failure: Option<Failure>) -> Option<Failure> {
        self.routes.remove(endpoint_id)?;
        let failure = failure.unwrap_or_else(|| {
            Failure::new(ErrorCode::UNKNOWN_ENDPOINT, "the edge stopped the endpoint")
        });
        let name = self
            .state
            .tunnels()
            .into_iter()
            .find_map(|t| match &t.state {
                BindState::Bound {
                    endpoint_id: id, ..
                } if id == endpoint_id => Some(t.name().to_string()),
                _ => None,
            });
        if let Some(name) = name {
            self.failed(&name, failure.clone());
        }
        Some(failure)
    }

    async fn command(&mut self, command: Command) -> Result<(), SessionEnd> {
        match command {
            Command::Start { target, reply } => {
                let name = target.spec.name.clone();
                // What the edge would refuse, or what would overrun its
                // budget, is answered here without sending anything.
                if let Some(limit) = self.endpoint_limit
                    && self.holding() >= limit
                {
                    let failure = Failure::new(
                        ErrorCode::TOO_MANY_ENDPOINTS,
                        format!(
                            "tunnel {name:?}: the session already holds or is binding {limit} endpoints, the edge's limit"
                        ),
                    );
                    let _ = reply.send(Err(CommandError::OverLimit(failure)));
                    return Ok(());
                }
                if self.outbox.len() >= OUTBOX_MAX {
                    let rate_wait = self.budget.wait(Instant::now());
                    let retry_after = rate_wait
                        .saturating_mul(u32::try_from(self.outbox.len()).unwrap_or(u32::MAX))
                        .max(Duration::from_secs(1));
                    let _ = reply.send(Err(CommandError::Busy { retry_after }));
                    return Ok(());
                }
                let added = self.state.update(|ts| {
                    if ts.iter().any(|t| t.name() == name) {
                        return false;
                    }
                    ts.push(Tunnel {
                        target: target.clone(),
                        origin: Origin::Api,
                        state: BindState::Binding,
                        started: SystemTime::now(),
                    });
                    true
                });
                if !added {
                    let _ = reply.send(Err(CommandError::Exists(name)));
                    return Ok(());
                }
                self.bind(target, PendingKind::Start(reply)).await
            }
            Command::Stop { name, reply } => match self.state.tunnel(&name).map(|t| t.state) {
                None => {
                    let _ = reply.send(Err(CommandError::NotFound(name)));
                    Ok(())
                }
                Some(BindState::Bound { endpoint_id, .. }) => {
                    self.unbind(name, endpoint_id, Some(reply)).await
                }
                Some(BindState::Binding | BindState::Failed { .. }) => {
                    self.state.update(|ts| ts.retain(|t| t.name() != name));
                    let _ = reply.send(Ok(()));
                    Ok(())
                }
            },
        }
    }

    /// Binds again the refused tunnels whose retry time has come.
    async fn retry_failed(&mut self) -> Result<(), SessionEnd> {
        let now = Instant::now();
        let failed: Vec<Arc<Target>> = self
            .state
            .tunnels()
            .into_iter()
            .filter(|t| matches!(t.state, BindState::Failed { retry_at, .. } if retry_at <= now))
            .filter(|t| !self.binds.values().any(|p| p.target.spec.name == t.name()))
            .map(|t| t.target)
            .collect();
        for target in failed {
            self.bind(target, PendingKind::Retry).await?;
        }
        Ok(())
    }

    /// Sets a tunnel's state; false when there is no such tunnel.
    fn set_state(&self, name: &str, state: BindState) -> bool {
        self.state
            .update(|ts| match ts.iter_mut().find(|t| t.name() == name) {
                Some(t) => {
                    t.state = state;
                    true
                }
                None => false,
            })
    }
}

/// Session refusals: a bad token or version is final, the rest is retried.
fn refused(failure: Failure) -> SessionEnd {
    match failure.code {
        ErrorCode::AUTHTOKEN_INVALID
        | ErrorCode::AUTHTOKEN_MALFORMED
        | ErrorCode::PROTOCOL_VERSION
        | ErrorCode::AGENT_INGRESS_NOT_PERMITTED
        | ErrorCode::SESSION_STOPPED => SessionEnd::Fatal(failure),
        _ => SessionEnd::Lost(failure.to_string()),
    }
}

fn bind_request(request_id: u64, spec: &TunnelSpec) -> pb::BindRequest {
    let protocol = match spec.proto {
        Proto::Http => pb::Protocol::Http,
        Proto::Tls => pb::Protocol::Tls,
        Proto::Tcp => pb::Protocol::Tcp,
    };
    let terminate_at = spec
        .terminate_at
        .map_or(pb::TerminateAt::Unspecified, pb::TerminateAt::from);
    // The certificate goes to the edge only when the edge terminates TLS.
    let edge_cert = match (spec.terminate_at, &spec.crt_key) {
        (None | Some(TerminateAt::Edge), Some((crt, key))) => {
            Some((crt.clone(), key.expose().as_bytes().to_vec()))
        }
        _ => None,
    };
    let (tls_cert_pem, tls_key_pem) = edge_cert.unwrap_or_default();
    pb::BindRequest {
        request_id,
        name: spec.name.clone(),
        protocol: protocol as i32,
        domain: spec.domain.clone().unwrap_or_default(),
        remote_port: u32::from(spec.remote_port),
        terminate_at: terminate_at as i32,
        tls_cert_pem,
        tls_key_pem,
        forwards_to: spec.upstream.url(spec.proto),
        mutual_tls_cas_pem: match &spec.mutual_tls_cas {
            Some(MutualTlsCas::Pem(pem)) if spec.terminate_at != Some(TerminateAt::Agent) => {
                pem.clone()
            }
            _ => Vec::new(),
        },
        mutual_tls_ca_ids: match &spec.mutual_tls_cas {
            Some(MutualTlsCas::Ids(ids)) => ids.clone(),
            _ => Vec::new(),
        },
        ip_restriction: spec
            .ip_restriction
            .as_ref()
            .map(|(allow, deny)| pb::IpRestriction {
                allow_cidrs: allow.clone(),
                deny_cidrs: deny.clone(),
            }),
        oauth: spec.oauth.as_ref().map(|o| o.to_pb()),
        proxy_proto: spec.proxy_proto.map_or(0, |v| match v {
            postern_net::proxy_header::Version::V1 => 1,
            postern_net::proxy_header::Version::V2 => 2,
        }),
        pooling_enabled: spec.pooling_enabled,
        traffic_policy: spec.traffic_policy.clone().unwrap_or_default(),
        modules: spec.modules.as_ref().map(|m| m.0.clone()),
        subdomain: spec.subdomain.clone().unwrap_or_default(),
        public_port: u32::from(spec.public_port),
        upstream_http2: spec.upstream.http2,
    }
}

/// Unbinds everything before leaving, paced within the budget, waiting
/// up to 2 s for the answers (what is not sent by then the edge frees when
/// the session closes).
async fn unbind_all<'a>(
    live: &mut Live<'_>,
    inbound: &mut ControlStream,
    endpoint_ids: impl Iterator<Item = &'a String>,
) {
    live.outbox.clear();
    for id in endpoint_ids {
        let request_id = live.request_id();
        live.outbox
            .push_back(pb::agent_message::Msg::Unbind(pb::UnbindRequest {
                request_id,
                endpoint_id: id.clone(),
            }));
    }
    let mut pending = live.outbox.len();
    let answers = async {
        while pending > 0 {
            let pace = live.next_send();
            tokio::select! {
                _ = sleep_for(pace) => {
                    if live.flush().await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(pb::EdgeMessage {
                        msg: Some(pb::edge_message::Msg::Unbind(_)),
                    })) => pending -= 1,
                    Ok(Some(_)) => {}
                    _ => break,
                },
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answers).await;
    tracing::info!("tunnels unbound");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_MAX);
            assert!(d < BACKOFF_BASE * 2u32.pow(attempt.min(16)) || d <= BACKOFF_MAX);
        }
        assert!(
            backoff(0) < BACKOFF_BASE,
            "the first retry comes within 0.5 s"
        );
        let spread: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(5).as_millis()).collect();
        assert!(spread.len() > 10, "full jitter spreads retries");
    }

    #[test]
    fn reconnects_go_round_the_configured_address_and_the_alternates() {
        let alternates = ["b:2".to_string(), "c:3".to_string()];
        let order: Vec<String> = (0..4).map(|n| pick_addr("a:1", &alternates, n)).collect();
        assert_eq!(order, ["a:1", "b:2", "c:3", "a:1"]);
        assert_eq!(pick_addr("a:1", &[], 7), "a:1");
    }

    #[test]
    fn the_welcoming_node_is_kept_even_when_its_list_names_a_dead_one() {
        // Welcomed by b after a died; b still lists a.
        let listed = ["a:1".to_string(), "c:3".to_string(), "bad".to_string()];
        assert_eq!(alternates("a:1", "b:2", &listed), ["b:2", "c:3"]);
        // Welcomed by the configured node: only what it lists.
        assert_eq!(alternates("a:1", "a:1", &["b:2".to_string()]), ["b:2"]);
        let many: Vec<String> = (0..40).map(|i| format!("n{i}:1")).collect();
        assert_eq!(alternates("a:1", "a:1", &many).len(), MAX_ALTERNATES);
    }
}
