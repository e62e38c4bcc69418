//! The agent of one SSH connection, living in the edge: it waits for the
//! login, the `-R` forwards and the command, opens an agent session of the
//! registry, binds one endpoint per forward by the tunnel protocol's own
//! control messages, parks a data stream (`stream.rs`) whenever the
//! registry asks for one, and tells the user what happens on the session
//! channel — or, under `ssh -N`, in the disconnect message.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use postern_proto::{ErrorCode, Failure, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, pb};
use russh::{ChannelId, server::Handle};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout_at},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{
    Shared,
    command::{Command, Parsed, USAGE, parse_command},
    conn::Event,
    stream::{Target, Targets, parked},
};
use crate::{auth::AuthtokenRecord, service::PeerInfo};

/// How long after the login a client that opened no session channel has
/// to open one: OpenSSH opens it right after its `-R` requests, so a
/// client silent this long runs `ssh -N`.
const TERMINAL_WAIT: Duration = Duration::from_secs(1);

/// How long a client whose terminal the edge closed has to close its
/// side before the connection is cut.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// At most this many streams parked for one `OpenStreams`.
const MAX_OPEN_STREAMS: u32 = 16;

/// A `-R` forward, as asked and as the client knows it.
#[derive(Clone, Debug)]
struct Forward {
    address: String,
    port: u32,
    client_port: u32,
}

/// What the connection asked for before its session is opened.
struct Setup {
    record: AuthtokenRecord,
    client: String,
    forwards: Vec<Forward>,
    command: Command,
}

/// One connection's agent.
struct Agent {
    shared: Arc<Shared>,
    handle: Handle,
    events: mpsc::Receiver<Event>,
    /// The session channel, once the client opened one.
    terminal: Option<ChannelId>,
    /// Whether the edge closed it (the client is to close its side).
    terminal_closing: bool,
}

/// Runs the agent of one connection until it ends; `cut` closes the
/// connection.
pub(super) async fn run(
    shared: Arc<Shared>,
    handle: Handle,
    events: mpsc::Receiver<Event>,
    peer: SocketAddr,
    cut: CancellationToken,
) {
    let mut agent = Agent {
        shared,
        handle,
        events,
        terminal: None,
        terminal_closing: false,
    };
    let ended = match agent.setup().await {
        Ok(Some(setup)) => agent.serve(setup, peer, CancellationToken::new()).await,
        Ok(None) => Ok(()),
        Err(failure) => Err(failure),
    };
    if let Err(failure) = ended {
        tracing::info!(%peer, error = %failure, "SSH session refused or ended");
        agent.fail(&failure).await;
    }
    agent.let_terminal_close().await;
    cut.cancel();
}

impl Agent {
    /// The next event before `deadline`; `Ok(None)` when the connection
    /// is gone.
    async fn next(&mut self, deadline: Instant) -> Result<Option<Event>, Failure> {
        timeout_at(deadline, self.events.recv()).await.map_err(|_| {
            Failure::new(
                ErrorCode::SSH_NO_FORWARD,
                format!(
                    "no -R forward and command within {:?} of connecting",
                    self.shared.settings.login_grace
                ),
            )
        })
    }

    /// Waits for the login, the forwards and the command. `Ok(None)`: the
    /// connection went away, or the user asked for `--help` (answered).
    async fn setup(&mut self) -> Result<Option<Setup>, Failure> {
        let deadline = Instant::now() + self.shared.settings.login_grace;
        let (record, client) = loop {
            match self.next(deadline).await? {
                None => return Ok(None),
                Some(Event::Authenticated { record, client }) => break (record, client),
                Some(_) => {}
            }
        };
        let mut forwards = Vec::new();
        let terminal_deadline = Instant::now() + TERMINAL_WAIT;
        let command = loop {
            let until = if self.terminal.is_some() {
                deadline
            } else {
                terminal_deadline.min(deadline)
            };
            let event = match timeout_at(until, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(None),
                // `ssh -N`: the forward's port says what it is.
                Err(_) if self.terminal.is_none() && !forwards.is_empty() => {
                    let first: &Forward = &forwards[0];
                    break Command::inferred(first.port);
                }
                Err(_) => {
                    return Err(Failure::new(
                        ErrorCode::SSH_NO_FORWARD,
                        "ask for a remote forward and give a command, e.g. `ssh -R 443:localhost:8080 <edge> http`",
                    ));
                }
            };
            match event {
                Event::Forward {
                    address,
                    port,
                    client_port,
                } => forwards.push(Forward {
                    address,
                    port,
                    client_port,
                }),
                Event::ForwardRefused { address, port } => {
                    return Err(too_many_forwards(
                        &address,
                        port,
                        self.shared.settings.forwards_per_session,
                    ));
                }
                Event::Terminal(id) => self.terminal = Some(id),
                Event::TerminalRefused => self.refuse_terminal().await,
                Event::Exec(line) => match parse_command(&line)? {
                    Parsed::Run(command) => break *command,
                    Parsed::Help => {
                        self.say(USAGE).await;
                        self.close_terminal(0).await;
                        return Ok(None);
                    }
                },
                Event::Shell => {
                    return Err(Failure::new(
                        ErrorCode::SSH_COMMAND_REQUIRED,
                        format!("give http, tls or tcp after the host\n{USAGE}"),
                    ));
                }
                Event::TerminalClosed => return Ok(None),
                Event::Authenticated { .. } => {}
            }
        };
        if forwards.is_empty() {
            return Err(Failure::new(
                ErrorCode::SSH_NO_FORWARD,
                "no remote forward: add -R, e.g. `ssh -R 443:localhost:8080 <edge> http`",
            ));
        }
        Ok(Some(Setup {
            record,
            client,
            forwards,
            command,
        }))
    }

    /// Opens the session, binds the forwards and serves the session until
    /// the client leaves or the edge ends it (`cut`, the registry's).
    async fn serve(
        &mut self,
        setup: Setup,
        peer: SocketAddr,
        cut: CancellationToken,
    ) -> Result<(), Failure> {
        let Setup {
            record,
            client,
            forwards,
            command,
        } = setup;
        let hello = pb::Hello {
            protocol_version: MAX_PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            agent_version: client,
            os: "ssh".into(),
            ..Default::default()
        };
        let (control, mut from_edge) = mpsc::channel(64);
        let registry = self.shared.registry.clone();
        // The registry's cut ends this loop, not the connection at once:
        // the client is told first.
        let info = PeerInfo::new(peer, None, cut.clone());
        let session = registry
            .admit(hello, record, control, Some(info))
            .inspect_err(|failure| registry.counters().session_refused(failure))?;
        let (to_edge, inbound) = mpsc::channel(16);
        registry.spawn_session(session.clone(), ReceiverStream::new(inbound));
        let send = |msg| {
            let to_edge = to_edge.clone();
            async move {
                let _ = to_edge.send(Ok(pb::AgentMessage { msg: Some(msg) })).await;
            }
        };
        let targets: Targets = Arc::default();
        let mut pending: HashMap<u64, Forward> = HashMap::new();
        for (i, forward) in forwards.into_iter().enumerate() {
            let mut req = command.bind_request(&forward.address, forward.port)?;
            req.request_id = i as u64 + 1;
            pending.insert(req.request_id, forward);
            send(pb::agent_message::Msg::Bind(req)).await;
        }
        let mut next_request = pending.len() as u64 + 1;
        loop {
            use pb::edge_message::Msg;
            let msg = tokio::select! {
                _ = cut.cancelled() => return Ok(()),
                event = self.events.recv() => {
                    match event {
                        None | Some(Event::TerminalClosed) => return Ok(()),
                        Some(Event::Forward { address, port, client_port }) => {
                            // A forward added later (`~C` in OpenSSH).
                            let forward = Forward { address, port, client_port };
                            let mut req = command.bind_request(&forward.address, forward.port)?;
                            req.request_id = next_request;
                            next_request += 1;
                            pending.insert(req.request_id, forward);
                            send(pb::agent_message::Msg::Bind(req)).await;
                        }
                        Some(Event::ForwardRefused { address, port }) => {
                            let limit = self.shared.settings.forwards_per_session;
                            let refused = too_many_forwards(&address, port, limit);
                            self.say_err(&format!("{}\n", refused.to_pb())).await;
                        }
                        Some(Event::TerminalRefused) => self.refuse_terminal().await,
                        Some(_) => {}
                    }
                    continue;
                }
                msg = from_edge.recv() => match msg {
                    Some(Ok(pb::EdgeMessage { msg: Some(msg) })) => msg,
                    Some(_) => continue,
                    None => return Ok(()),
                },
            };
            match msg {
                Msg::Welcome(welcome) => {
                    tracing::info!(session.id = %welcome.session_id, %peer, "SSH session opened");
                }
                Msg::Bind(bound) => {
                    let Some(forward) = pending.remove(&bound.request_id) else {
                        continue;
                    };
                    if let Some(error) = bound.error {
                        return Err(Failure::from_pb(&error));
                    }
                    targets.lock().expect("targets lock").insert(
                        bound.endpoint_id,
                        Target {
                            address: forward.address,
                            port: forward.client_port,
                        },
                    );
                    self.say(&format!("Forwarding  {}\n", bound.public_url))
                        .await;
                }
                Msg::Ping(beat) => send(pb::agent_message::Msg::Pong(beat)).await,
                Msg::OpenStreams(open) => {
                    for _ in 0..open.count.min(MAX_OPEN_STREAMS) {
                        session.park(parked(
                            self.handle.clone(),
                            targets.clone(),
                            &self.shared.tracker,
                        ));
                    }
                }
                Msg::Error(error) => return Err(Failure::from_pb(&error)),
                // The endpoints serve what is in flight until the edge
                // closes the session; the user is to connect again.
                Msg::Drain(drain) => {
                    let draining = Failure::new(ErrorCode::DRAINING, drain.reason);
                    self.say_err(&format!("{}\n", draining.to_pb())).await;
                }
                Msg::EndpointStopped(stopped) => {
                    targets
                        .lock()
                        .expect("targets lock")
                        .remove(&stopped.endpoint_id);
                    let why = stopped.error.map(|e| e.to_string()).unwrap_or_default();
                    self.say_err(&format!(
                        "the edge stopped {}: {why}\n",
                        stopped.endpoint_id
                    ))
                    .await;
                }
                Msg::Unbind(_) | Msg::Pong(_) => {}
            }
        }
    }

    /// Tells the client that a further session channel was refused (a
    /// second command on the connection, as OpenSSH's connection sharing
    /// asks for).
    async fn refuse_terminal(&self) {
        let refused = Failure::new(
            ErrorCode::SSH_MULTIPLEXING,
            "a further session channel was refused: one SSH connection runs one command; connect again for another tunnel",
        );
        self.say_err(&format!("{}\n", refused.to_pb())).await;
    }

    /// Writes to the client's terminal (stdout), if it has one.
    async fn say(&self, text: &str) {
        if let Some(id) = self.terminal {
            let _ = self.handle.data(id, text.as_bytes().to_vec()).await;
        }
    }

    /// Writes to the client's stderr, if it has a terminal.
    async fn say_err(&self, text: &str) {
        if let Some(id) = self.terminal {
            let _ = self
                .handle
                .extended_data(id, 1, text.as_bytes().to_vec())
                .await;
        }
    }

    /// Ends the command with `status`: OpenSSH exits with it.
    async fn close_terminal(&mut self, status: u32) {
        if let Some(id) = self.terminal {
            self.terminal_closing = true;
            let _ = self.handle.exit_status_request(id, status).await;
            let _ = self.handle.eof(id).await;
            let _ = self.handle.close(id).await;
        }
    }

    /// Gives a client whose terminal was closed a moment to print what it
    /// got and close its side: OpenSSH drops unprinted output when the
    /// connection is cut first.
    async fn let_terminal_close(&mut self) {
        if !self.terminal_closing {
            return;
        }
        let until = Instant::now() + CLOSE_WAIT;
        loop {
            match timeout_at(until, self.events.recv()).await {
                Ok(Some(Event::TerminalClosed)) | Ok(None) | Err(_) => return,
                Ok(Some(_)) => {}
            }
        }
    }

    /// Tells the client why it is cut off, on its terminal (exit status 1)
    /// or, without one, as the disconnect message OpenSSH prints.
    async fn fail(&mut self, failure: &Failure) {
        let text = failure.to_pb().to_string();
        if self.terminal.is_some() {
            self.say_err(&format!("{text}\n")).await;
            self.close_terminal(1).await;
            return;
        }
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, text, String::new())
            .await;
    }
}

fn too_many_forwards(address: &str, port: u32, limit: usize) -> Failure {
    Failure::new(
        ErrorCode::SSH_TOO_MANY_FORWARDS,
        format!("-R {address}:{port} refused: one SSH session holds at most {limit} forwards"),
    )
}
