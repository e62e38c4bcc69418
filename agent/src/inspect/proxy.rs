//! HTTP on an inspected tunnel's data stream. The edge speaks HTTP/1.1 on
//! the stream, or HTTP/2 (h2c with prior knowledge) for tunnels with
//! `upstream_protocol: http2`; the agent serves either with hyper and
//! forwards each request over one upstream connection per stream (dialled
//! with the stream's PROXY header, as the byte pipe would) in the same
//! protocol, so a stream is still exactly one upstream connection. On
//! HTTP/2 the stream's requests run side by side on that connection, each
//! body (a gRPC stream too) passing frame by frame. WebSocket and other
//! HTTP/1.1 upgrades are spliced through after the 101. Replays go the same
//! way, from the agent to the upstream.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Incoming},
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{rt::TokioIo, server::conn::auto};
use postern_net::{Hooked, IoHook};
use postern_proto::{ErrorCode, Failure, TunnelIo, pb};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    BODY_CAPTURE_LIMIT,
    store::{
        BodyState, Captured, CapturedBody, Captures, Headers, Key, RequestHead, ResponseCapture,
        owned,
    },
    tee::Tee,
};
use crate::{
    forward::{Io, Target, dial},
    state::{ConnGuard, TunnelMetrics},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bodies toward the upstream and back toward the edge.
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// One claimed data stream of an inspected tunnel.
pub(crate) struct Stream {
    pub target: Arc<Target>,
    pub captures: Arc<Captures>,
    pub open: pb::StreamOpen,
    /// The session's tasks: the upstream connection and upgraded splices.
    pub tracker: TaskTracker,
    /// Counts the stream as open for as long as anything uses it (held
    /// for its `Drop`).
    pub _conn: ConnGuard,
}

/// The sending half of an upstream connection.
enum Sender {
    /// One request at a time.
    Http1(tokio::sync::Mutex<http1::SendRequest<ProxyBody>>),
    /// Requests side by side, each on its own HTTP/2 stream.
    Http2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    async fn send(&self, req: Request<ProxyBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(req).await
            }
            Sender::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(req).await
            }
        }
    }

    /// Whether the connection is gone after a request failed: always on
    /// HTTP/1.1; on HTTP/2 a failure may be the request's stream alone (a
    /// reset, a cancelled gRPC call).
    fn closed(&self) -> bool {
        match self {
            Sender::Http1(_) => true,
            Sender::Http2(sender) => sender.is_closed(),
        }
    }
}

/// The upstream connection's task: it ends when the upstream closes the
/// connection or every `Sender` is dropped.
type Connection = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// HTTP/1.1 or, when `http2`, HTTP/2 over a dialled upstream.
async fn handshake(
    upstream: Box<dyn Io>,
    http2: bool,
    tracker: &TaskTracker,
) -> Result<(Sender, Connection), Failure> {
    let io = TokioIo::new(upstream);
    let failed = |e: hyper::Error| Failure::new(ErrorCode::UPSTREAM_DIAL_FAILED, e.to_string());
    if http2 {
        let (sender, conn) = http2::Builder::new(OnTracker(tracker.clone()))
            .handshake(io)
            .await
            .map_err(failed)?;
        Ok((Sender::Http2(sender), Box::pin(conn)))
    } else {
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(failed)?;
        let sender = Sender::Http1(tokio::sync::Mutex::new(sender));
        Ok((sender, Box::pin(conn.with_upgrades())))
    }
}

/// Runs hyper's HTTP/2 tasks (each request, each body pump) on the
/// session's tracker, so that they have an owner that joins them.
#[derive(Clone)]
struct OnTracker(TaskTracker);

impl<F> hyper::rt::Executor<F> for OnTracker
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// What the requests of one stream share.
struct Shared {
    stream: Stream,
    sender: Sender,
    /// An upgrade is under way: the upstream connection ending is expected.
    upgrading: Arc<AtomicBool>,
    /// The upstream connection is gone: stop serving the stream.
    upstream_closed: CancellationToken,
}

/// Serves HTTP on `visitor` (the data stream; HTTP/1.1, or HTTP/2 as the
/// edge's preface says) until the edge or the upstream closes it.
pub(crate) async fn serve(
    stream: Stream,
    visitor: Visitor,
    upstream: Box<dyn Io>,
) -> Result<(), Failure> {
    let tracker = stream.tracker.clone();
    let (sender, conn) = handshake(upstream, stream.target.spec.upstream.http2, &tracker).await?;
    let shared = Arc::new(Shared {
        sender,
        upgrading: Arc::default(),
        upstream_closed: CancellationToken::new(),
        stream,
    });
    // The upstream connection is driven by this task, beside the visitor's
    // (no hand-off to another task per request). It ends when the upstream
    // closes it, or once the sender is dropped with the service; it must
    // not hold the sender itself.
    let upgrading = shared.upgrading.clone();
    let shared_upgrading = upgrading.clone();
    let upstream_closed = shared.upstream_closed.clone();
    let upstream = async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection failed");
        }
        if !upgrading.load(Ordering::Acquire) {
            upstream_closed.cancel();
        }
    };
    let visitor = StreamIo {
        inner: Some(Hooked::new(
            visitor,
            Counting(shared.stream.target.metrics.clone()),
        )),
        tracker: shared.stream.tracker.clone(),
    };
    let closed = shared.upstream_closed.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.handle(req).await) }
    });
    // Only the upstream's headers go back: no Date of the agent's own.
    let mut builder = auto::Builder::new(OnTracker(tracker));
    builder.http1().auto_date_header(false);
    builder.http2().auto_date_header(false);
    let server = builder.serve_connection_with_upgrades(TokioIo::new(visitor), service);
    let closed = closed.cancelled();
    tokio::pin!(server, upstream, closed);
    let (mut upstream_done, mut closing) = (false, false);
    // The two connections wake each other (a request handed over, its
    // response handed back), and so this task: `drive` serves such a wake
    // in the same turn instead of rescheduling the task.
    let result = postern_proto::drive::drive(|_, pass| {
        pass.poll(|cx| {
            let mut poll_upstream = |cx: &mut Context<'_>| {
                if !upstream_done && upstream.as_mut().poll(cx).is_ready() {
                    upstream_done = true;
                }
            };
            poll_upstream(cx);
            if !closing && closed.as_mut().poll(cx).is_ready() {
                closing = true;
                server.as_mut().graceful_shutdown();
            }
            let served = server.as_mut().poll(cx);
            poll_upstream(cx);
            served
        })
    })
    .await;
    // An upgraded upstream connection is handed to the upgrade's task
    // when its connection future completes.
    if !upstream_done && shared_upgrading.load(Ordering::Acquire) {
        upstream.await;
    }
    result.map_err(|e| Failure::new(ErrorCode::CONNECTION_RESET, e.to_string()))
}

impl Shared {
    /// One request, in a span under the request's `traceparent` (the
    /// edge's span when the edge traces), ended when the response head is
    /// back.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let span = tracing::info_span!(
            "request",
            otel.kind = "server",
            http.request.method = %req.method(),
            http.response.status_code = tracing::field::Empty,
        );
        postern_telemetry::continue_trace(&span, req.headers());
        let response = self.forward(req, &span).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    }

    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        span: &tracing::Span,
    ) -> Response<ProxyBody> {
        let stream = &self.stream;
        stream.target.metrics.add_request();
        let upgrade = is_upgrade(req.version(), req.headers());
        let visitor_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let remote_addr = remote_addr(forwarded_for(&parts.headers), &stream.open.client_addr);
        let capture = Capture::begin(
            stream.captures.clone(),
            &stream.target.spec.name,
            remote_addr,
            &stream.open,
            head_of(&parts),
            None,
        );
        // Captured as the edge sent it; the upstream's parent is this span.
        postern_telemetry::inject_trace(span, &mut parts.headers);
        let req = Request::from_parts(parts, capture.tee_request(body));
        if upgrade {
            self.upgrading.store(true, Ordering::Release);
        }
        let mut response = match self.sender.send(req).await {
            Ok(response) => response,
            Err(e) => {
                let failure = Failure::new(
                    ErrorCode::UPSTREAM_INVALID_RESPONSE,
                    format!("{}: {e}", stream.target.spec.upstream),
                );
                capture.failed(failure.to_string());
                if self.sender.closed() {
                    self.upstream_closed.cancel();
                }
                return bad_gateway(&failure);
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(visitor_upgrade) = visitor_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let (parts, _) = response.into_parts();
            capture.response_of(&parts, true);
            let keep = self.clone();
            self.stream.tracker.spawn(async move {
                match tokio::try_join!(visitor_upgrade, upstream_upgrade) {
                    Ok((visitor, upstream)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(visitor),
                            &mut TokioIo::new(upstream),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
                drop(keep);
            });
            return Response::from_parts(parts, empty());
        }
        self.upgrading.store(false, Ordering::Release);
        let (parts, body) = response.into_parts();
        capture.response_of(&parts, false);
        Response::from_parts(parts, capture.tee_response(body))
    }
}

/// A request to send again, as captured or edited.
pub(crate) struct Replay {
    pub method: Method,
    /// Path and query.
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The capture replayed; its addresses go in PROXY headers.
    pub of: Captured,
}

/// Sends a request to `target`'s upstream from the agent, capturing it as a
/// new request; returns the new capture's id once the upstream answered
/// (`None` if the store already let it go).
/// The response body is read to its end in the background (on `tracker`,
/// until `shutdown`). An HTTP/2 upstream gets the request as HTTP/2, its
/// Host as `:authority` and `te: trailers` kept, so a gRPC call replays
/// as one request carrying the captured messages.
pub(crate) async fn replay(
    target: Arc<Target>,
    captures: Arc<Captures>,
    replay: Replay,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Option<String>, Failure> {
    let open = pb::StreamOpen {
        client_addr: replay.of.client_addr.clone(),
        server_addr: replay.of.server_addr.clone(),
        ..Default::default()
    };
    let upstream = dial(&target, &open).await?;
    let http2 = target.spec.upstream.http2;
    let (sender, conn) = handshake(upstream.boxed(), http2, tracker).await?;
    tracker.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "replay connection failed");
        }
    });
    let mut headers = replay.headers;
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        header::CONNECTION,
        header::UPGRADE,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::CONTENT_LENGTH,
        http::HeaderName::from_static("keep-alive"),
    ] {
        headers.remove(name);
    }
    if !replay.body.is_empty() || replay.method == Method::POST || replay.method == Method::PUT {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(replay.body.len()));
    }
    let mut uri = replay.uri;
    if http2 {
        let host = match headers.remove(header::HOST) {
            Some(host) => String::from_utf8_lossy(host.as_bytes()).into_owned(),
            None => format!(
                "{}:{}",
                target.spec.upstream.host, target.spec.upstream.port
            ),
        };
        uri = format!("http://{host}{uri}").parse().map_err(|_| {
            Failure::new(
                ErrorCode::BAD_HOST,
                format!("the Host header {host:?} is not a valid :authority for HTTP/2"),
            )
        })?;
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    let mut req = Request::new(());
    *req.method_mut() = replay.method;
    *req.uri_mut() = uri;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    let (parts, ()) = req.into_parts();
    let capture = Capture::begin(
        captures,
        &target.spec.name,
        replay.of.remote_addr.clone(),
        &open,
        head_of(&parts),
        Some(replay.of.id.clone()),
    );
    let body = capture.tee_request(Full::new(replay.body));
    let response = match sender.send(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(e) => {
            let failure = Failure::new(
                ErrorCode::UPSTREAM_INVALID_RESPONSE,
                format!("{}: {e}", target.spec.upstream),
            );
            capture.failed(failure.to_string());
            return Err(failure);
        }
    };
    let (parts, body) = response.into_parts();
    capture.response_of(&parts, false);
    let id = capture.id();
    let mut body = capture.tee_response(body);
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        tokio::select! {
            _ = drain => {}
            _ = shutdown.cancelled() => {}
        }
        drop(sender);
    });
    Ok(id)
}

/// One request's entry in the store, filled in as the exchange goes.
pub(super) struct Capture {
    captures: Arc<Captures>,
    key: Key,
    started: Instant,
}

impl Capture {
    pub(super) fn begin(
        captures: Arc<Captures>,
        tunnel_name: &str,
        remote_addr: String,
        open: &pb::StreamOpen,
        request: RequestHead,
        replay_of: Option<String>,
    ) -> Capture {
        let key = captures.insert(Captured {
            id: postern_net::random_id("airt_"),
            tunnel_name: tunnel_name.to_string(),
            remote_addr,
            client_addr: open.client_addr.clone(),
            server_addr: open.server_addr.clone(),
            start: SystemTime::now(),
            duration: None,
            request,
            request_body: CapturedBody::default(),
            response: None,
            error: None,
            replay_of,
        });
        Capture {
            captures,
            key,
            started: Instant::now(),
        }
    }

    /// The capture's id, unless the store has already let it go.
    fn id(&self) -> Option<String> {
        self.captures.id(self.key)
    }

    fn tee_request<B>(&self, body: B) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + std::fmt::Display,
    {
        Tee::new(body, BODY_CAPTURE_LIMIT, self.request_body_done())
            .map_err(Into::into)
            .boxed_unsync()
    }

    /// Stores the request body once it ended.
    pub(super) fn request_body_done(&self) -> impl FnOnce(CapturedBody) + Send + 'static {
        let (captures, key) = (self.captures.clone(), self.key);
        move |body| captures.update(key, |c| c.request_body = body)
    }

    /// Records the response head (`headers` owned, see [`owned`]); an
    /// upgrade is complete at once, its body empty (what follows is not
    /// HTTP).
    pub(super) fn response(
        &self,
        status: StatusCode,
        version: Version,
        headers: Headers,
        upgraded: bool,
    ) {
        let elapsed = self.started.elapsed();
        self.captures.update(self.key, |c| {
            let state = if upgraded {
                BodyState::Complete
            } else {
                BodyState::Streaming
            };
            c.response = Some(ResponseCapture {
                status,
                version,
                headers,
                body: CapturedBody {
                    state,
                    ..CapturedBody::default()
                },
            });
            if upgraded {
                c.duration = Some(elapsed);
            }
        });
    }

    /// Records the response head of `parts`.
    fn response_of(&self, parts: &http::response::Parts, upgraded: bool) {
        let headers = owned(&parts.headers).into();
        self.response(parts.status, parts.version, headers, upgraded);
    }

    fn tee_response(&self, body: Incoming) -> ProxyBody {
        Tee::new(body, BODY_CAPTURE_LIMIT, self.response_body_done())
            .map_err(Into::into)
            .boxed_unsync()
    }

    /// Stores the response body once it ended, and so the duration.
    pub(super) fn response_body_done(&self) -> impl FnOnce(CapturedBody) + Send + 'static {
        let (captures, key, started) = (self.captures.clone(), self.key, self.started);
        move |body| {
            let elapsed = started.elapsed();
            captures.update(key, |c| {
                c.duration = Some(elapsed);
                if let Some(response) = &mut c.response {
                    response.body = body;
                }
            });
        }
    }

    pub(super) fn failed(&self, error: String) {
        let elapsed = self.started.elapsed();
        self.captures.update(self.key, |c| {
            c.duration = Some(elapsed);
            c.error = Some(error);
        });
    }
}

/// The request as captured. HTTP/2 names the host in `:authority`; the
/// capture shows it as `Host`, which is also where a replay takes it from.
fn head_of(parts: &http::request::Parts) -> RequestHead {
    let mut headers = owned(&parts.headers);
    if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    RequestHead {
        method: parts.method.clone(),
        uri: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        version: parts.version,
        headers: headers.into(),
    }
}

/// A message's header values by name (lower case): of a map (the
/// proxy's), or of a head as httparse read it (the tap's, which builds no
/// map for the few it reads).
pub(super) trait HeaderValues {
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]>;

    /// The values that are [`text`].
    fn texts<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a str> {
        self.values(name).filter_map(text)
    }
}

/// A header value as text, if it is visible ASCII (as `HeaderValue::to_str`).
pub(super) fn text(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

impl HeaderValues for HeaderMap {
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

impl HeaderValues for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// The last `X-Forwarded-For` entry, which the edge appends.
pub(super) fn forwarded_for(headers: &(impl HeaderValues + ?Sized)) -> Option<String> {
    headers
        .texts("x-forwarded-for")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .last()
        .map(str::to_string)
}

/// The visitor's IP: its [`forwarded_for`] entry; else the stream's
/// client address (the visitor that opened a pooled stream, not
/// necessarily this request's).
pub(super) fn remote_addr(forwarded_for: Option<String>, client_addr: &str) -> String {
    forwarded_for.unwrap_or_else(|| {
        client_addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| client_addr.to_string())
    })
}

/// Whether a request asks to switch protocols (WebSocket and the like).
pub(super) fn is_upgrade(version: Version, headers: &(impl HeaderValues + ?Sized)) -> bool {
    version == Version::HTTP_11
        && headers.values("upgrade").next().is_some()
        && headers
            .texts("connection")
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// What the edge gets when the upstream connection fails mid-request.
fn bad_gateway(failure: &Failure) -> Response<ProxyBody> {
    let body = format!("502 Bad Gateway\n{failure}\n");
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// How long a finished stream waits for the edge to end its side.
const LINGER: Duration = Duration::from_secs(5);

type Visitor = TunnelIo<postern_proto::InboundFrames>;

/// The data stream as hyper's IO: counts its bytes into the tunnel's
/// metrics as they move, and when dropped (hyper is done with it) keeps the
/// stream until the edge has ended its side too. Dropping it at once would
/// reset the stream and could lose the last frames, the response's end
/// among them (the edge's pooled client reads to the eof).
struct StreamIo {
    /// `None` only once dropped.
    inner: Option<Hooked<Visitor, Counting>>,
    tracker: TaskTracker,
}

/// Counts a stream's bytes into its tunnel's metrics.
struct Counting(Arc<TunnelMetrics>);

impl IoHook<Visitor> for Counting {
    fn read(&self, _io: &Visitor, bytes: &[u8]) {
        self.0.add_bytes(bytes.len() as u64, 0);
    }

    fn wrote(&self, _io: &Visitor, bytes: &[u8]) {
        self.0.add_bytes(0, bytes.len() as u64);
    }
}

impl StreamIo {
    fn io(&mut self) -> Pin<&mut Hooked<Visitor, Counting>> {
        Pin::new(self.inner.as_mut().expect("used before drop"))
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        if let Some(mut io) = self.inner.take() {
            self.tracker.spawn(async move {
                let mut buf = [0u8; 4096];
                let drained = async {
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(LINGER, drained).await;
            });
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_visitor_is_the_last_forwarded_for_entry() {
        let mut h = HeaderMap::new();
        assert_eq!(
            remote_addr(forwarded_for(&h), "198.51.100.2:4431"),
            "198.51.100.2"
        );
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 127.0.0.1"),
        );
        assert_eq!(
            remote_addr(forwarded_for(&h), "198.51.100.2:4431"),
            "127.0.0.1"
        );
    }

    #[test]
    fn a_parsed_head_reads_as_its_map_does() {
        let head = b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
            X-Forwarded-For: 203.0.113.9\r\nx-forwarded-for: 127.0.0.1, \r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head).unwrap().is_complete());
        let parsed = &*req.headers;
        let mut map = HeaderMap::new();
        for h in parsed {
            map.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        assert!(is_upgrade(Version::HTTP_11, parsed));
        assert!(is_upgrade(Version::HTTP_11, &map));
        assert_eq!(forwarded_for(parsed).as_deref(), Some("127.0.0.1"));
        assert_eq!(forwarded_for(&map).as_deref(), Some("127.0.0.1"));
        assert_eq!(text(b"caf\xc3\xa9"), None, "not visible ASCII");
    }

    #[test]
    fn upgrades_need_the_connection_token() {
        let req = |conn: &str| {
            Request::builder()
                .header("upgrade", "websocket")
                .header("connection", conn)
                .body(())
                .unwrap()
        };
        let upgrade = |conn: &str| {
            let req = req(conn);
            is_upgrade(req.version(), req.headers())
        };
        assert!(upgrade("keep-alive, Upgrade"));
        assert!(!upgrade("keep-alive"));
    }
}
