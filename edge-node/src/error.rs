//! What the library's public functions return when they fail: loading a
//! config, starting a node, draining it. Every message names the file, the
//! field or the step that failed.

use std::{io, net::SocketAddr, path::PathBuf};

use postern_net::TlsError;

use crate::{acl::AclError, auth::TokenError, ca_store::OpenError, cluster::JoinError};

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
    /// A field has a bad value; the message names the field and says what
    /// is wrong with it.
    #[error("{0}")]
    Invalid(String),
    /// A field's value cannot be used: `field` names it (and the value or
    /// the file), the source says why.
    #[error("{field}")]
    Field {
        field: String,
        #[source]
        source: FieldCause,
    },
    /// A file the config names cannot be read.
    #[error("reading {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A certificate or key the config names cannot be used (the message
    /// names its file).
    #[error(transparent)]
    Certificate(#[from] TlsError),
    /// A CIDR that does not parse (the message names the field).
    #[error(transparent)]
    Cidr(#[from] postern_net::CidrError),
    /// `[events]` (the message names the field).
    #[error(transparent)]
    Events(#[from] postern_events::ConfigError),
    /// `[telemetry]`.
    #[error("telemetry.{0}")]
    Telemetry(postern_telemetry::TelemetryError),
    /// `--dev` could not keep its files in the data directory.
    #[error("{action} {}", path.display())]
    DevFiles {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a field's value cannot be used (see [`ConfigError::Field`]).
#[derive(Debug, thiserror::Error)]
pub enum FieldCause {
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    #[error(transparent)]
    Address(#[from] std::net::AddrParseError),
    #[error(transparent)]
    Number(#[from] std::num::ParseIntError),
    #[error(transparent)]
    Name(#[from] postern_ingress::NameError),
    #[error(transparent)]
    Url(#[from] http::uri::InvalidUri),
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    ClusterKey(#[from] postern_config_sync::WeakKey),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ConfigError {
    /// `field` cannot be used, because of `source`.
    pub(crate) fn field(field: impl Into<String>, source: impl Into<FieldCause>) -> ConfigError {
        ConfigError::Field {
            field: field.into(),
            source: source.into(),
        }
    }
}

/// [`ConfigError::Invalid`] with a formatted message, as `format!` takes
/// it.
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::ConfigError::Invalid(format!($($arg)*))
    };
}
pub(crate) use invalid;

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
    CaStore(#[source] OpenError),
    #[error("loading or generating the SSH host key (ssh.host_key)")]
    SshHostKey(#[source] io::Error),
    /// Joining the cluster, or setting up the link between nodes.
    #[error(transparent)]
    Cluster(JoinError),
    #[error("no agent certificate and no dev CA")]
    NoAgentCertificate,
    /// The dev CA could not issue the agent listener's certificate.
    #[error(transparent)]
    AgentCertificate(TlsError),
    #[error("starting the event pipeline")]
    Events(#[source] postern_events::EventsError),
    /// The Redis of `[oauth]` (`field` is the key that names it).
    #[error("oauth: {field}")]
    Redis {
        field: &'static str,
        #[source]
        source: postern_ingress::StoreError,
    },
    #[error("starting the ACME certificate manager")]
    Acme(#[source] crate::acme::AcmeError),
}

/// A drain that did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
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
