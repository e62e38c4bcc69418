//! What the library's public functions return when they fail: loading a
//! config, starting a node, draining it. Every message names the file, the
//! field or the step that failed.

use std::{io, net::SocketAddr, path::PathBuf};

use postern_net::TlsError;

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// What is wrong, in the config file at `path`.
    #[error("in {}", path.display())]
    In {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    /// A `${NAME}` that cannot be expanded.
    #[error("line {line}: {reason}")]
    Expand { line: usize, reason: String },
    /// The text is not TOML of the config's shape (the message names the
    /// line and the key).
    #[error("{0}")]
    Syntax(toml::de::Error),
    /// A field has a bad value, or a file it names cannot be used; the
    /// message names the field.
    #[error(transparent)]
    Invalid(anyhow::Error),
    /// `--dev` could not keep its files in the data directory.
    #[error("{action} {}", path.display())]
    DevFiles {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A node that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding the {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the address a listener is bound to")]
    Listener(#[source] io::Error),
    #[error("loading the dev CA")]
    DevCa(#[source] TlsError),
    #[error("opening the certificate-authority store")]
    CaStore(#[source] anyhow::Error),
    #[error("loading or generating the SSH host key (ssh.host_key)")]
    SshHostKey(#[source] io::Error),
    /// Joining the cluster, or setting up the link between nodes.
    #[error(transparent)]
    Cluster(anyhow::Error),
    #[error("no agent certificate and no dev CA")]
    NoAgentCertificate,
    /// The dev CA could not issue the agent listener's certificate.
    #[error(transparent)]
    AgentCertificate(TlsError),
    #[error("starting the event pipeline")]
    Events(#[source] postern_events::EventsError),
    #[error("oauth")]
    OAuth(#[source] anyhow::Error),
    #[error("starting the ACME certificate manager")]
    Acme(#[source] crate::acme::AcmeError),
}

/// A drain that did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("agent gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    #[error("agent gRPC server task")]
    GrpcTask(#[source] tokio::task::JoinError),
}

/// A node that could not start, or did not drain cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
}
