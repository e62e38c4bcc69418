//! The SSH ingress: agentless tunnels over `ssh -R`, for hosts where no
//! agent may be installed (ngrok's SSH reverse tunnels).
//!
//! An SSH connection authenticated by an authtoken as its user name
//! (`ssh -R … <authtoken>@<edge> http`) becomes an agent session of the
//! registry like any other: `agent.rs` speaks the tunnel protocol's
//! control messages to the registry in-process, binds one endpoint per
//! `-R` forward with the command's options (`command.rs`, ngrok's
//! grammar), and serves every data stream the gateway claims over a
//! `forwarded-tcpip` channel back to the client (`stream.rs`). So the
//! endpoints are ordinary: the same checks and `EndpointSpec` building,
//! events, metrics, cluster routing, drain and limits. `conn.rs` is the
//! SSH side of one connection (authentication, forwards, the session
//! channel). What the user sees — the public URL, errors with their
//! `ERR_POSTERN_<n>` — goes to the session channel, or, under `ssh -N`,
//! into the disconnect message OpenSSH prints.

mod agent;
mod command;
mod conn;
mod stream;

use std::{io, path::Path, sync::Arc, time::Duration};

use russh::keys::{
    HashAlg, PrivateKey, PublicKey,
    ssh_key::{LineEnding, private::Ed25519Keypair},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Authtokens,
    config::{SessionSettings, SshSettings},
    registry::Registry,
};

/// Where the generated host key is kept, under the data directory.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// The server's host key. Its `Debug` shows the fingerprint only.
#[derive(Clone)]
pub struct HostKey(Arc<PrivateKey>);

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({})", self.fingerprint())
    }
}

impl HostKey {
    /// An OpenSSH private key file, unencrypted.
    pub fn read(path: &Path) -> Result<HostKey, String> {
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let key = PrivateKey::from_openssh(&text)
            .map_err(|e| format!("not an OpenSSH private key: {e}"))?;
        if key.is_encrypted() {
            return Err("the key is encrypted with a passphrase; give an unencrypted one".into());
        }
        Ok(HostKey(Arc::new(key)))
    }

    /// The data directory's key, generated (Ed25519, mode 0600) when there
    /// is none yet.
    pub fn load_or_create(data_dir: &Path) -> io::Result<HostKey> {
        let path = data_dir.join(HOST_KEY_FILE);
        if path.exists() {
            return Self::read(&path).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            });
        }
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| io::Error::other("the system random generator failed"))?;
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| io::Error::other(format!("encoding the SSH host key: {e}")))?;
        std::fs::create_dir_all(data_dir)?;
        write_private(&path, text.as_bytes())?;
        tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(HashAlg::Sha256), "SSH host key generated");
        Ok(HostKey(Arc::new(key)))
    }

    /// `SHA256:…`, as `ssh` shows it.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The public key as a `known_hosts` or `authorized_keys` line body
    /// (`ssh-ed25519 AAAA…`).
    pub fn public_openssh(&self) -> String {
        PublicKey::from(self.0.public_key().key_data().clone())
            .to_openssh()
            .unwrap_or_default()
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::write(path, bytes)
}

/// What every connection of the SSH listener shares.
struct Shared {
    registry: Arc<Registry>,
    tokens: Arc<Authtokens>,
    settings: SshSettings,
    config: Arc<russh::server::Config>,
    /// The connections' tasks and their streams' tasks.
    tracker: TaskTracker,
    stop: CancellationToken,
}

/// The SSH listener and its connections.
pub struct SshServer {
    tracker: TaskTracker,
    /// Stops the accept loop.
    stop_accepting: CancellationToken,
    /// Disconnects every client.
    stop: CancellationToken,
}

impl SshServer {
    /// Serves `listener` with `key`: connections become sessions of
    /// `registry`, authenticated against `tokens`. Keepalives on the
    /// heartbeat interval; a client silent for the heartbeat tolerance is
    /// cut, and its endpoints with it.
    pub fn start(
        listener: TcpListener,
        key: HostKey,
        settings: SshSettings,
        session: &SessionSettings,
        registry: Arc<Registry>,
        tokens: Arc<Authtokens>,
    ) -> SshServer {
        let interval = session.heartbeat_interval;
        let tolerance = session.heartbeat_tolerance;
        // The user name is the credential: "none" is the only method.
        let mut methods = russh::MethodSet::empty();
        methods.push(russh::MethodKind::None);
        let config = russh::server::Config {
            server_id: russh::SshId::Standard(
                format!("SSH-2.0-Postern_{}", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods,
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![(*key.0).clone()],
            inactivity_timeout: Some(tolerance),
            keepalive_interval: Some(interval),
            keepalive_max: (tolerance.as_millis() / interval.as_millis().max(1)).max(1) as usize,
            nodelay: true,
            ..Default::default()
        };
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            registry,
            tokens,
            settings,
            config: Arc::new(config),
            tracker: tracker.clone(),
            stop: stop.clone(),
        });
        let stop_accepting = CancellationToken::new();
        postern_net::AcceptLoop::new("ssh", &tracker, &stop_accepting)
            .spawn(listener, move |accepted| {
                conn::serve(shared.clone(), accepted)
            });
        SshServer {
            tracker,
            stop_accepting,
            stop,
        }
    }

    /// Stops accepting and waits (at most `wait`) for the connections to
    /// end: once the registry has closed their sessions, each tells its
    /// client why and lets it close its terminal. Those still open then
    /// are disconnected, within another `wait`.
    pub async fn shutdown(self, wait: Duration) {
        self.stop_accepting.cancel();
        self.tracker.close();
        if tokio::time::timeout(wait, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        self.stop.cancel();
        if tokio::time::timeout(wait, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("SSH connections did not close within {wait:?}");
        }
    }
}
