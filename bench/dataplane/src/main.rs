//! Candidate shapes of the tunnel's data plane, one process per side, for
//! `bench/dataplane.py` (issue #20, part 2: measure before choosing).
//!
//! The `client` side takes visitors (TCP) and opens one tunnel stream per
//! visitor over its tunnel connections, in turn; the `server` side connects
//! each stream to the upstream. The product has it the other way round (the
//! agent, the HTTP/2 client, is next to the upstream), which changes nothing
//! for the bytes. Shapes:
//!
//! - `tonic`: today's data plane. A tonic bidi stream per visitor with the
//!   product's `postern_proto::pipe` at both ends: hyper's stream task reads
//!   the socket and hands each message to the HTTP/2 connection task, which
//!   writes TLS; the way back, the connection task wakes the pump task.
//! - `h2`: the `h2` crate driven directly; the connection in its own task,
//!   each stream's pump in a task of its own (still a hand-off per message).
//! - `h2one`: the `h2` crate with a connection and all its streams' pumps
//!   polled by one task: a message goes from socket to TLS without waking
//!   another task.
//! - `direct`: the product's code (`postern_proto::direct`): at the client
//!   side the agent's data connection, at the server side the edge's
//!   connection server, each with the product's `pipe`; a stream's
//!   outgoing frames are polled by the connection's task, its incoming ones
//!   by its own.
//! - `tls`: one TLS connection per visitor and no multiplexing (rathole's
//!   data channels), for reference.
//!
//! The three HTTP/2 shapes put the same bytes on the wire: gRPC messages of
//! `postern.tunnel.v1.Frame` on `/postern.tunnel.v1.Tunnel/Data`, with the
//! product's window and frame sizes.

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{Stream, StreamExt, stream::FuturesUnordered};
use postern_proto::{
    InboundFrames, attachable,
    direct::{self, Body, EdgeConnection, Inbound, encode_frame},
    h2_settings, pb, pipe,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tonic::{Request, Response, Status, Streaming, transport::server::Connected};

const NAME: &str = "bench.invalid";
const DATA_PATH: &str = "/postern.tunnel.v1.Tunnel/Data";
const MAX_READ: usize = postern_proto::MAX_READ;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    Tonic,
    H2,
    H2one,
    /// The product's direct data connection (`postern_proto::direct`, as the
    /// agent opens its extra connections) with `pipe`; client side only.
    Direct,
    Tls,
}

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accepts tunnel connections; connects each stream to `upstream`.
    Server {
        #[arg(long, value_enum)]
        shape: Shape,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        /// Where the server writes its certificate (`cert.pem`).
        #[arg(long)]
        cert_dir: PathBuf,
    },
    /// Takes visitors on `listen` and carries each over a tunnel stream.
    Client {
        #[arg(long, value_enum)]
        shape: Shape,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        cert_dir: PathBuf,
        /// Tunnel connections, streams taken in turn.
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Echoes what it reads, for the ping-pong runs.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// `conns` connections each sending `size` bytes and waiting for them
    /// back, for `secs`; prints round trips per second and p50/p99 in µs.
    Pingpong {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.cmd {
            Cmd::Server {
                shape,
                listen,
                upstream,
                cert_dir,
            } => server(shape, listen, upstream, cert_dir).await,
            Cmd::Client {
                shape,
                listen,
                server,
                cert_dir,
                connections,
            } => client(shape, listen, server, cert_dir, connections).await,
            Cmd::Echo { listen } => echo(listen).await,
            Cmd::Pingpong {
                target,
                conns,
                size,
                secs,
            } => pingpong(target, conns, size, Duration::from_secs_f64(secs)).await,
        }
    })
}

// --- TLS -----------------------------------------------------------------

fn server_tls(cert_dir: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let issued = rcgen::generate_simple_self_signed(vec![NAME.to_string()])?;
    std::fs::write(cert_dir.join("cert.pem"), issued.cert.pem())?;
    let key = PrivateKeyDer::Pkcs8(issued.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![issued.cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn client_tls(cert_dir: &std::path::Path) -> anyhow::Result<TlsConnector> {
    let pem = std::fs::read_to_string(cert_dir.join("cert.pem"))
        .context("reading the server's cert.pem")?;
    let der = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let der = base64_decode(&der)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der))?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Standard base64, enough for one PEM body.
fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", c as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

async fn tls_connect(connector: &TlsConnector, server: SocketAddr) -> io::Result<TlsClient> {
    let tcp = postern_net::tcp_nodelay(server).await?;
    connector
        .connect(ServerName::try_from(NAME).expect("a valid name"), tcp)
        .await
}

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

async fn nodelay(tcp: TcpStream) -> TcpStream {
    let _ = tcp.set_nodelay(true);
    tcp
}

// --- server side -----------------------------------------------------------

async fn server(
    shape: Shape,
    listen: SocketAddr,
    upstream: SocketAddr,
    cert_dir: PathBuf,
) -> anyhow::Result<()> {
    let acceptor = server_tls(&cert_dir)?;
    let listener = TcpListener::bind(listen).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(nodelay(tcp).await).await {
                    let _ = tx.send(tls).await;
                }
            });
        }
    });
    let mut connections = tokio_stream_of(rx);
    match shape {
        Shape::Tonic => {
            tonic::transport::Server::builder()
                .initial_stream_window_size(h2_settings::STREAM_WINDOW)
                .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
                .max_frame_size(h2_settings::MAX_FRAME_SIZE)
                .max_concurrent_streams(h2_settings::MAX_CONCURRENT_STREAMS)
                .tcp_nodelay(true)
                .add_service(pb::tunnel_server::TunnelServer::new(TonicData { upstream }))
                .serve_with_incoming(connections.map(|tls| Ok::<_, io::Error>(Conn(tls))))
                .await?;
        }
        Shape::H2 | Shape::H2one => {
            while let Some(tls) = connections.next().await {
                tokio::spawn(async move {
                    if let Err(e) = h2_server_connection(shape, tls, upstream).await {
                        eprintln!("server connection: {e:#}");
                    }
                });
            }
        }
        Shape::Direct => {
            let fallback =
                tonic::service::Routes::new(pb::tunnel_server::TunnelServer::new(TonicData {
                    upstream,
                }));
            while let Some(tls) = connections.next().await {
                let settings = direct::ServerSettings {
                    heartbeat: Duration::from_secs(10),
                    tolerance: Duration::from_secs(10),
                    max_header_list_size: 16 * 1024,
                };
                tokio::spawn(direct::serve_connection(
                    Box::new(tls),
                    (),
                    settings,
                    tokio_util::sync::CancellationToken::new(),
                    DirectData { upstream },
                    fallback.clone(),
                ));
            }
        }
        Shape::Tls => {
            while let Some(mut tls) = connections.next().await {
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        }
    }
    Ok(())
}

fn tokio_stream_of<T>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Unpin {
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// tonic wants its connections to say who they are.
struct Conn(TlsStream<TcpStream>);

impl Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

struct TonicData {
    upstream: SocketAddr,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tunnel_server::Tunnel for TonicData {
    type ControlStream = BoxStream<pb::EdgeMessage>;
    type DataStream = BoxStream<pb::Frame>;

    async fn control(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        Err(Status::unimplemented("data streams only"))
    }

    async fn data(
        &self,
        request: Request<Streaming<pb::Frame>>,
    ) -> Result<Response<Self::DataStream>, Status> {
        let up = TcpStream::connect(self.upstream)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let _ = up.set_nodelay(true);
        let (reader, writer) = up.into_split();
        let (outbound, pump) = pipe(reader, writer, request.into_inner(), Vec::new());
        tokio::spawn(pump.run());
        Ok(Response::new(Box::pin(outbound.map(Ok))))
    }
}

/// As the product's edge does it: take the stream, plug frames in later
/// (here once the upstream is dialled).
struct DirectData {
    upstream: SocketAddr,
}

impl direct::DataStreams for DirectData {
    const PATH: &'static str = direct::DATA_PATH;
    type Opening = std::future::Ready<Result<direct::ServedFrames, Status>>;

    fn open(&self, _head: &http::request::Parts, inbound: InboundFrames) -> Self::Opening {
        let (attach, frames) = attachable();
        let upstream = self.upstream;
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let (reader, writer) = nodelay(up).await.into_split();
            let (outbound, pump) = pipe(reader, writer, inbound, Vec::new());
            if attach.send(Box::pin(outbound)).is_ok() {
                pump.run().await;
            }
        });
        std::future::ready(Ok(Box::pin(frames.map(Ok))))
    }
}

async fn h2_server_connection(
    shape: Shape,
    tls: TlsStream<TcpStream>,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let mut connection = h2::server::Builder::new()
        .initial_window_size(h2_settings::STREAM_WINDOW)
        .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
        .max_frame_size(h2_settings::MAX_FRAME_SIZE)
        .max_concurrent_streams(h2_settings::MAX_CONCURRENT_STREAMS)
        .handshake::<_, Body>(tls)
        .await?;
    let mut pumps = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = connection.accept() => {
                let Some(accepted) = accepted else { break };
                let (request, respond) = accepted?;
                let stream = server_stream(request.into_body(), respond, upstream);
                if shape == Shape::H2one {
                    pumps.push(stream);
                } else {
                    tokio::spawn(stream);
                }
            }
            Some(()) = pumps.next(), if !pumps.is_empty() => {}
        }
    }
    while pumps.next().await.is_some() {}
    Ok(())
}

async fn server_stream(
    recv: h2::RecvStream,
    mut respond: h2::server::SendResponse<Body>,
    upstream: SocketAddr,
) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    };
    let response = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .expect("a valid response");
    let Ok(send) = respond.send_response(response, false) else {
        return;
    };
    pump(nodelay(up).await, send, async { Ok(recv) }, true).await;
}

// --- client side -----------------------------------------------------------

async fn client(
    shape: Shape,
    listen: SocketAddr,
    server: SocketAddr,
    cert_dir: PathBuf,
    connections: usize,
) -> anyhow::Result<()> {
    let connector = client_tls(&cert_dir)?;
    let listener = TcpListener::bind(listen).await?;
    let next = AtomicUsize::new(0);
    let turn = move || next.fetch_add(1, Ordering::Relaxed) % connections;
    match shape {
        Shape::Tonic => {
            let mut clients = Vec::new();
            for _ in 0..connections {
                let dial = TlsDial {
                    connector: connector.clone(),
                    server,
                };
                let channel = tonic::transport::Endpoint::from_static("http://bench.invalid")
                    .initial_stream_window_size(h2_settings::STREAM_WINDOW)
                    .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
                    .max_frame_size(h2_settings::MAX_FRAME_SIZE)
                    .tcp_nodelay(true)
                    .connect_with_connector(dial)
                    .await?;
                clients.push(pb::tunnel_client::TunnelClient::new(channel));
            }
            loop {
                let (visitor, _) = listener.accept().await?;
                let mut client = clients[turn()].clone();
                let (attach, frames) = attachable();
                let opened = async move {
                    let response = client.data(Request::new(frames)).await?;
                    Ok(Box::pin(response.into_inner()) as InboundFrames)
                };
                tokio::spawn(visit(nodelay(visitor).await, attach, opened));
            }
        }
        Shape::H2 | Shape::H2one => {
            let mut senders = Vec::new();
            for _ in 0..connections {
                let tls = tls_connect(&connector, server).await?;
                let (send_request, connection) = h2::client::Builder::new()
                    .initial_window_size(h2_settings::STREAM_WINDOW)
                    .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
                    .max_frame_size(h2_settings::MAX_FRAME_SIZE)
                    .handshake::<_, Body>(tls)
                    .await?;
                let (tx, rx) = mpsc::channel::<TcpStream>(64);
                tokio::spawn(h2_client_connection(shape, connection, send_request, rx));
                senders.push(tx);
            }
            loop {
                let (visitor, _) = listener.accept().await?;
                senders[turn()].send(nodelay(visitor).await).await?;
            }
        }
        Shape::Direct => {
            let mut direct = Vec::new();
            for _ in 0..connections {
                let tls = tls_connect(&connector, server).await?;
                let heartbeat = Duration::from_secs(10);
                let (connection, driver) =
                    EdgeConnection::handshake(tls, heartbeat, heartbeat).await?;
                tokio::spawn(driver.run());
                direct.push(connection);
            }
            loop {
                let (visitor, _) = listener.accept().await?;
                let connection = direct[turn()].clone();
                let (attach, frames) = attachable();
                let opened = async move { connection.open_data(&[], Box::pin(frames)).await };
                tokio::spawn(visit(nodelay(visitor).await, attach, opened));
            }
        }
        Shape::Tls => loop {
            let (mut visitor, _) = listener.accept().await?;
            let connector = connector.clone();
            tokio::spawn(async move {
                let _ = visitor.set_nodelay(true);
                if let Ok(mut tls) = tls_connect(&connector, server).await {
                    let _ = tokio::io::copy_bidirectional(&mut visitor, &mut tls).await;
                }
            });
        },
    }
}

#[derive(Clone)]
struct TlsDial {
    connector: TlsConnector,
    server: SocketAddr,
}

impl tower_service::Service<http::Uri> for TlsDial {
    type Response = hyper_util::rt::TokioIo<TlsClient>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tls_connect(&this.connector, this.server).await?,
            ))
        })
    }
}

/// As the product's agent does it: open the stream, then plug the socket in.
/// `opened` opens the stream with the frames `attach` plugs in.
async fn visit(
    visitor: TcpStream,
    attach: tokio::sync::oneshot::Sender<postern_proto::BoxFrames>,
    opened: impl Future<Output = Result<InboundFrames, Status>>,
) {
    let Ok(inbound) = opened.await else {
        return;
    };
    let (reader, writer) = visitor.into_split();
    let (outbound, pump) = pipe(reader, writer, inbound, Vec::new());
    if attach.send(Box::pin(outbound)).is_ok() {
        pump.run().await;
    }
}

async fn h2_client_connection(
    shape: Shape,
    mut connection: h2::client::Connection<TlsClient, Body>,
    mut send_request: h2::client::SendRequest<Body>,
    mut visitors: mpsc::Receiver<TcpStream>,
) {
    let mut pumps = FuturesUnordered::new();
    let (spawned_tx, mut spawned_rx) = mpsc::unbounded_channel::<()>();
    loop {
        tokio::select! {
            _ = &mut connection => break,
            visitor = visitors.recv() => {
                let Some(visitor) = visitor else { break };
                let request = http::Request::post(format!("https://{NAME}{DATA_PATH}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .expect("a valid request");
                let Ok((response, send)) = send_request.send_request(request, false) else {
                    break;
                };
                let recv = async move { Ok(response.await?.into_body()) };
                let stream = pump(visitor, send, recv, false);
                if shape == Shape::H2one {
                    pumps.push(Box::pin(stream) as Pin<Box<dyn Future<Output = ()> + Send>>);
                } else {
                    let done = spawned_tx.clone();
                    tokio::spawn(async move {
                        stream.await;
                        drop(done);
                    });
                }
            }
            Some(()) = pumps.next(), if !pumps.is_empty() => {}
        }
    }
    drop(spawned_tx);
    let _ = spawned_rx.recv().await;
}

// --- the h2 pump -------------------------------------------------------------

/// Both directions of one stream, in the calling task, with the product's
/// message encoding (`postern_proto::direct`). `trailers`: end with gRPC's
/// status trailers (the server side).
async fn pump(
    socket: TcpStream,
    send: h2::SendStream<Body>,
    recv: impl Future<Output = Result<h2::RecvStream, h2::Error>>,
    trailers: bool,
) {
    let (reader, writer) = socket.into_split();
    let up = socket_to_stream(reader, send, trailers);
    let down = async move { stream_to_socket(Inbound::new(recv.await?), writer).await };
    let _ = tokio::join!(up, down);
}

async fn socket_to_stream(
    mut reader: OwnedReadHalf,
    mut send: h2::SendStream<Body>,
    trailers: bool,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        // No read before the peer has room: the socket stays the brake.
        send.reserve_capacity(MAX_READ + 16);
        while send.capacity() == 0 {
            match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the stream closed"),
            }
        }
        if buf.capacity() < MAX_READ {
            buf.reserve(MAX_READ);
        }
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            let eof = pb::Frame {
                eof: true,
                ..Default::default()
            };
            send.send_data(encode_frame(eof), !trailers)?;
            if trailers {
                let mut status = http::HeaderMap::new();
                status.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(status)?;
            }
            return Ok(());
        }
        let data = pb::Frame {
            data: buf.split_to(n).freeze(),
            ..Default::default()
        };
        send.send_data(encode_frame(data), false)?;
    }
}

async fn stream_to_socket(mut inbound: Inbound, mut writer: OwnedWriteHalf) -> anyhow::Result<()> {
    while let Some(frame) = inbound.next().await {
        let frame = frame?;
        if !frame.data.is_empty() {
            writer.write_all(&frame.data).await?;
        }
        if frame.eof {
            writer.shutdown().await?;
        }
    }
    let _ = writer.shutdown().await;
    Ok(())
}

// --- load ----------------------------------------------------------------------

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = nodelay(tcp).await.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn pingpong(
    target: SocketAddr,
    conns: usize,
    size: usize,
    secs: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut tcp = postern_net::tcp_nodelay(target).await?;
            let (out, mut back) = (vec![7u8; size], vec![0u8; size]);
            // One round trip first: the stream is open before timing.
            tcp.write_all(&out).await?;
            tcp.read_exact(&mut back).await?;
            let mut took = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                tcp.write_all(&out).await?;
                tcp.read_exact(&mut back).await?;
                took.push(start.elapsed().as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(took)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!(
        "{{\"round_trips_per_s\": {:.0}, \"p50_us\": {:.1}, \"p99_us\": {:.1}}}",
        all.len() as f64 / secs.as_secs_f64(),
        at(0.5),
        at(0.99)
    );
    Ok(())
}
