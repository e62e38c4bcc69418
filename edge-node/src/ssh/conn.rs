//! One SSH connection, the SSH side: authentication (a public key
//! registered through `/ssh_credentials`, or where the operator allows it
//! the authtoken as the user name), `-R` forward requests, the one session
//! channel and its command. Everything that matters to
//! the tunnel is handed to the connection's agent (`agent.rs`) as an
//! [`Event`]; what SSH offers besides (shells, `-L` forwards, X11, agent
//! forwarding, subsystems) is refused.

use std::{collections::HashSet, sync::Arc};

use postern_net::Accepted;
use russh::{
    ChannelId,
    keys::PublicKey,
    server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Shared, agent, key_sha256};
use crate::auth::AuthtokenRecord;

/// What the SSH side tells the connection's agent, in order.
#[derive(Debug)]
pub(super) enum Event {
    /// The client logged in as `record` (its key's credential or its
    /// user name's authtoken); `client` is its SSH version string.
    Authenticated {
        record: AuthtokenRecord,
        client: String,
    },
    /// `ssh -R address:port:…`; `client_port` is the port the client
    /// knows it by (the one allocated for a request of port 0).
    Forward {
        address: String,
        port: u32,
        client_port: u32,
    },
    /// A forward the session may not hold (beyond the limit).
    ForwardRefused { address: String, port: u32 },
    /// The session channel: the client's terminal.
    Terminal(ChannelId),
    /// A further session channel, refused (one command a connection).
    TerminalRefused,
    /// The command the client runs on it.
    Exec(String),
    /// A shell instead of a command.
    Shell,
    /// The client closed its terminal.
    TerminalClosed,
}

/// The SSH side of one connection.
struct Conn {
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    /// Who the client logged in as, until `auth_succeeded` tells the
    /// agent.
    accepted: Option<AuthtokenRecord>,
    authenticated: bool,
    /// Forwards asked for, as the client knows them.
    forwards: HashSet<(String, u32)>,
    terminal: Option<ChannelId>,
    command_given: bool,
}

/// Serves one accepted connection until it ends.
pub(super) async fn serve(shared: Arc<Shared>, accepted: Accepted) {
    let peer = accepted.client;
    let (events, events_rx) = mpsc::channel(16);
    let conn = Conn {
        shared: shared.clone(),
        events,
        accepted: None,
        authenticated: false,
        forwards: HashSet::new(),
        terminal: None,
        command_given: false,
    };
    let grace = shared.settings.login_grace;
    let started = russh::server::run_stream(shared.config.clone(), accepted.stream, conn);
    let session = match tokio::time::timeout(grace, started).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "SSH handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no SSH version string within {grace:?}");
            return;
        }
    };
    let handle = session.handle();
    let cut = CancellationToken::new();
    shared.tracker.spawn(agent::run(
        shared.clone(),
        handle.clone(),
        events_rx,
        peer,
        cut.clone(),
    ));
    let reason = tokio::select! {
        ended = session => {
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "SSH connection ended");
            }
            return;
        }
        _ = cut.cancelled() => "the session ended",
        _ = shared.stop.cancelled() => "the edge node is shutting down",
    };
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            reason.into(),
            String::new(),
        )
        .await;
}

impl Conn {
    /// The credential of a key registered through `/ssh_credentials`;
    /// `None` after the client has logged in.
    fn registered(&self, key: &PublicKey) -> Option<AuthtokenRecord> {
        if self.authenticated {
            return None;
        }
        let record = self.shared.tokens.ssh_key(&key_sha256(key));
        if record.is_none() {
            tracing::debug!(fingerprint = %key.fingerprint(russh::keys::HashAlg::Sha256), "an SSH key offered is not registered");
        }
        record
    }

    async fn tell(&self, event: Event) {
        // The agent ends only when the connection does.
        let _ = self.events.send(event).await;
    }

    /// Takes `channel`'s exec or shell request as the session's one
    /// command: `true` when it is (success sent), `false` when it is not
    /// the session channel or a command was already given (failure sent).
    fn take_command(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        if self.terminal != Some(channel) || self.command_given {
            session.channel_failure(channel)?;
            return Ok(false);
        }
        self.command_given = true;
        session.channel_success(channel)?;
        Ok(true)
    }

    /// The port the client will know a forward by: the one asked for, or
    /// for port 0 the lowest one free among this session's forwards on
    /// the same address (the public port is known only once bound).
    fn client_port(&self, address: &str, port: u32) -> u32 {
        if port != 0 {
            return port;
        }
        (1..=u32::from(u16::MAX))
            .find(|p| !self.forwards.contains(&(address.to_string(), *p)))
            .unwrap_or(1)
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        // Everything after the first success is refused.
        if self.authenticated || !self.shared.settings.allow_authtoken_user {
            return Ok(Auth::reject());
        }
        // A user name that is no authtoken is a user name: the client's
        // keys are tried next.
        match self.shared.tokens.authenticate(user) {
            Ok(record) => {
                self.accepted = Some(record);
                Ok(Auth::Accept)
            }
            Err(failure) => {
                tracing::debug!(error = %failure, "the SSH user name is no authtoken");
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.registered(offer.public_key) {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Looked up again: the credential may be gone since the offer.
        match self.registered(key.public_key) {
            Some(record) => {
                self.accepted = Some(record);
                Ok(Auth::Accept)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(record) = self.accepted.take() {
            self.authenticated = true;
            let client = String::from_utf8_lossy(session.remote_sshid()).into_owned();
            self.tell(Event::Authenticated { record, client }).await;
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let requested = *port;
        if self.forwards.len() >= self.shared.settings.forwards_per_session {
            self.tell(Event::ForwardRefused {
                address: address.to_string(),
                port: requested,
            })
            .await;
            return Ok(false);
        }
        let client_port = self.client_port(address, requested);
        if !self.forwards.insert((address.to_string(), client_port)) {
            return Ok(false);
        }
        *port = client_port;
        self.tell(Event::Forward {
            address: address.to_string(),
            port: requested,
            client_port,
        })
        .await;
        Ok(true)
    }

    async fn channel_open_session(
        &mut self,
        channel: russh::Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.terminal.is_some() {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            self.tell(Event::TerminalRefused).await;
            return Ok(());
        }
        // The channel is written through the session's handle; its own
        // receiver is dropped, so what the client types is discarded
        // rather than queued.
        let id = channel.id();
        drop(channel);
        reply.accept().await;
        self.terminal = Some(id);
        self.tell(Event::Terminal(id)).await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.take_command(channel, session)? {
            self.tell(Event::Exec(String::from_utf8_lossy(data).into_owned()))
                .await;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.take_command(channel, session)? {
            self.tell(Event::Shell).await;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Nothing here reads a terminal; `ssh -t` still works, with
        // "PTY allocation request failed" from the client.
        session.channel_failure(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.terminal == Some(channel) {
            self.tell(Event::TerminalClosed).await;
        }
        Ok(())
    }
}
