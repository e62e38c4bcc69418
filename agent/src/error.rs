//! What the library's public functions return when they fail: loading and
//! validating a config ([`ConfigError`]), running the agent
//! ([`AgentError`]). Every message names the file, the key or the step
//! that failed.

use std::{fmt, io, path::PathBuf};

use postern_net::TlsError;

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file cannot be read.
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A config file is not YAML.
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The merged config is not of the config's shape (the message names
    /// the key).
    #[error("{0}")]
    Syntax(serde_yaml_ng::Error),
    /// A key has a bad value; the message names the key and says what is
    /// wrong with it.
    #[error("{0}")]
    Invalid(String),
    /// A key's value cannot be used: `field` names it (and the value or
    /// the file), the source says why.
    #[error("{field}")]
    Field {
        field: String,
        #[source]
        source: FieldCause,
    },
    /// What is wrong with the value of `field`.
    #[error("{field}")]
    In {
        field: String,
        #[source]
        source: Box<ConfigError>,
    },
    /// Every problem validation found, a line each.
    #[error("{}", Lines(.0))]
    Problems(Vec<ConfigError>),
}

/// Why a key's value cannot be used (see [`ConfigError::Field`]).
#[derive(Debug, thiserror::Error)]
pub enum FieldCause {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    #[error(transparent)]
    Number(#[from] std::num::ParseIntError),
    #[error(transparent)]
    Range(#[from] std::num::TryFromIntError),
    #[error(transparent)]
    Utf8(#[from] std::string::FromUtf8Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Certificate(#[from] TlsError),
    #[error(transparent)]
    CaBundle(#[from] postern_net::CaError),
}

impl ConfigError {
    /// `field` cannot be used, because of `source`.
    pub(crate) fn field(field: impl Into<String>, source: impl Into<FieldCause>) -> ConfigError {
        ConfigError::Field {
            field: field.into(),
            source: source.into(),
        }
    }

    /// This error, as what is wrong with the value of `field`.
    pub(crate) fn within(self, field: impl Into<String>) -> ConfigError {
        ConfigError::In {
            field: field.into(),
            source: Box::new(self),
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

/// Returns [`invalid!`] as the error.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::invalid!($($arg)*))
    };
}
pub(crate) use bail;

/// An error and its causes on one line, `error: cause: cause`.
pub(crate) struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Problems, a line each, each with its causes.
struct Lines<'a>(&'a [ConfigError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", Chain(problem))?;
        }
        Ok(())
    }
}

/// TLS settings that cannot be used: the roots toward the edge or an
/// upstream, a tunnel's certificate, its client CAs.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// `root_cas: host`, and the system's store has no usable certificate.
    #[error("{0}")]
    HostRoots(String),
    /// A file that holds no certificate (the message names the key).
    #[error("{0}")]
    NoCertificate(&'static str),
    /// PEM that does not parse; `context` names the key.
    #[error("{context}")]
    Pem {
        context: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refuses a certificate or a key; `context` names the key.
    #[error("{context}")]
    Refused {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// rustls refuses the protocol versions.
    #[error(transparent)]
    Protocol(#[from] rustls::Error),
    /// What is wrong with the settings of `context`.
    #[error("{context}")]
    In {
        context: &'static str,
        #[source]
        source: Box<TlsSetupError>,
    },
    #[error("mutual_tls_cas")]
    ClientCas(#[source] postern_net::CaError),
    /// The certificate and key (the message names their files).
    #[error(transparent)]
    Certificate(#[from] TlsError),
}

impl TlsSetupError {
    /// This error, as what is wrong with the settings of `context`.
    pub(crate) fn within(self, context: &'static str) -> TlsSetupError {
        TlsSetupError::In {
            context,
            source: Box::new(self),
        }
    }
}

/// A running agent that stopped on an error, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("web_addr: binding {addr}")]
    WebBind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("web_addr: making the listener non-blocking")]
    WebNonBlocking(#[source] io::Error),
    #[error("web_addr: using the listener")]
    WebListener(#[source] io::Error),
    /// TLS toward the edge, or a tunnel's TLS.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The edge refused the session or a tunnel; retrying cannot help.
    #[error(transparent)]
    Refused(postern_proto::Failure),
    /// The edge's address is not `host:port`.
    #[error("{0:?} is not host:port")]
    Address(String),
    #[error(transparent)]
    ServerName(rustls::pki_types::InvalidDnsNameError),
    #[error("no connection within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection to the edge failed: its TLS or HTTP/2 handshake.
    #[error("{0}")]
    Connect(String),
    /// The proxy refused, or answered what the agent cannot use (the
    /// message names the proxy).
    #[error("{0}")]
    Proxy(String),
    /// A step with the proxy failed; `step` names it and the proxy.
    #[error("{step}")]
    ProxyIo {
        step: String,
        #[source]
        source: io::Error,
    },
    /// The proxy's host is not a TLS name.
    #[error("{what}")]
    ProxyName {
        what: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// Reading or writing the connection to the edge or the proxy.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("agent task")]
    Task(#[source] tokio::task::JoinError),
    #[error("agent API task")]
    ApiTask(#[source] tokio::task::JoinError),
}
