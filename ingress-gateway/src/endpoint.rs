//! What the gateway knows about a bound endpoint, and the one thing it needs
//! from the agent session behind it: a data stream per proxied connection.

use std::{net::SocketAddr, sync::Arc};

use futures_util::future::BoxFuture;
use postern_proto::{BoxFrames, Failure, InboundFrames, pb};
use tokio::sync::oneshot;

/// A data stream claimed from an agent session: the agent's frames, and the
/// slot where the gateway plugs in the frames it sends back.
pub struct ClaimedStream {
    pub inbound: InboundFrames,
    pub attach: oneshot::Sender<BoxFrames>,
    /// Counts against the agent's limit of concurrent connections while
    /// held: keep it for as long as the connection lives.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Hands out data streams to the agent behind an endpoint.
pub trait StreamSource: Send + Sync + 'static {
    /// A stream ready for one proxied connection.
    fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>>;
    /// The agent session id, for logs and outcomes.
    fn session_id(&self) -> &str;
}

/// Where TLS ends for a TLS endpoint.
pub use postern_proto::TerminateAt;

/// What kind of endpoint, with what the gateway needs to serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    Http,
    Tls { terminate_at: TerminateAt },
    Tcp { port: u16 },
}

impl EndpointKind {
    pub fn scheme(&self) -> &'static str {
        match self {
            EndpointKind::Http => "https",
            EndpointKind::Tls { .. } => "tls",
            EndpointKind::Tcp { .. } => "tcp",
        }
    }
}

/// Another node of the cluster, where the agent serving an endpoint is
/// connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub node_id: String,
    pub region: String,
}

/// A bound endpoint: one agent's, served here or through another node.
pub struct Endpoint {
    pub id: String,
    /// The tunnel's name in the agent config.
    pub name: String,
    pub kind: EndpointKind,
    pub public_url: String,
    pub source: Arc<dyn StreamSource>,
    /// `None`: an agent of this node. Otherwise the node whose agent serves
    /// it, reached over the link between nodes.
    pub remote: Option<Location>,
}

/// The endpoint that served a request, in the response's extensions.
#[derive(Clone)]
pub struct ServedBy(pub Arc<Endpoint>);

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("url", &self.public_url)
            .field("session", &self.source.session_id())
            .field("remote", &self.remote)
            .finish()
    }
}

/// The `open` frame that starts a proxied connection, with the trace
/// context of the current span.
pub fn open_frame(
    endpoint: &Endpoint,
    client: SocketAddr,
    server: SocketAddr,
    name: &str,
) -> pb::Frame {
    pb::Frame {
        open: Some(pb::StreamOpen {
            endpoint_id: endpoint.id.clone(),
            client_addr: crate::outcome::socket_text(client),
            server_addr: crate::outcome::socket_text(server),
            server_name: name.to_string(),
            traceparent: postern_telemetry::traceparent(&tracing::Span::current())
                .unwrap_or_default(),
        }),
        ..Default::default()
    }
}
