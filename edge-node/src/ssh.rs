//! The SSH ingress: agentless tunnels over `ssh -R`, for hosts where no
//! agent may be installed (ngrok's SSH reverse tunnels).
//!
//! An SSH connection authenticated by a public key registered through
//! `/ssh_credentials` (or, where `ssh.allow_authtoken_user` is on, by an
//! authtoken as its user name: `ssh -R … <authtoken>@<edge> http`) becomes
//! an agent session of the registry like any other, with the credential's
//! ACL: `agent.rs` speaks the tunnel protocol's
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
    Algorithm, HashAlg, PrivateKey, PublicKey,
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

/// An SSH public key as an `authorized_keys` line holds it, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// `ssh-ed25519 AAAA… comment`, as OpenSSH writes it.
    pub line: String,
    /// Hex SHA-256 of the key's wire form: what the key is looked up by
    /// (`ssh-keygen -l` shows it in base64).
    pub sha256: String,
}

impl AuthorizedKey {
    /// One key in OpenSSH's `authorized_keys` format (the `.pub` file's
    /// line), without options; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<AuthorizedKey, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(
                "required: an OpenSSH public key such as the line of ~/.ssh/id_ed25519.pub".into(),
            );
        }
        if text.contains("PRIVATE KEY") {
            return Err(
                "this is a private key; give the public key, the line of the .pub file".into(),
            );
        }
        if text.lines().count() > 1 {
            return Err("give one key, on one line".into());
        }
        let key = PublicKey::from_openssh(text).map_err(|e| {
            format!(
                "not an OpenSSH public key (\"ssh-ed25519 AAAA… comment\", as in a .pub file): {e}"
            )
        })?;
        // What the SSH ingress verifies signatures of.
        if !matches!(
            key.algorithm(),
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. }
        ) {
            return Err(format!(
                "{} keys are not accepted; give an ed25519 or ECDSA key (ssh-keygen -t ed25519)",
                key.algorithm()
            ));
        }
        let line = key
            .to_openssh()
            .map_err(|e| format!("the key cannot be written back in OpenSSH's format: {e}"))?;
        Ok(AuthorizedKey {
            line,
            sha256: key_sha256(&key),
        })
    }
}

/// Hex SHA-256 of a public key's wire form.
pub fn key_sha256(key: &PublicKey) -> String {
    hex::encode(key.fingerprint(HashAlg::Sha256).as_bytes())
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
    /// `registry`, authenticated against `tokens` (its SSH keys and
    /// authtokens). Keepalives on the
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
        // A registered key, or the user name as the authtoken ("none").
        let mut methods = russh::MethodSet::empty();
        methods.push(russh::MethodKind::PublicKey);
        if settings.allow_authtoken_user {
            methods.push(russh::MethodKind::None);
        }
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

#[cfg(test)]
mod tests {
    use super::AuthorizedKey;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPEWz1DBicA2q039NGKERlFI+YaOvCKuVBhF6qQ/3acQ alice@laptop";

    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDo9pG18dd0FD70aeI1AOUIPrLa0cXlKqX/Wx/wXk222d6dB32uj+ZAMvGMDOGTAaoHAH51VhoOsxT7luCQZoxY2qOOk9vzu0q/EQybhgE2IulakjCnQBWb3AOu0f4Pl5bl12ISky9z2cy3Av+baGu9uDCBxvO/jZJesjyDUh7Mnw== r";

    #[test]
    fn an_authorized_keys_line_is_read_with_its_fingerprint() {
        let key = AuthorizedKey::parse(&format!("  {KEY}\n")).unwrap();
        assert_eq!(key.line, KEY);
        // `ssh-keygen -l` shows SHA256:1KWRXkgzy1HQYg5KZjlgXAwy+ik0H3gWXW2sVpbcrl0.
        assert_eq!(
            key.sha256,
            "d4a5915e4833cb51d0620e4a6639605c0c32fa29341f78165d6dac5696dcae5d"
        );
    }

    #[test]
    fn what_is_not_one_public_key_is_refused_saying_why() {
        for (text, want) in [
            ("", "required"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----",
                "private key",
            ),
            (&format!("{KEY}\n{KEY}"), "one key"),
            ("ssh-ed25519 not-base64!", "not an OpenSSH public key"),
            (
                &format!("from=\"10.0.0.1\" {KEY}"),
                "not an OpenSSH public key",
            ),
            (
                RSA,
                "ssh-rsa keys are not accepted; give an ed25519 or ECDSA key",
            ),
        ] {
            let error = AuthorizedKey::parse(text).unwrap_err();
            assert!(error.contains(want), "{text:?}: {error}");
        }
    }
}
