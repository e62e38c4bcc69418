//! The tunnel's streams spoken with the `h2` crate directly instead of
//! through tonic and hyper: the same gRPC requests, messages and trailers
//! on the wire, so either end works with a peer that uses tonic. The agent
//! opens its control stream and its data streams this way; the edge serves
//! data streams itself and hands the control stream to tonic's service.
//! Links between edge nodes are the same: a node opens `NodeLink.Forward`
//! streams (and its unary `StopSession` calls) this way, and the other
//! serves `Forward` itself, `StopSession` through tonic's service.
//!
//! What changes is who does the work. With tonic, a stream's outgoing frames
//! are polled by a task of hyper's that hands each message to the HTTP/2
//! connection task: two tasks woken per message. Here one task per
//! connection polls the connection *and* every data stream's outgoing
//! frames, so a frame read from a local socket reaches TLS without waking
//! another task: [`Driver::run`] for the client's connections
//! ([`EdgeConnection`]: an agent's, or a node's to another node),
//! [`serve_connection`] for the edge's, which hands every other request
//! (the control stream, `StopSession`) to tonic's service.
//! Incoming frames are read by the stream's own task, as with tonic.
//! `bench/dataplane.py` measured the shapes.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut, buf::Chain};
use futures_util::{Stream, StreamExt, stream::FuturesUnordered};
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tonic::Status;

use crate::{
    BoxFrames, InboundFrames,
    cork::{Cork, Corked},
    drive::drive,
    h2_settings, pb,
    pipe::MAX_READ,
};

/// A message as sent: gRPC's prefix and the encoded message, then a `Frame`'s
/// data as it came, uncopied.
pub type Body = Chain<Bytes, Bytes>;

/// Encodes `frame` as one gRPC message. The data field goes last (protobuf
/// fields may come in any order) so that its bytes are chained, not copied.
pub fn encode_frame(mut frame: pb::Frame) -> Body {
    let data = std::mem::take(&mut frame.data);
    let rest = frame.encoded_len();
    let field = if data.is_empty() {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(data.len() as u64) + data.len()
    };
    let mut head = BytesMut::with_capacity(5 + rest + 6);
    head.put_u8(0);
    head.put_u32((rest + field) as u32);
    frame.encode(&mut head).expect("the buffer has room");
    if !data.is_empty() {
        // Field 2 (`data`), length-delimited.
        head.put_u8(0x12);
        prost::encoding::encode_varint(data.len() as u64, &mut head);
    }
    head.freeze().chain(data)
}

/// Cuts gRPC messages out of HTTP/2 DATA frames; a message that lies whole
/// in one DATA frame is sliced out of it without a copy.
#[derive(Default)]
pub struct Deframer {
    chunk: Bytes,
    partial: BytesMut,
}

/// The largest message taken, as tonic's default: a peer cannot make this
/// side buffer more for one message.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The whole length (prefix included) of the message `bytes` starts with.
fn message_len(bytes: &[u8]) -> Option<usize> {
    let len: [u8; 4] = bytes.get(1..5)?.try_into().ok()?;
    Some(5 + u32::from_be_bytes(len) as usize)
}

fn too_large(len: usize) -> Result<(), Status> {
    if len > 5 + MAX_MESSAGE {
        return Err(Status::resource_exhausted(format!(
            "a message of {} bytes, over the {MAX_MESSAGE} taken",
            len - 5
        )));
    }
    Ok(())
}

impl Deframer {
    /// Takes the next DATA frame; call when [`Deframer::message`] gave `None`.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.chunk.is_empty());
        self.chunk = chunk;
    }

    /// True when no part of a message is waiting for more bytes.
    pub fn is_empty(&self) -> bool {
        self.chunk.is_empty() && self.partial.is_empty()
    }

    /// The next whole message, if the frames so far hold one.
    pub fn message<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        loop {
            if self.partial.is_empty() {
                match message_len(&self.chunk) {
                    Some(len) if self.chunk.len() >= len => {
                        let message = self.chunk.split_to(len);
                        return decode(message).map(Some);
                    }
                    _ if self.chunk.is_empty() => return Ok(None),
                    _ => {}
                }
            }
            if let Some(len) = message_len(&self.partial)
                && self.partial.len() >= len
            {
                return decode(self.partial.split_to(len).freeze()).map(Some);
            }
            if self.chunk.is_empty() {
                return Ok(None);
            }
            let len = message_len(&self.partial).unwrap_or(5);
            too_large(len)?;
            let need = len - self.partial.len();
            // Once the length is known, room for the whole message at once.
            self.partial.reserve(need);
            let take = need.min(self.chunk.len());
            self.partial.extend_from_slice(&self.chunk.split_to(take));
        }
    }
}

fn decode<M: Message + Default>(mut message: Bytes) -> Result<M, Status> {
    if message[0] != 0 {
        return Err(Status::internal(
            "a compressed message, which nothing asked for",
        ));
    }
    message.advance(5);
    M::decode(message).map_err(|e| Status::internal(format!("a bad message: {e}")))
}

/// The messages of an incoming stream (`Frame`s, or the control stream's);
/// ends with the stream, or with the status its trailers carry when that is
/// not OK.
pub struct Inbound<M = pb::Frame> {
    recv: h2::RecvStream,
    frames: Deframer,
    done: bool,
    message: std::marker::PhantomData<fn() -> M>,
}

impl<M> Inbound<M> {
    pub fn new(recv: h2::RecvStream) -> Inbound<M> {
        Inbound {
            recv,
            frames: Deframer::default(),
            done: false,
            message: std::marker::PhantomData,
        }
    }
}

fn h2_status(e: h2::Error) -> Status {
    Status::from_error(Box::new(e))
}

impl<M: Message + Default> Inbound<M> {
    /// The next message, or `None` at the end: tonic's `Streaming::message`.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        self.next().await.transpose()
    }
}

impl<M: Message + Default> Stream for Inbound<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.frames.message() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Room for more once the frame is handed on: what the
                    // peer may send is bounded by what the reader has taken.
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.frames.push(chunk);
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(h2_status(e))));
                }
                None => {
                    this.done = true;
                    let trailers = std::task::ready!(this.recv.poll_trailers(cx));
                    let status = match trailers {
                        Ok(Some(trailers)) => Status::from_header_map(&trailers)
                            .filter(|s| s.code() != tonic::Code::Ok),
                        Ok(None) => None,
                        Err(e) => Some(h2_status(e)),
                    };
                    let cut = (!this.frames.is_empty())
                        .then(|| Status::internal("the stream ended inside a message"));
                    return Poll::Ready(cut.or(status).map(Err));
                }
            }
        }
    }
}

/// How a side ends its half of a stream: the client with an empty DATA
/// frame that ends the stream, the server with gRPC's OK trailers.
#[derive(Clone, Copy)]
enum Ending {
    EndStream,
    Trailers,
}

/// Sends `messages` (encoded) on `send` as they come, no faster than the
/// peer's window allows (a message is asked for only once there is room),
/// then ends the stream. A failed stream (only a server's fails) ends with
/// the status in its trailers, as tonic ends it.
async fn send_messages<S>(mut messages: S, mut send: h2::SendStream<Body>, ending: Ending)
where
    S: Stream<Item = Result<Body, Status>> + Unpin,
{
    loop {
        // The stream is gone when there can be no room: the reader side
        // sees why.
        if !room(&mut send, MAX_READ + 16).await {
            return;
        }
        let Some(message) = messages.next().await else {
            let _ = match ending {
                Ending::EndStream => send.send_data(Bytes::new().chain(Bytes::new()), true),
                Ending::Trailers => send.send_trailers(ok_trailers()),
            };
            return;
        };
        let message = match message {
            Ok(message) => message,
            Err(status) => {
                let mut trailers = http::HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => {
                        let _ = send.send_trailers(trailers);
                    }
                    Err(_) => send.send_reset(h2::Reason::INTERNAL_ERROR),
                }
                return;
            }
        };
        if send.send_data(message, false).is_err() {
            return;
        }
    }
}

/// Asks for `want` bytes of the peer's window and waits until some of it
/// is there; false when the stream is gone.
async fn room(send: &mut h2::SendStream<Body>, want: usize) -> bool {
    send.reserve_capacity(want);
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return false,
        }
    }
    true
}

fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(
        http::HeaderName::from_static("grpc-status"),
        http::HeaderValue::from_static("0"),
    );
    trailers
}

/// `content-type: application/grpc`, made without parsing either half (a
/// stream is opened per proxied connection).
fn grpc_content_type(headers: &mut http::HeaderMap) {
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
}

/// HTTP/2 pings every `heartbeat`; a connection whose peer has not answered
/// one within `tolerance` is given up (tonic's keepalive, done by hand).
struct Keepalive {
    pings: h2::PingPong,
    ticks: tokio::time::Interval,
    tolerance: Duration,
    /// The deadline of the ping that is out.
    answer_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Keepalive {
    fn new(
        pings: Option<h2::PingPong>,
        heartbeat: Duration,
        tolerance: Duration,
    ) -> io::Result<Keepalive> {
        let pings = pings.ok_or_else(|| io::Error::other("the connection's pings were taken"))?;
        let mut ticks = tokio::time::interval(heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Keepalive {
            pings,
            ticks,
            tolerance,
            answer_by: None,
        })
    }

    /// Ready only when the connection must be given up.
    fn poll_failed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            match self.answer_by.as_mut() {
                None => {
                    std::task::ready!(self.ticks.poll_tick(cx));
                    if let Err(e) = self.pings.send_ping(h2::Ping::opaque()) {
                        return Poll::Ready(io::Error::other(e));
                    }
                    self.answer_by = Some(Box::pin(tokio::time::sleep(self.tolerance)));
                }
                Some(deadline) => {
                    match self.pings.poll_pong(cx) {
                        Poll::Ready(Ok(_)) => {
                            self.answer_by = None;
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(io::Error::other(e)),
                        Poll::Pending => {}
                    }
                    std::task::ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer answered no ping within {:?}", self.tolerance),
                    ));
                }
            }
        }
    }
}

/// A client's connection to an edge node, driven by [`Driver::run`]: an
/// agent's (its control stream and data streams are opened on it), or a
/// node's link to another node (`Forward` streams, `StopSession` calls).
#[derive(Clone)]
pub struct EdgeConnection {
    requests: h2::client::SendRequest<Body>,
    senders: mpsc::UnboundedSender<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What [`Driver::run`] drives.
pub struct Driver<T> {
    connection: h2::client::Connection<Corked<T>, Body>,
    cork: Cork,
    senders: mpsc::UnboundedReceiver<Pin<Box<dyn Future<Output = ()> + Send>>>,
    heartbeat: Duration,
    tolerance: Duration,
    /// See [`Driver::linger`].
    linger: bool,
}

/// The path of `Tunnel.Control`.
pub const CONTROL_PATH: &str = "/postern.tunnel.v1.Tunnel/Control";

/// Encodes `message` as one gRPC message (copied into one buffer: the
/// control stream's messages are small).
pub fn encode_message(message: &impl Message) -> Body {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message.encode(&mut buf).expect("the buffer has room");
    buf.freeze().chain(Bytes::new())
}

impl EdgeConnection {
    /// The HTTP/2 handshake on `io` (TLS already done), with the tunnel's
    /// settings.
    pub async fn handshake<T>(
        io: T,
        heartbeat: Duration,
        tolerance: Duration,
    ) -> Result<(EdgeConnection, Driver<T>), h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let cork = Cork::default();
        let (requests, connection) = h2::client::Builder::new()
            .initial_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_frame_size(h2_settings::MAX_FRAME_SIZE)
            .handshake(Corked::new(io, cork.clone()))
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            EdgeConnection {
                requests,
                senders: tx,
            },
            Driver {
                connection,
                cork,
                senders: rx,
                heartbeat,
                tolerance,
                linger: false,
            },
        ))
    }

    /// True once no stream can be opened on the connection any more: its
    /// driver ended, or the connection failed, or the peer is going away
    /// (GOAWAY).
    pub fn is_closed(&self) -> bool {
        if self.senders.is_closed() {
            return true;
        }
        // A fresh handle has no request pending, so this never waits: it
        // fails only once the connection can take no new stream.
        let mut requests = self.requests.clone();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(requests.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Opens a `Tunnel.Data` stream with `metadata` (name, value) pairs; the
    /// frames of `outbound` are sent from the connection's task. Fails with
    /// the edge's status when it refuses the stream.
    pub async fn open_data(
        &self,
        metadata: &[(&'static str, &str)],
        outbound: BoxFrames,
    ) -> Result<InboundFrames, Status> {
        self.open_frames(DATA_PATH, metadata, outbound).await
    }

    /// Opens a stream of `Frame`s both ways of gRPC method `path` (as
    /// `Tunnel.Data` or `NodeLink.Forward`), with `metadata` (name, value)
    /// pairs; the frames of `outbound` are sent from the connection's task.
    /// Fails with the peer's status when it refuses the stream.
    pub async fn open_frames(
        &self,
        path: &'static str,
        metadata: &[(&'static str, &str)],
        outbound: BoxFrames,
    ) -> Result<InboundFrames, Status> {
        let inbound = self
            .open(
                path,
                metadata,
                outbound.map(|frame| Ok(encode_frame(frame))),
            )
            .await?;
        Ok(Box::pin(inbound))
    }

    /// Calls unary gRPC method `path` with `request`: the peer's answer,
    /// or its status when that is not OK.
    pub async fn unary<Q, A>(&self, path: &'static str, request: &Q) -> Result<A, Status>
    where
        Q: Message,
        A: Message + Default,
    {
        let request = futures_util::stream::iter([Ok(encode_message(request))]);
        let mut inbound = self.open::<_, A>(path, &[], request).await?;
        let answer = inbound
            .message()
            .await?
            .ok_or_else(|| Status::internal("the peer answered no message"))?;
        // The trailers may still carry a failure.
        while inbound.message().await?.is_some() {}
        Ok(answer)
    }

    /// Opens the session's `Tunnel.Control` stream, `outbound` its
    /// messages (the hello first). Fails with the edge's status when it
    /// refuses the stream.
    pub async fn open_control<S>(&self, outbound: S) -> Result<Inbound<pb::EdgeMessage>, Status>
    where
        S: Stream<Item = pb::AgentMessage> + Send + Unpin + 'static,
    {
        let encoded = outbound.map(|message| Ok(encode_message(&message)));
        self.open(CONTROL_PATH, &[], encoded).await
    }

    /// Opens a stream of gRPC method `path`; the edge's answer is awaited.
    /// The metadata's names are the crate's constants (lowercase, valid).
    async fn open<S, M>(
        &self,
        path: &'static str,
        metadata: &[(&'static str, &str)],
        outbound: S,
    ) -> Result<Inbound<M>, Status>
    where
        S: Stream<Item = Result<Body, Status>> + Send + Unpin + 'static,
    {
        // Built from its parts: nothing here is parsed but the metadata's
        // values (a stream is opened per proxied connection).
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.authority = Some(http::uri::Authority::from_static("edge"));
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        let uri = http::Uri::from_parts(parts).expect("a scheme, an authority and a path");
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        grpc_content_type(headers);
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        for (name, value) in metadata {
            let value = http::HeaderValue::from_str(value).map_err(|_| {
                Status::invalid_argument(format!(
                    "request metadata: the value of {name} is not a valid header value"
                ))
            })?;
            headers.insert(http::HeaderName::from_static(name), value);
        }
        let mut requests = self.requests.clone().ready().await.map_err(h2_status)?;
        let (response, send) = requests.send_request(request, false).map_err(h2_status)?;
        self.senders
            .send(Box::pin(send_messages(outbound, send, Ending::EndStream)))
            .map_err(|_| Status::unavailable("the connection to the edge is closed"))?;
        let response = response.await.map_err(h2_status)?;
        if let Some(status) =
            Status::from_header_map(response.headers()).filter(|s| s.code() != tonic::Code::Ok)
        {
            return Err(status);
        }
        if response.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "the edge answered HTTP {}",
                response.status()
            )));
        }
        Ok(Inbound::new(response.into_body()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    /// Once every handle is gone, runs on until the connection's last
    /// stream has ended (h2 then closes the connection), as hyper's client
    /// does, instead of ending as soon as the streams' outgoing halves are
    /// done (which cuts an answer still coming in).
    pub fn linger(mut self) -> Driver<T> {
        self.linger = true;
        self
    }

    /// Drives the connection and every stream's outgoing frames until the
    /// connection ends, or its peer has not answered a ping within
    /// `tolerance` (one goes every `heartbeat`, as on tonic's connections),
    /// or every handle is gone and the streams are done.
    pub async fn run(self) -> io::Result<()> {
        let Driver {
            mut connection,
            cork,
            mut senders,
            heartbeat,
            tolerance,
            linger,
        } = self;
        let mut streams = FuturesUnordered::new();
        let mut keepalive = Keepalive::new(connection.ping_pong(), heartbeat, tolerance)?;
        let mut handles_gone = false;
        drive(|cx, pass| {
            while !handles_gone && let Poll::Ready(sender) = senders.poll_recv(cx) {
                match sender {
                    Some(sender) => streams.push(sender),
                    // Every handle is gone: end once the streams have.
                    None => handles_gone = true,
                }
            }
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if handles_gone && streams.is_empty() && !linger {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(failed) = keepalive.poll_failed(cx) {
                return Poll::Ready(Err(failed));
            }
            cork.poll(|| pass.poll(|cx| Pin::new(&mut connection).poll(cx)))
                .map_err(io::Error::other)
        })
        .await
    }
}

/// The frames a server sends back on a stream it serves; an error ends
/// the stream with that status in its trailers.
pub type ServedFrames = Pin<Box<dyn Stream<Item = Result<pb::Frame, Status>> + Send>>;

/// What a server does with the streams of one bidirectional method of
/// `Frame`s (`Tunnel.Data` at the agent listener, `NodeLink.Forward` at the
/// link between nodes): given the request's head (its metadata, and the
/// connection's info among the extensions) and the stream's incoming
/// frames, the frames to send back, or a refusal.
pub trait DataStreams: Send + Sync + 'static {
    /// The method's path, `/package.Service/Method`.
    const PATH: &'static str;
    /// Accepting a stream: polled by the connection's task, the response
    /// sent once it is ready.
    type Opening: Future<Output = Result<ServedFrames, Status>> + Send + 'static;

    fn open(&self, head: &http::request::Parts, inbound: InboundFrames) -> Self::Opening;
}

/// The path of `Tunnel.Data`.
pub const DATA_PATH: &str = "/postern.tunnel.v1.Tunnel/Data";
/// The path of `NodeLink.Forward`.
pub const FORWARD_PATH: &str = "/postern.tunnel.v1.NodeLink/Forward";
/// The path of `NodeLink.StopSession`.
pub const STOP_SESSION_PATH: &str = "/postern.tunnel.v1.NodeLink/StopSession";

/// How a server connection is run.
#[derive(Clone, Copy)]
pub struct ServerSettings {
    pub heartbeat: Duration,
    pub tolerance: Duration,
    /// Request headers a peer may send, in bytes.
    pub max_header_list_size: u32,
}

/// Serves one connection (TLS done) as an HTTP/2 server: the streams of
/// `D::PATH` (`Tunnel.Data`, `NodeLink.Forward`) by `data`, their outgoing
/// frames polled by this task (no hand-off per message, as on the client's
/// side), every other request by `fallback` (the control stream,
/// `StopSession`: tonic's service), also polled here.
/// `info` goes into every request's extensions. At `stop` the connection
/// is drained (GOAWAY, the streams open finish).
///
/// `io` comes boxed: a TLS stream is kilobytes, and a future holds its
/// arguments, so inline it would be held in this future (which the
/// connection's task keeps for its whole life) as the argument, as the
/// handshake's and as the connection's.
pub async fn serve_connection<T, I, D, F>(
    io: Box<T>,
    info: I,
    settings: ServerSettings,
    stop: tokio_util::sync::CancellationToken,
    data: D,
    fallback: F,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
    I: Clone + Send + Sync + 'static,
    D: DataStreams,
    F: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
{
    let cork = Cork::default();
    // The handshake in a box of its own, gone once it is done.
    let mut connection = Box::pin(
        h2::server::Builder::new()
            .initial_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_frame_size(h2_settings::MAX_FRAME_SIZE)
            .max_concurrent_streams(h2_settings::MAX_CONCURRENT_STREAMS)
            .max_header_list_size(settings.max_header_list_size)
            .handshake::<_, Body>(Corked::new(io, cork.clone())),
    )
    .await
    .map_err(io::Error::other)?;
    let mut keepalive = Keepalive::new(
        connection.ping_pong(),
        settings.heartbeat,
        settings.tolerance,
    )?;
    let mut streams: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>> =
        FuturesUnordered::new();
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut draining = false;
    drive(|cx, pass| {
        loop {
            if !draining && stopped.as_mut().poll(cx).is_ready() {
                draining = true;
                connection.graceful_shutdown();
            }
            if let Poll::Ready(failed) = keepalive.poll_failed(cx) {
                return Poll::Ready(Err(failed));
            }
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            let (request, respond) = match cork.poll(|| pass.poll(|cx| connection.poll_accept(cx)))
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(Some(Ok(accepted))) => accepted,
            };
            // Served in the next turn, with the streams.
            let (mut head, body) = request.into_parts();
            head.extensions.insert(info.clone());
            if head.uri.path() != D::PATH {
                let request = http::Request::from_parts(head, tonic::body::Body::new(H2Body(body)));
                streams.push(Box::pin(serve_fallback(fallback.clone(), request, respond)));
                continue;
            }
            let opening = data.open(&head, Box::pin(Inbound::new(body)));
            streams.push(Box::pin(serve_frames(opening, respond)));
        }
    })
    .await
}

/// Answers a stream of frames once `opening` is ready: its frames, or the
/// refusal as a trailers-only response.
async fn serve_frames(
    opening: impl Future<Output = Result<ServedFrames, Status>>,
    mut respond: h2::server::SendResponse<Body>,
) {
    match opening.await {
        Ok(outbound) => {
            let mut response = http::Response::new(());
            grpc_content_type(response.headers_mut());
            if let Ok(send) = respond.send_response(response, false) {
                let messages = outbound.map(|frame| frame.map(encode_frame));
                send_messages(messages, send, Ending::Trailers).await;
            }
        }
        Err(status) => {
            let _ = respond.send_response(status.into_http(), true);
        }
    }
}

/// Answers `request` with `service` (tonic's), its body sent on `respond`.
async fn serve_fallback<F>(
    mut service: F,
    request: http::Request<tonic::body::Body>,
    mut respond: h2::server::SendResponse<Body>,
) where
    F: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
{
    // tonic's routes are always ready; asked all the same, as a tower
    // service must be.
    let Ok(()) = poll_fn(|cx| service.poll_ready(cx)).await;
    let Ok(response) = service.call(request).await;
    let (head, body) = response.into_parts();
    if let Ok(send) = respond.send_response(http::Response::from_parts(head, ()), false) {
        send_body(body, send).await;
    }
}

/// A request body as tonic reads it: the stream's DATA frames, then its
/// trailers.
struct H2Body(h2::RecvStream);

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        match std::task::ready!(self.0.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = self.0.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => match std::task::ready!(self.0.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// Sends a response body (tonic's) on `send`: its data within the peer's
/// window, then its trailers.
async fn send_body(mut body: tonic::body::Body, mut send: h2::SendStream<Body>) {
    use http_body_util::BodyExt;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    // Room for some of it: h2 holds the rest until the
                    // window opens.
                    if !data.is_empty() && !room(&mut send, data.len()).await {
                        return;
                    }
                    if send.send_data(data.chain(Bytes::new()), false).is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
            Some(Err(_)) => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            None => {
                let _ = send.send_data(Bytes::new().chain(Bytes::new()), true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<pb::Frame> {
        vec![
            pb::Frame {
                open: Some(pb::StreamOpen {
                    endpoint_id: "ep_1".into(),
                    ..Default::default()
                }),
                data: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
                ..Default::default()
            },
            pb::Frame {
                data: Bytes::from(vec![7u8; 70_000]),
                ..Default::default()
            },
            pb::Frame {
                eof: true,
                ..Default::default()
            },
            pb::Frame {
                error: Some(crate::ErrorCode::CONNECTION_RESET.to_pb("gone")),
                ..Default::default()
            },
        ]
    }

    fn wire() -> Vec<u8> {
        let mut wire = Vec::new();
        for frame in frames() {
            let mut body = encode_frame(frame);
            wire.extend_from_slice(&body.copy_to_bytes(body.remaining()));
        }
        wire
    }

    #[test]
    fn messages_decode_as_encoded_however_the_frames_cut_them() {
        let wire = wire();
        // The same bytes as prost's own encoding, data field and all.
        let first = frames().remove(0);
        assert_eq!(&wire[5..5 + first.encoded_len()], {
            let mut other = first.clone();
            other.data = Bytes::new();
            let mut expected = other.encode_to_vec();
            expected.push(0x12);
            prost::encoding::encode_varint(first.data.len() as u64, &mut expected);
            expected.extend_from_slice(&first.data);
            expected
        });
        for cut in [1, 3, 5, 6, 4096, 65_536, wire.len()] {
            let mut deframer = Deframer::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                deframer.push(Bytes::copy_from_slice(chunk));
                while let Some(frame) = deframer.message::<pb::Frame>().unwrap() {
                    got.push(frame);
                }
            }
            assert_eq!(got, frames(), "cut every {cut} bytes");
            assert!(deframer.is_empty());
        }
    }

    #[test]
    fn a_message_whole_in_one_data_frame_is_not_copied() {
        let wire = Bytes::from(wire());
        let mut deframer = Deframer::default();
        deframer.push(wire.clone());
        deframer.message::<pb::Frame>().unwrap().unwrap();
        let bulk = deframer.message::<pb::Frame>().unwrap().unwrap();
        let range = wire.as_ptr_range();
        assert!(
            range.contains(&bulk.data.as_ptr()),
            "the data points into the DATA frame"
        );
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_it_is_buffered() {
        let mut deframer = Deframer::default();
        // Announces 4 GiB − 1 and sends three bytes of it.
        deframer.push(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
        let status = deframer.message::<pb::Frame>().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert!(
            deframer.partial.capacity() < 1024,
            "nothing reserved for it"
        );
    }

    /// A `Forward`-like method: its opening waits a turn, then refuses
    /// (with a code in the metadata) or echoes the frames and fails.
    struct Echo;

    impl DataStreams for Echo {
        const PATH: &'static str = FORWARD_PATH;
        type Opening = Pin<Box<dyn Future<Output = Result<ServedFrames, Status>> + Send>>;

        fn open(&self, head: &http::request::Parts, inbound: InboundFrames) -> Self::Opening {
            let refuse = head.headers.contains_key("refuse");
            Box::pin(async move {
                tokio::task::yield_now().await;
                if refuse {
                    let mut status = Status::unavailable("refused");
                    status.metadata_mut().insert(
                        crate::metadata::ERROR_CODE,
                        tonic::metadata::MetadataValue::from_static("3200"),
                    );
                    return Err(status);
                }
                let broke = futures_util::stream::iter([Err(Status::unavailable("it broke"))]);
                Ok(Box::pin(inbound.chain(broke)) as ServedFrames)
            })
        }
    }

    /// `StopSession` through tonic: known for session `s1` only.
    struct Stops;

    #[tonic::async_trait]
    impl pb::node_link_server::NodeLink for Stops {
        type ForwardStream = ServedFrames;

        async fn forward(
            &self,
            _request: tonic::Request<tonic::Streaming<pb::Frame>>,
        ) -> Result<tonic::Response<ServedFrames>, Status> {
            Err(Status::unimplemented("served directly"))
        }

        async fn stop_session(
            &self,
            request: tonic::Request<pb::StopSessionRequest>,
        ) -> Result<tonic::Response<pb::StopSessionResponse>, Status> {
            match request.into_inner().session_id.as_str() {
                "s1" => Ok(tonic::Response::new(pb::StopSessionResponse {})),
                id => Err(Status::not_found(format!("no session {id}"))),
            }
        }
    }

    /// The server settings of these tests.
    fn settings() -> ServerSettings {
        ServerSettings {
            heartbeat: Duration::from_secs(10),
            tolerance: Duration::from_secs(10),
            max_header_list_size: 16 * 1024,
        }
    }

    /// tonic's service behind these tests' servers: `StopSession`.
    fn routes() -> tonic::service::Routes {
        tonic::service::Routes::new(pb::node_link_server::NodeLinkServer::new(Stops))
    }

    #[test]
    fn a_connections_task_holds_the_connection_and_little_else() {
        // Every agent connection's task keeps this future for its life:
        // with the I/O inline it was 14 KB per TLS connection at the edge,
        // and the handshake's state inline adds 1.1 KB to every one.
        // An I/O as large as a TLS stream (never polled here).
        type Large = tokio::io::Join<std::io::Cursor<[u8; 8192]>, tokio::io::Sink>;
        let large: Large = tokio::io::join(std::io::Cursor::new([0; 8192]), tokio::io::sink());
        let served = serve_connection(
            Box::new(large),
            (),
            settings(),
            tokio_util::sync::CancellationToken::new(),
            Echo,
            routes(),
        );
        let size = std::mem::size_of_val(&served);
        let connection = std::mem::size_of::<h2::server::Connection<Corked<Box<Large>>, Body>>();
        assert!(
            size < connection + 1024,
            "the connection's future is {size} bytes, its h2 connection {connection}"
        );
    }

    #[tokio::test]
    async fn a_method_of_frames_is_served_directly_the_rest_by_tonic_and_a_drain_closes_the_client()
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve_connection(
            Box::new(server_io),
            (),
            settings(),
            stop.clone(),
            Echo,
            routes(),
        ));
        let ten = Duration::from_secs(10);
        let (connection, driver) = EdgeConnection::handshake(client_io, ten, ten)
            .await
            .unwrap();
        let driver = tokio::spawn(driver.linger().run());

        let refused = connection
            .open_frames(
                FORWARD_PATH,
                &[("refuse", "yes")],
                Box::pin(futures_util::stream::empty()),
            )
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
        assert_eq!(
            refused.metadata().get(crate::metadata::ERROR_CODE).unwrap(),
            "3200"
        );

        let mut inbound = connection
            .open_frames(
                FORWARD_PATH,
                &[],
                Box::pin(futures_util::stream::iter(frames())),
            )
            .await
            .unwrap();
        let mut echoed = Vec::new();
        let failed = loop {
            match inbound.next().await.expect("a status at the end") {
                Ok(frame) => echoed.push(frame),
                Err(status) => break status,
            }
        };
        assert_eq!(echoed, frames());
        assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed}");
        assert_eq!(failed.message(), "it broke");
        assert!(inbound.next().await.is_none(), "the status ends the stream");

        let stop_session = |id: &str| pb::StopSessionRequest {
            session_id: id.into(),
            ..Default::default()
        };
        let _: pb::StopSessionResponse = connection
            .unary(STOP_SESSION_PATH, &stop_session("s1"))
            .await
            .unwrap();
        let missing = connection
            .unary::<_, pb::StopSessionResponse>(STOP_SESSION_PATH, &stop_session("s2"))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
        assert_eq!(missing.message(), "no session s2");

        // The server drains: GOAWAY, so the connection takes no new stream.
        assert!(!connection.is_closed());
        stop.cancel();
        tokio::time::timeout(ten, async {
            while !connection.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("closed once the server drains");
        // Both ends then close (the server may see the client gone first).
        let _ = tokio::time::timeout(ten, server).await.unwrap().unwrap();
        drop(connection);
        let _ = tokio::time::timeout(ten, driver).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_small_messages_of_one_pass_leave_in_a_few_writes_not_one_each() {
        // h2 flushes after every DATA frame of 256 bytes or more; corked,
        // the frames of one pass leave together (crate::cork).
        use crate::cork::tests::{Log, Logged};
        const STREAMS: usize = 32;
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (client_log, server_log) = (Log::default(), Log::default());
        // Each end's writes logged on their way to the pipe.
        let logged = |io: tokio::io::DuplexStream, log: &Log| {
            let (read, write) = tokio::io::split(io);
            let log = log.clone();
            tokio::io::join(read, Logged { io: write, log })
        };
        let server_io = logged(server_io, &server_log);
        tokio::spawn(serve_connection(
            Box::new(server_io),
            (),
            settings(),
            tokio_util::sync::CancellationToken::new(),
            Echo,
            routes(),
        ));
        let ten = Duration::from_secs(10);
        let client_io = logged(client_io, &client_log);
        let (connection, driver) = EdgeConnection::handshake(client_io, ten, ten)
            .await
            .unwrap();
        tokio::spawn(driver.run());
        let message = |i: usize| pb::Frame {
            data: Bytes::from(vec![i as u8; 300]),
            ..Default::default()
        };
        let echo = |frame| {
            connection.open_frames(
                FORWARD_PATH,
                &[],
                Box::pin(futures_util::stream::iter([frame])),
            )
        };
        // One exchange first: the settings and their acknowledgements are
        // then behind.
        let mut first = echo(message(0)).await.unwrap();
        assert_eq!(first.next().await.unwrap().unwrap(), message(0));
        let writes = |log: &Log| log.writes().len();
        let (client_before, server_before) = (writes(&client_log), writes(&server_log));

        let opened = futures_util::future::join_all((0..STREAMS).map(|i| echo(message(i)))).await;
        for (i, inbound) in opened.into_iter().enumerate() {
            let echoed = inbound.unwrap().next().await.unwrap().unwrap();
            assert_eq!(echoed, message(i));
        }
        let sent = writes(&client_log) - client_before;
        let echoed = writes(&server_log) - server_before;
        assert!(
            sent < STREAMS / 4 && echoed < STREAMS / 4,
            "{STREAMS} messages left the client in {sent} writes, their echoes the server in {echoed}"
        );
    }

    #[test]
    fn a_compressed_message_is_refused() {
        let mut deframer = Deframer::default();
        deframer.push(Bytes::from_static(&[1, 0, 0, 0, 2, 0x18, 1]));
        let status = deframer.message::<pb::Frame>().unwrap_err();
        assert!(status.message().contains("compressed"), "{status}");
    }
}
