//! The link between edge nodes (`NodeLink` in `tunnel.proto`): gRPC over
//! mutual TLS. Every node holds the cluster's inter-node CA, derived from
//! the cluster key, and issues itself a certificate for its own node name;
//! a node accepts only clients with a certificate of that CA and, when it
//! dials, only the server certificate of the node it means to reach.
//!
//! A visitor's connection to an endpoint whose agent is connected to
//! another node goes there as one `Forward` stream: the frames of a data
//! stream, relayed both ways by the receiving node into a data stream of
//! its agent. TLS, modules and the event stay at the node the visitor
//! reached; the serving node only relays. `StopSession` ends an agent
//! session of the receiving node for another node's admin API.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{Stream, StreamExt, future::BoxFuture};
use postern_ingress::{ClaimedStream, DevCa, StreamSource};
use postern_net::{
    Pem, TlsConnect, TlsError, certified_key_from_pem, crypto_provider, tcp_nodelay,
};
use postern_proto::{ErrorCode, Failure, h2_settings, metadata, pb};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpListener;

use crate::registry::{COMMAND_WAIT, Registry, SessionCommand};
use tokio_rustls::TlsConnector;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{
    Request, Response, Status, Streaming,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

/// How long dialling another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings between nodes: a silent peer is given up after
/// `KEEPALIVE + KEEPALIVE_TIMEOUT`, failing its streams.
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The name a node's certificate carries: a hash of its id, so that any id
/// makes a valid DNS name.
pub fn node_name(node_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, node_id.as_bytes());
    format!(
        "n{}.nodes.postern.internal",
        hex::encode(&digest.as_ref()[..10])
    )
}

/// Why this node's TLS for the links cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Issuing or loading the node's certificate.
    #[error(transparent)]
    Certificate(#[from] TlsError),
    #[error("reading the node CA's certificate")]
    CaPem(#[from] rustls::pki_types::pem::Error),
    #[error("building the TLS configs")]
    Tls(#[from] rustls::Error),
    #[error("building the client-certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Another node's address and the channels to it.
type Peer = (SocketAddr, Arc<[Channel]>);

/// This node's side of the links: the TLS configs for both directions and
/// a few HTTP/2 channels per peer (as many as an agent opens), each opened
/// on first use, which streams take in turn.
pub struct NodeLinks {
    node_id: String,
    client_tls: Arc<ClientConfig>,
    server_tls: Arc<ServerConfig>,
    channels: Mutex<HashMap<String, Peer>>,
    next: std::sync::atomic::AtomicUsize,
    /// Bound on getting a stream from the other node's agent.
    stream_wait: Duration,
}

impl NodeLinks {
    /// TLS for this node from the inter-node CA.
    pub fn new(node_id: &str, ca: &DevCa, stream_wait: Duration) -> Result<NodeLinks, LinkError> {
        let (cert, key) = ca.issue_pem(&[node_name(node_id)])?;
        let key = Arc::new(certified_key_from_pem(
            Pem::new("the node's link certificate", cert.as_bytes()),
            Pem::new("the node's link key", key.as_bytes()),
        )?);
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
        let roots = Arc::new(roots);
        let provider = crypto_provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(LinkError::Verifier)?;
        let mut server_tls = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key.clone())));
        server_tls.alpn_protocols = vec![b"h2".to_vec()];
        let mut client_tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
        client_tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(NodeLinks {
            node_id: node_id.to_string(),
            client_tls: Arc::new(client_tls),
            server_tls: Arc::new(server_tls),
            channels: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicUsize::new(0),
            stream_wait,
        })
    }

    /// A channel to `node` at `addr`, the next in turn (new ones when its
    /// address changed, as after a restart elsewhere).
    fn channel(&self, node: &str, addr: SocketAddr) -> Channel {
        let mut channels = self.channels.lock().expect("channels lock");
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((known, list)) = channels.get(node)
            && *known == addr
        {
            return list[turn % list.len()].clone();
        }
        let list: Arc<[Channel]> = (0..h2_settings::default_connections())
            .map(|_| self.new_channel(node, addr))
            .collect();
        channels.insert(node.to_string(), (addr, list.clone()));
        list[turn % list.len()].clone()
    }

    /// A channel to `node` at `addr`, connecting on first use.
    fn new_channel(&self, node: &str, addr: SocketAddr) -> Channel {
        let connector = TlsConnect {
            dial: move || tcp_nodelay(addr),
            name: ServerName::try_from(node_name(node)).expect("node names are DNS names"),
            tls: TlsConnector::from(self.client_tls.clone()),
        };
        Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a URI authority")
            .connect_timeout(CONNECT_TIMEOUT)
            .initial_stream_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_frame_size(h2_settings::MAX_FRAME_SIZE)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_with_connector_lazy(connector)
    }

    /// Drops the channels of nodes no longer live.
    pub fn retain(&self, live: &std::collections::BTreeSet<String>) {
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|node, _| live.contains(node));
    }

    /// Serves `Forward` streams for this node's endpoints, and
    /// `StopSession` for its sessions, on `listener`; the connections'
    /// tasks run on `tracker`.
    pub fn serve(
        &self,
        listener: TcpListener,
        registry: Arc<Registry>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
        let incoming = crate::service::tls_incoming(
            "node link",
            listener,
            self.server_tls.clone(),
            tracker,
            &stop,
            false,
        );
        let service = pb::node_link_server::NodeLinkServer::new(LinkService { registry });
        tokio::spawn(
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .initial_stream_window_size(h2_settings::STREAM_WINDOW)
                .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
                .max_frame_size(h2_settings::MAX_FRAME_SIZE)
                .max_concurrent_streams(h2_settings::MAX_CONCURRENT_STREAMS)
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        )
    }
}

impl NodeLinks {
    /// Asks `node` at `addr` to run `command` on its session `session_id`.
    pub async fn command(
        &self,
        node: &str,
        addr: SocketAddr,
        session_id: &str,
        command: &SessionCommand,
    ) -> Result<(), Failure> {
        let mut client = pb::node_link_client::NodeLinkClient::new(self.channel(node, addr));
        let request = command.to_pb(session_id, &self.node_id);
        tokio::time::timeout(
            CONNECT_TIMEOUT * 2 + COMMAND_WAIT,
            client.stop_session(request),
        )
        .await
        .map_err(|_| {
            Failure::new(
                ErrorCode::NODE_UNREACHABLE,
                format!("node {node} did not answer"),
            )
        })?
        .map(|_| ())
        .map_err(|status| refusal(node, &status))
    }
}

/// An endpoint whose agent is connected to another node: each claim is a
/// `Forward` stream to that node.
pub struct RemoteSource {
    pub links: Arc<NodeLinks>,
    pub node_id: String,
    pub addr: SocketAddr,
    pub endpoint_id: String,
    pub session_id: String,
}

impl StreamSource for RemoteSource {
    fn claim(&self) -> BoxFuture<'static, Result<ClaimedStream, Failure>> {
        let channel = self.links.channel(&self.node_id, self.addr);
        let endpoint_id = self.endpoint_id.clone();
        let from = self.links.node_id.clone();
        let node = self.node_id.clone();
        let wait = self.links.stream_wait + CONNECT_TIMEOUT;
        Box::pin(async move {
            let (attach, frames) = postern_proto::attachable();
            let mut request = Request::new(frames);
            let meta = request.metadata_mut();
            for (key, value) in [
                (metadata::FORWARD_ENDPOINT, endpoint_id),
                (metadata::FORWARD_FROM, from),
            ] {
                let value = MetadataValue::try_from(value).map_err(|_| {
                    Failure::new(ErrorCode::INTERNAL, format!("{key}: not a header value"))
                })?;
                meta.insert(key, value);
            }
            let mut client = pb::node_link_client::NodeLinkClient::new(channel)
                .max_decoding_message_size(usize::MAX);
            let response = tokio::time::timeout(wait, client.forward(request))
                .await
                .map_err(|_| {
                    Failure::new(
                        ErrorCode::NODE_UNREACHABLE,
                        format!("node {node} did not answer within {wait:?}"),
                    )
                })?
                .map_err(|status| refusal(&node, &status))?;
            Ok(ClaimedStream {
                inbound: Box::pin(response.into_inner()),
                attach,
                permit: None,
            })
        })
    }

    fn session_id(&self) -> &str {
        &self.session_id
    }
}

/// The failure a refused or failed `Forward` stands for: the serving
/// node's code when it sent one, otherwise the node was not reached.
fn refusal(node: &str, status: &Status) -> Failure {
    let code = status
        .metadata()
        .get(metadata::ERROR_CODE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .and_then(ErrorCode::from_number);
    match code {
        Some(code) => Failure::new(code, format!("at node {node}: {}", status.message())),
        None => Failure::new(
            ErrorCode::NODE_UNREACHABLE,
            format!("node {node}: {}", status.message()),
        ),
    }
}

/// The status that carries a failure to the forwarding node.
fn status_of(failure: &Failure) -> Status {
    let mut status = Status::unavailable(failure.to_string());
    status.metadata_mut().insert(
        metadata::ERROR_CODE,
        MetadataValue::from(failure.code.number),
    );
    status
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct LinkService {
    registry: Arc<Registry>,
}

#[tonic::async_trait]
impl pb::node_link_server::NodeLink for LinkService {
    type ForwardStream = BoxStream<pb::Frame>;

    async fn forward(
        &self,
        request: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let endpoint_id = request
            .metadata()
            .get(metadata::FORWARD_ENDPOINT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // Only this node's own agents: a forwarded stream never travels on.
        let endpoint = self
            .registry
            .gateway()
            .endpoint(&endpoint_id)
            .filter(|e| e.remote.is_none())
            .ok_or_else(|| {
                status_of(&Failure::new(
                    ErrorCode::ENDPOINT_OFFLINE,
                    format!("no endpoint {endpoint_id:?} here"),
                ))
            })?;
        let claimed = endpoint.source.claim().await.map_err(|f| status_of(&f))?;
        let from_peer = relay_in(request.into_inner(), endpoint_id);
        claimed.attach.send(Box::pin(from_peer)).map_err(|_| {
            status_of(&Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent's data stream closed",
            ))
        })?;
        // The agent's frames go back as they come; the permit (the agent's
        // connection limit) is held as long as they flow.
        let permit = claimed.permit;
        let to_peer = claimed.inbound.map(move |frame| {
            let _held = &permit;
            frame
        });
        Ok(Response::new(Box::pin(to_peer)))
    }

    async fn stop_session(
        &self,
        request: Request<pb::StopSessionRequest>,
    ) -> Result<Response<pb::StopSessionResponse>, Status> {
        let request = request.into_inner();
        let id = &request.session_id;
        let session = self.registry.session(id).ok_or_else(|| {
            status_of(&Failure::new(
                ErrorCode::API_NOT_FOUND,
                format!("no tunnel session {id} here"),
            ))
        })?;
        let command = SessionCommand::from_pb(&request);
        tracing::info!(id, from = %request.from_node, command = command.name(), "session command through another node's admin API");
        self.registry
            .command(&session, command)
            .await
            .map_err(|f| status_of(&f))?;
        Ok(Response::new(pb::StopSessionResponse {}))
    }
}

/// The forwarding node's frames as the agent gets them: the `open` frame
/// names this node's endpoint, and a broken link ends the stream with an
/// error frame rather than silently.
fn relay_in(
    inbound: Streaming<pb::Frame>,
    endpoint_id: String,
) -> impl Stream<Item = pb::Frame> + Send {
    // After an error a tonic stream ends, so the error frame is the last.
    inbound.map(move |item| match item {
        Ok(mut frame) => {
            if let Some(open) = frame.open.as_mut() {
                open.endpoint_id.clone_from(&endpoint_id);
            }
            frame
        }
        Err(status) => pb::Frame {
            error: Some(
                ErrorCode::NODE_UNREACHABLE
                    .to_pb(format!("the forwarding node's stream failed: {status}")),
            ),
            ..Default::default()
        },
    })
}
