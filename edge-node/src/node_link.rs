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
//!
//! Both ends speak HTTP/2 with `h2` directly (`postern_proto::direct`, as
//! the agent tunnel does; the wire is tonic's gRPC): a few connections per
//! peer, each dialled on first use and again once it broke or the peer
//! went away, whose tasks poll the `Forward` streams' outgoing frames; the
//! listener serves `Forward` itself and `StopSession` through tonic's
//! service.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{Stream, StreamExt, future::BoxFuture};
use postern_ingress::{ClaimedStream, DevCa, StreamSource};
use postern_net::{
    Pem, TlsConnect, TlsError, certified_key_from_pem, crypto_provider, tcp_nodelay,
};
use postern_proto::{
    ErrorCode, Failure, InboundFrames,
    direct::{
        DataStreams, EdgeConnection, FORWARD_PATH, STOP_SESSION_PATH, ServedFrames, ServerSettings,
    },
    h2_settings, metadata, pb,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpListener;

use crate::registry::{COMMAND_WAIT, Registry, SessionCommand};
use tokio_rustls::TlsConnector;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

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

/// A connection to another node: dialled on first use, and again once it
/// broke or the node is going away (a stream that comes meanwhile waits
/// for the dial under way).
#[derive(Default)]
struct Link(tokio::sync::Mutex<Option<EdgeConnection>>);

/// Another node's address and the connections to it.
type Peer = (SocketAddr, Arc<[Link]>);

/// This node's side of the links: the TLS configs for both directions and
/// a few HTTP/2 connections per peer (as many as an agent opens), each
/// dialled on first use, which streams take in turn.
pub struct NodeLinks {
    node_id: String,
    client_tls: Arc<ClientConfig>,
    server_tls: Arc<ServerConfig>,
    peers: Mutex<HashMap<String, Peer>>,
    next: std::sync::atomic::AtomicUsize,
    /// The tasks that drive the connections this node dialled.
    dialled: TaskTracker,
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
            peers: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicUsize::new(0),
            dialled: TaskTracker::new(),
            stream_wait,
        })
    }

    /// A connection to `node` at `addr`, the next in turn (new ones when
    /// its address changed, as after a restart elsewhere), dialled if it
    /// is not open.
    async fn connection(&self, node: &str, addr: SocketAddr) -> Result<EdgeConnection, Failure> {
        let peer = {
            let mut peers = self.peers.lock().expect("peers lock");
            match peers.get(node) {
                Some((known, links)) if *known == addr => links.clone(),
                _ => {
                    let links: Arc<[Link]> = (0..h2_settings::default_connections())
                        .map(|_| Link::default())
                        .collect();
                    peers.insert(node.to_string(), (addr, links.clone()));
                    links
                }
            }
        };
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut link = peer[turn % peer.len()].0.lock().await;
        if let Some(connection) = link.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        // A broken one is dropped (its task ends with its last stream).
        *link = None;
        let connection = self.dial(node, addr).await?;
        *link = Some(connection.clone());
        Ok(connection)
    }

    /// Dials `node` at `addr`: TCP, mutual TLS, the HTTP/2 handshake, within
    /// `CONNECT_TIMEOUT`; the connection's task goes on `dialled`.
    async fn dial(&self, node: &str, addr: SocketAddr) -> Result<EdgeConnection, Failure> {
        let unreachable =
            |why: String| Failure::new(ErrorCode::NODE_UNREACHABLE, format!("node {node}: {why}"));
        let connector = TlsConnect {
            dial: move || tcp_nodelay(addr),
            name: ServerName::try_from(node_name(node)).expect("node names are DNS names"),
            tls: TlsConnector::from(self.client_tls.clone()),
        };
        let dialled = async {
            let tls = connector
                .connect()
                .await
                .map_err(|e| unreachable(format!("connecting to {addr} failed: {e}")))?;
            EdgeConnection::handshake(tls, KEEPALIVE, KEEPALIVE_TIMEOUT)
                .await
                .map_err(|e| unreachable(format!("the HTTP/2 handshake with {addr} failed: {e}")))
        };
        let (connection, driver) = tokio::time::timeout(CONNECT_TIMEOUT, dialled)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no connection to {addr} within {CONNECT_TIMEOUT:?}"
                ))
            })??;
        let node = node.to_string();
        self.dialled.spawn(async move {
            if let Err(e) = driver.linger().run().await {
                tracing::debug!(node, error = %e, "a link to another node ended");
            }
        });
        Ok(connection)
    }

    /// Drops the connections to nodes no longer live.
    pub fn retain(&self, live: &std::collections::BTreeSet<String>) {
        self.peers
            .lock()
            .expect("peers lock")
            .retain(|node, _| live.contains(node));
    }

    /// Drops every connection this node dialled and waits for their tasks,
    /// which end with their last streams.
    pub async fn close(&self) {
        self.peers.lock().expect("peers lock").clear();
        self.dialled.close();
        self.dialled.wait().await;
    }

    /// Serves `Forward` streams for this node's endpoints, and
    /// `StopSession` for its sessions, on `listener` until `stop`, with
    /// `h2` directly (`postern_proto::direct`): `Forward` by
    /// [`LinkService`]'s [`DataStreams`], `StopSession` by tonic's service.
    /// The connections' tasks run on `tracker`.
    pub fn serve(
        &self,
        listener: TcpListener,
        registry: Arc<Registry>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let incoming = crate::service::tls_incoming(
            "node link",
            listener,
            self.server_tls.clone(),
            tracker,
            &stop,
            false,
        );
        let service = LinkService { registry };
        let routes =
            tonic::service::Routes::new(pb::node_link_server::NodeLinkServer::new(service.clone()));
        let settings = ServerSettings {
            heartbeat: KEEPALIVE,
            tolerance: KEEPALIVE_TIMEOUT,
            max_header_list_size: crate::service::MAX_HEADER_LIST_SIZE,
        };
        crate::service::serve_direct(
            "node link",
            incoming,
            settings,
            tracker,
            stop,
            service,
            routes,
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
        let request = command.to_pb(session_id, &self.node_id);
        let call = async {
            let connection = self.connection(node, addr).await?;
            connection
                .unary::<_, pb::StopSessionResponse>(STOP_SESSION_PATH, &request)
                .await
                .map_err(|status| refusal(node, &status))
        };
        tokio::time::timeout(CONNECT_TIMEOUT * 2 + COMMAND_WAIT, call)
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorCode::NODE_UNREACHABLE,
                    format!("node {node} did not answer"),
                )
            })?
            .map(|_| ())
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
        let links = self.links.clone();
        let addr = self.addr;
        let endpoint_id = self.endpoint_id.clone();
        let node = self.node_id.clone();
        let wait = self.links.stream_wait + CONNECT_TIMEOUT;
        Box::pin(async move {
            let from = links.node_id.as_str();
            let meta = [
                (metadata::FORWARD_ENDPOINT, endpoint_id.as_str()),
                (metadata::FORWARD_FROM, from),
            ];
            for (key, value) in meta {
                http::HeaderValue::from_str(value).map_err(|_| {
                    Failure::new(ErrorCode::INTERNAL, format!("{key}: not a header value"))
                })?;
            }
            let (attach, frames) = postern_proto::attachable();
            let forward = async {
                let connection = links.connection(&node, addr).await?;
                connection
                    .open_frames(FORWARD_PATH, &meta, Box::pin(frames))
                    .await
                    .map_err(|status| refusal(&node, &status))
            };
            let inbound = tokio::time::timeout(wait, forward).await.map_err(|_| {
                Failure::new(
                    ErrorCode::NODE_UNREACHABLE,
                    format!("node {node} did not answer within {wait:?}"),
                )
            })??;
            Ok(ClaimedStream {
                inbound,
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

#[derive(Clone)]
struct LinkService {
    registry: Arc<Registry>,
}

/// `Forward` streams, served with `h2` directly.
impl DataStreams for LinkService {
    const PATH: &'static str = FORWARD_PATH;
    type Opening = BoxFuture<'static, Result<ServedFrames, Status>>;

    fn open(&self, head: &http::request::Parts, inbound: InboundFrames) -> Self::Opening {
        Box::pin(forward(self.registry.clone(), &head.headers, inbound))
    }
}

/// Relays a `Forward` stream with `headers` and the forwarding node's
/// frames `inbound` into a data stream of this node's agent: the agent's
/// frames to send back, or a refusal.
fn forward(
    registry: Arc<Registry>,
    headers: &http::HeaderMap,
    inbound: InboundFrames,
) -> impl Future<Output = Result<ServedFrames, Status>> + Send + 'static {
    let endpoint_id = headers
        .get(metadata::FORWARD_ENDPOINT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    async move {
        // Only this node's own agents: a forwarded stream never travels on.
        let endpoint = registry
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
        let from_peer = relay_in(inbound, endpoint_id);
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
        Ok(Box::pin(to_peer) as ServedFrames)
    }
}

/// `StopSession`, served by tonic; `Forward` too for a peer served by
/// tonic alone (the link listener serves it with [`DataStreams`]).
#[tonic::async_trait]
impl pb::node_link_server::NodeLink for LinkService {
    type ForwardStream = ServedFrames;

    async fn forward(
        &self,
        request: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let (metadata, _, inbound) = request.into_parts();
        let frames = forward(
            self.registry.clone(),
            &metadata.into_headers(),
            Box::pin(inbound),
        )
        .await?;
        Ok(Response::new(frames))
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
fn relay_in(inbound: InboundFrames, endpoint_id: String) -> impl Stream<Item = pb::Frame> + Send {
    // After an error the stream ends, so the error frame is the last.
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Takes every `Forward` stream and sends nothing back.
    #[derive(Clone)]
    struct Nothing;

    impl DataStreams for Nothing {
        const PATH: &'static str = FORWARD_PATH;
        type Opening = std::future::Ready<Result<ServedFrames, Status>>;

        fn open(&self, _head: &http::request::Parts, _inbound: InboundFrames) -> Self::Opening {
            std::future::ready(Ok(Box::pin(futures_util::stream::empty()) as ServedFrames))
        }
    }

    /// Node `b`'s link listener, with its TLS, counting the connections
    /// it accepted; at `drain` it drains them (GOAWAY) and takes no more.
    async fn serve_b(
        links: &NodeLinks,
        drain: CancellationToken,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tls, count) = (
            tokio_rustls::TlsAcceptor::from(links.server_tls.clone()),
            accepted.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = tls.accept(tcp).await.expect("mutual TLS");
                count.fetch_add(1, Ordering::SeqCst);
                let settings = ServerSettings {
                    heartbeat: KEEPALIVE,
                    tolerance: KEEPALIVE_TIMEOUT,
                    max_header_list_size: crate::service::MAX_HEADER_LIST_SIZE,
                };
                let routes = tonic::service::RoutesBuilder::default().routes();
                let served = postern_proto::direct::serve_connection(
                    Box::new(tls),
                    (),
                    settings,
                    drain.clone(),
                    Nothing,
                    routes,
                );
                tokio::spawn(served);
            }
        });
        (addr, accepted)
    }

    async fn forward(links: &NodeLinks, addr: SocketAddr) -> Result<InboundFrames, Failure> {
        let connection = links.connection("b", addr).await?;
        connection
            .open_frames(FORWARD_PATH, &[], Box::pin(futures_util::stream::empty()))
            .await
            .map_err(|status| refusal("b", &status))
    }

    #[tokio::test]
    async fn connections_are_dialled_on_first_use_taken_in_turn_and_dialled_again_after_a_drain() {
        let ca = DevCa::derived("node CA", &[7; 32]).unwrap();
        let wait = Duration::from_secs(1);
        let (a, b) = (
            NodeLinks::new("a", &ca, wait).unwrap(),
            NodeLinks::new("b", &ca, wait).unwrap(),
        );
        let n = h2_settings::default_connections();
        let first = CancellationToken::new();
        let (addr, accepted) = serve_b(&b, first.clone()).await;
        for _ in 0..2 * n {
            let _ = forward(&a, addr).await.unwrap();
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            n,
            "one dial per connection"
        );

        // Node b drains those connections: none is taken again.
        first.cancel();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let peer = a.peers.lock().unwrap()["b"].1.clone();
                let mut closed = 0;
                for link in peer.iter() {
                    closed += usize::from(link.0.lock().await.as_ref().unwrap().is_closed());
                }
                if closed == n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every connection sees the GOAWAY");
        for _ in 0..n {
            // Dialled again, then refused by the draining server: what
            // counts is that a new connection was dialled.
            let _ = forward(&a, addr).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2 * n, "dialled again");

        // A node that cannot be dialled.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let failure = forward(&a, gone_addr).await.err().expect("not reached");
        assert_eq!(failure.code, ErrorCode::NODE_UNREACHABLE, "{failure}");
        assert!(
            failure.to_string().contains("node b: connecting to"),
            "{failure}"
        );

        a.retain(&Default::default());
        assert!(a.peers.lock().unwrap().is_empty());
        a.close().await;
    }
}
