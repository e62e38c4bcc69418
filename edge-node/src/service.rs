//! The agent-facing gRPC service and its TLS listener.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Future, Stream, StreamExt};
use postern_net::{AcceptLoop, Hooked, IoHook};
use postern_proto::{
    BoxFrames, ErrorCode, Failure, InboundFrames,
    direct::{DataStreams, ServedFrames, ServerSettings},
    metadata, pb,
};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, transport::server::Connected};

use crate::registry::{ControlOut, Registry};

/// How long an agent has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct TunnelService {
    registry: Arc<Registry>,
}

impl TunnelService {
    pub fn new(registry: Arc<Registry>) -> Self {
        TunnelService { registry }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tunnel_server::Tunnel for TunnelService {
    type ControlStream = BoxStream<pb::EdgeMessage>;
    type DataStream = BoxStream<pb::Frame>;

    async fn control(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10s")),
            _ => {
                return Err(Status::invalid_argument(
                    Failure::new(
                        ErrorCode::PROTOCOL_VIOLATION,
                        "the first control message must be a hello",
                    )
                    .to_string(),
                ));
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let addr = peer.as_ref().map(|p| p.addr);
        match self.registry.open_session(hello, tx.clone(), peer) {
            Ok(session) => {
                let out = ControlOut::new(rx, Some(session.cancelled()));
                self.registry.spawn_session(session, inbound);
                Ok(Response::new(Box::pin(out)))
            }
            Err(failure) => {
                self.registry.counters().session_refused(&failure);
                tracing::info!(peer = ?addr, error = %failure, "agent session refused");
                let error = pb::EdgeMessage {
                    msg: Some(pb::edge_message::Msg::Error(failure.to_pb())),
                };
                let _ = tx.try_send(Ok(error));
                drop(tx);
                Ok(Response::new(Box::pin(ControlOut::new(rx, None))))
            }
        }
    }

    async fn data(
        &self,
        request: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::DataStream>, Status> {
        let (metadata, extensions, inbound) = request.into_parts();
        let frames = self.open_data(
            &metadata.into_headers(),
            extensions.get(),
            Box::pin(inbound),
        )?;
        Ok(Response::new(Box::pin(frames.map(Ok))))
    }
}

impl TunnelService {
    /// Parks a data stream the agent opened on a connection `peer`, with
    /// `headers` (its session id and stream token); the frames to send it.
    fn open_data(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
        inbound: InboundFrames,
    ) -> Result<BoxFrames, Status> {
        let value = |key: &str| {
            headers
                .get(key)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let (session_id, token) = (value(metadata::SESSION), value(metadata::STREAM_TOKEN));
        let session = self
            .registry
            .session(session_id)
            .filter(|s| s.stream_token_matches(token))
            .ok_or_else(|| Status::permission_denied("unknown session or stream token"))?;
        // An agent may open its data streams on connections of their own:
        // each is cut with the session.
        if let Some(peer) = peer
            && !session.join(peer)
        {
            return Err(Status::resource_exhausted(format!(
                "a session uses at most {} connections",
                crate::registry::MAX_CONNECTIONS
            )));
        }
        let (attach, frames) = postern_proto::attachable();
        session.park(postern_ingress::ClaimedStream {
            inbound,
            attach,
            permit: None,
        });
        Ok(Box::pin(frames))
    }
}

impl DataStreams for TunnelService {
    const PATH: &'static str = postern_proto::direct::DATA_PATH;
    type Opening = std::future::Ready<Result<ServedFrames, Status>>;

    fn open(&self, head: &http::request::Parts, inbound: InboundFrames) -> Self::Opening {
        let opened = self.open_data(&head.headers, head.extensions.get(), inbound);
        std::future::ready(opened.map(|frames| Box::pin(frames.map(Ok)) as ServedFrames))
    }
}

/// The peer's connection as a request extension: its address, the name it
/// asked for in TLS (for an agent: which agent ingress), and the switch
/// that cuts it (a closed session takes its data streams with it).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Tells this connection from the others of the same session.
    pub id: u64,
    pub addr: SocketAddr,
    pub server_name: Option<String>,
    pub cut: CancellationToken,
    /// Cancelled once the connection is gone.
    pub closed: CancellationToken,
}

impl PeerInfo {
    /// A connection's info, with an id of its own.
    pub fn new(addr: SocketAddr, server_name: Option<String>, cut: CancellationToken) -> PeerInfo {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        PeerInfo {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            addr,
            server_name,
            cut,
            closed: CancellationToken::new(),
        }
    }
}

/// An accepted TLS connection (an agent's, or another node's) that can be
/// cut from the session side.
pub struct TlsConn {
    tls: TlsStream<AckStream>,
    peer: PeerInfo,
    cut: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.peer.closed.cancel();
    }
}

impl TlsConn {
    fn new(tls: TlsStream<AckStream>, addr: SocketAddr) -> TlsConn {
        let cut = CancellationToken::new();
        let server_name = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
        TlsConn {
            tls,
            cut: Box::pin(cut.clone().cancelled_owned()),
            peer: PeerInfo::new(addr, server_name, cut),
        }
    }

    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the agent session was closed",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// A TCP stream that, when `QuickAck(true)`, acknowledges what it read at
/// once instead of after Linux's delayed-ACK wait (40 ms). A peer that
/// writes small frames without `TCP_NODELAY` (ngrok's SDKs do, on their
/// session connection) otherwise holds each next frame until that ACK
/// comes: about 40 ms added to every request through an SDK session.
pub type AckStream = Hooked<TcpStream, QuickAck>;

/// The hook of an [`AckStream`].
pub struct QuickAck(bool);

impl IoHook<TcpStream> for QuickAck {
    fn read(&self, tcp: &TcpStream, _bytes: &[u8]) {
        if self.0 {
            // Linux leaves quick-ACK mode on its own: set it per read.
            let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
        }
    }
}

/// Accepts connections (of agents, or of other nodes) through the accept
/// loop on `tracker` until `stop`, completes their TLS handshakes in the
/// connection tasks, and yields the finished ones; `quick_ack` as
/// [`AckStream`] says.
pub fn tls_incoming(
    name: &'static str,
    listener: TcpListener,
    config: Arc<ServerConfig>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    quick_ack: bool,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + use<> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    AcceptLoop::new(name, tracker, stop).spawn(listener, move |accepted| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
            let peer = accepted.client;
            let tcp = Hooked::new(accepted.stream, QuickAck(quick_ack));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(TlsConn::new(tls, peer))).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Request headers a peer (an agent, another node) may send on its
/// connection, in bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Serves every connection `incoming` yields, until it ends, with `h2`
/// directly (`postern_proto::direct::serve_connection`), each on a task of
/// `connections`: the streams of `D::PATH` by a clone of `data` (their
/// outgoing frames polled by the connection's task), every other request
/// by `fallback` (tonic's service); at `stop` the connections drain.
/// `listener` names them in the log.
pub fn serve_direct<D: DataStreams + Clone>(
    listener: &'static str,
    incoming: impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static,
    settings: ServerSettings,
    connections: &TaskTracker,
    stop: CancellationToken,
    data: D,
    fallback: tonic::service::Routes,
) -> tokio::task::JoinHandle<()> {
    let connections = connections.clone();
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(Ok(conn)) = incoming.next().await {
            let peer = conn.connect_info();
            let served = postern_proto::direct::serve_connection(
                Box::new(conn),
                peer.clone(),
                settings,
                stop.clone(),
                data.clone(),
                fallback.clone(),
            );
            connections.spawn(async move {
                if let Err(e) = served.await {
                    tracing::debug!(listener, peer = %peer.addr, error = %e, "a connection ended");
                }
            });
        }
    })
}
