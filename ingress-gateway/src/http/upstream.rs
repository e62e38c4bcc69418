//! Upstream HTTP connections, each over a tunnel data stream of its own.
//!
//! Every HTTP/1.1 request but an upgrade is exchanged by the edge's own
//! code (`h1`) in the request's future; its stream goes back to the
//! endpoint's pool when the response's body has ended, and waits there,
//! not driven, for the next request of any visitor (a closed one is
//! noticed when it is taken out). An upgrade (a WebSocket) or a CONNECT
//! takes hyper's client, whose connection runs on a task of its own until
//! it hands the connection over. HTTP/2 upstreams multiplex every
//! visitor's requests on one connection, which runs on a task of its own.

use std::{
    net::SocketAddr,
    ops::ControlFlow,
    sync::{Arc, Mutex, Weak},
    task::{Context, Waker},
    time::{Duration, Instant},
};

use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::TokioIo;
use postern_proto::{ErrorCode, Failure, pb, tunnel_io};

use super::{
    BoxError, ProxyBody, Tracked, TunnelConn, VisitorBody, classify_client_error,
    h1::{self, ExchangeError},
};
use crate::{
    endpoint::{ClaimedStream, Endpoint, ServedBy},
    route::Pool,
};

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle upstream connections kept per pool at most.
const MAX_IDLE: usize = 256;
/// Times a request that got no response is sent, at most: on the parked
/// connection, then on new ones (another pool member's when there is one).
const ATTEMPTS: usize = 3;

/// HTTP connections to one endpoint's upstream, kept alive and reused
/// across visitors.
#[derive(Clone)]
pub struct UpstreamPool {
    inner: Arc<PoolInner>,
}

pub(super) struct PoolInner {
    connector: ConnectorInner,
    http2: bool,
    /// Idle HTTP/1.1 streams, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection all requests share while it is open.
    h2: tokio::sync::Mutex<Option<(http2::SendRequest<VisitorBody>, ServedBy)>>,
}

/// A stream whose last response has ended, and since when.
struct Idle {
    conn: TunnelConn,
    since: Instant,
}

impl UpstreamPool {
    /// `client` is the address put in each stream's `open` frame (the agent
    /// writes it into PROXY headers). Endpoints with PROXY headers therefore
    /// get one pool per visitor connection; the others share one. When the
    /// endpoint's agent is gone, a new connection comes from another
    /// endpoint of its `pool`.
    /// `(client, server)` are the visitor's and the edge's addresses;
    /// `http2`: the upstream speaks HTTP/2 (h2c on the tunnel stream).
    pub(crate) fn new(
        endpoint: Arc<Endpoint>,
        pool: Weak<Pool>,
        (client, server): (SocketAddr, SocketAddr),
        name: String,
        http2: bool,
    ) -> UpstreamPool {
        UpstreamPool {
            inner: Arc::new(PoolInner {
                connector: ConnectorInner {
                    endpoint,
                    pool,
                    client,
                    server,
                    name,
                },
                http2,
                idle: Mutex::default(),
                h2: tokio::sync::Mutex::default(),
            }),
        }
    }

    /// Whether the upstream speaks HTTP/2.
    pub(crate) fn http2(&self) -> bool {
        self.inner.http2
    }

    /// A tunnel stream of its own, outside the HTTP connections.
    pub(crate) async fn open_stream(&self) -> Result<TunnelConn, Failure> {
        self.inner.connector.connect(&[]).await
    }
}

impl PoolInner {
    /// A stream whose response has ended, kept for the next request.
    pub(super) fn park_own(&self, conn: TunnelConn) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("idle lock");
        // Oldest first: those that waited too long are at the front.
        let expired = idle.partition_point(|i| now.duration_since(i.since) >= IDLE_TIMEOUT);
        idle.drain(..expired);
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: now });
    }

    /// The most recently used idle stream that is still open. Each is
    /// looked at once to take in an end the agent sent while it waited:
    /// anything but waiting (bytes nobody asked for, an end) makes it
    /// useless. The request that takes it polls it from then on.
    fn unpark(&self) -> Option<TunnelConn> {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let Idle { mut conn, since } = self.idle.lock().expect("idle lock").pop()?;
            if since.elapsed() >= IDLE_TIMEOUT {
                // The others waited longer still.
                self.idle.lock().expect("idle lock").clear();
                return None;
            }
            if conn.io.inner_mut().poll_chunk(&mut cx).is_pending() {
                return Some(conn);
            }
        }
    }

    /// A parked stream on the first attempt, else a new one (from another
    /// pool member than those that failed, when there is one).
    async fn stream(&self, retry: &Retry) -> Result<TunnelConn, Failure> {
        match retry.failed.is_empty().then(|| self.unpark()).flatten() {
            Some(conn) => Ok(conn),
            None => self.connector.connect(&retry.avoid()).await,
        }
    }

    /// Sends a request that does not upgrade (see `h1`) on a stream of the
    /// pool, or a new one. A request that got no response is sent again
    /// as hyper's client would: one whose head never left, or an
    /// idempotent one without a body.
    async fn send_own(
        self: &Arc<Self>,
        mut req: Request<VisitorBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let sending = h1::sending(&mut req);
        let head = h1::encode_head(&req);
        let head_request = req.method() == Method::HEAD;
        let idempotent = req.method().is_idempotent() && sending == h1::Sending::Nothing;
        let mut body = Some(req.into_body());
        let mut retry = Retry::default();
        loop {
            // A retry takes a new stream: the parked ones may all have lost
            // their agent at the same moment as the first.
            let conn = self.stream(&retry).await?;
            let served = conn.served.clone();
            let (e, again) = match h1::exchange(
                conn,
                head.clone(),
                (&mut body, sending),
                head_request,
                self.clone(),
            )
            .await
            {
                Ok(response) => {
                    let mut response = response.map(BodyExt::boxed);
                    response.extensions_mut().insert(served);
                    return Ok(response);
                }
                Err(ExchangeError::Failed(failure)) => return Err(failure.into()),
                Err(ExchangeError::Unsent(e)) => (e, true),
                Err(ExchangeError::NoResponse(e)) => (e, idempotent),
            };
            if !again || retry.failed.len() + 1 >= ATTEMPTS {
                return Err(classify_client_error(&e).into());
            }
            tracing::debug!(endpoint = %served.0.id, error = %e, "request got no response; sending it again");
            retry.failed.push(served);
        }
    }

    /// Sends `req` on the HTTP/2 connection all requests share, opened
    /// when there is none. Its tasks run on `upstreams`' tracker; once the
    /// gateway drains, the pool lets go of it, and it closes when its last
    /// request is answered.
    async fn send_h2(
        self: &Arc<Self>,
        upstreams: &Upstreams,
        req: Request<VisitorBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut retry = Retry::default();
        let mut req = req;
        loop {
            let (mut sender, served) = {
                let mut shared = self.h2.lock().await;
                match shared.as_ref().filter(|(s, _)| !s.is_closed()) {
                    Some(open) => open.clone(),
                    None => {
                        let io = self.connector.connect(&retry.avoid()).await?;
                        let served = io.served.clone();
                        let (sender, conn) =
                            http2::Builder::new(Tracked(upstreams.tracker.clone()))
                                .handshake(io)
                                .await?;
                        let (pool, draining) = (Arc::downgrade(self), upstreams.draining.clone());
                        upstreams.tracker.spawn(async move {
                            let mut conn = std::pin::pin!(conn);
                            let ended = tokio::select! {
                                ended = &mut conn => ended,
                                () = draining.cancelled() => {
                                    if let Some(pool) = pool.upgrade() {
                                        pool.h2.lock().await.take();
                                    }
                                    conn.await
                                }
                            };
                            if let Err(e) = ended {
                                tracing::debug!(error = %e, "HTTP/2 upstream connection ended");
                            }
                        });
                        *shared = Some((sender.clone(), served.clone()));
                        (sender, served)
                    }
                }
            };
            let replay = replay(&req);
            match retry.settle(sender.try_send_request(req).await, served, replay) {
                ControlFlow::Break(result) => return result,
                ControlFlow::Continue(again) => req = again,
            }
        }
    }
}

/// A copy of a request's head to send it again if it gets no response:
/// kept for idempotent methods without a body (RFC 9110 section 9.2.2), the
/// requests nginx's `proxy_next_upstream` and Go's HTTP client also send
/// again. Other requests are sent again only when they never left.
fn replay(req: &Request<VisitorBody>) -> Option<Request<VisitorBody>> {
    if !req.method().is_idempotent() || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(VisitorBody::Read(Full::default()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The attempts at one request so far: the endpoints whose connections
/// failed it.
#[derive(Default)]
struct Retry {
    failed: Vec<ServedBy>,
}

impl Retry {
    /// The endpoints a new connection should come from only when no other
    /// pool member is left.
    fn avoid(&self) -> Vec<&str> {
        self.failed.iter().map(|s| s.0.id.as_str()).collect()
    }

    /// What one attempt came to: the response, marked with the endpoint
    /// that served it; or the request to send again (it never left, or
    /// `replay` holds it) while attempts remain; or the error.
    fn settle(
        &mut self,
        result: Result<Response<Incoming>, TrySendError<Request<VisitorBody>>>,
        served: ServedBy,
        replay: Option<Request<VisitorBody>>,
    ) -> ControlFlow<Result<Response<Incoming>, UpstreamError>, Request<VisitorBody>> {
        match result {
            Ok(mut response) => {
                response.extensions_mut().insert(served);
                ControlFlow::Break(Ok(response))
            }
            Err(mut e) => match e.take_message().or(replay) {
                Some(again) if self.failed.len() + 1 < ATTEMPTS => {
                    tracing::debug!(endpoint = %served.0.id, error = %e.error(), "request got no response; sending it again");
                    self.failed.push(served);
                    ControlFlow::Continue(again)
                }
                _ => ControlFlow::Break(Err(UpstreamError::Hyper(e.into_error()))),
            },
        }
    }
}

/// What the requests of one visitor connection share: the tasks that
/// run upstream connections of their own, and the gateway's drain.
#[derive(Clone)]
pub(crate) struct Upstreams {
    tracker: tokio_util::task::TaskTracker,
    /// Cancelled when the gateway drains.
    draining: tokio_util::sync::CancellationToken,
}

impl Upstreams {
    /// `tracker` runs the connections of upgrades and HTTP/2 upstream
    /// connections, which `draining` ends once idle.
    pub(crate) fn new(
        tracker: tokio_util::task::TaskTracker,
        draining: tokio_util::sync::CancellationToken,
    ) -> Upstreams {
        Upstreams { tracker, draining }
    }

    /// Sends `req` to `pool`'s upstream: on an idle stream if there is
    /// one, else on a new data stream. A request that got no response is
    /// sent again on another when hyper's client would send it again.
    pub(crate) async fn send(
        &self,
        pool: &UpstreamPool,
        req: Request<VisitorBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let pool = &pool.inner;
        if pool.http2 {
            return pool.send_h2(self, req).await.map(boxed);
        }
        if h1::suits(&req) {
            return pool.send_own(req).await;
        }
        self.send_upgrade(pool, req).await.map(boxed)
    }

    /// An upgrade (or a CONNECT) through hyper's client, on a stream of
    /// its own whose connection runs on a task of the tracker until it
    /// hands the connection over or ends.
    async fn send_upgrade(
        &self,
        pool: &Arc<PoolInner>,
        req: Request<VisitorBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut retry = Retry::default();
        let mut req = req;
        loop {
            let io = pool.stream(&retry).await?;
            let served = io.served.clone();
            let (mut sender, conn) = http1::Builder::new().handshake(io).await?;
            self.tracker.spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            let replay = replay(&req);
            match retry.settle(sender.try_send_request(req).await, served, replay) {
                ControlFlow::Break(result) => return result,
                ControlFlow::Continue(again) => req = again,
            }
        }
    }
}

/// hyper's response with the body type every response has.
fn boxed(response: Response<Incoming>) -> Response<ProxyBody> {
    response.map(|body| body.map_err(BoxError::from).boxed())
}

struct ConnectorInner {
    endpoint: Arc<Endpoint>,
    pool: Weak<Pool>,
    client: SocketAddr,
    server: SocketAddr,
    name: String,
}

impl ConnectorInner {
    /// A stream from this endpoint's agent or, when it is gone or among
    /// the `avoid`ed endpoints, another member of the pool; and the endpoint
    /// that gave it.
    async fn claim(&self, avoid: &[&str]) -> Result<(Arc<Endpoint>, ClaimedStream), Failure> {
        let pool = self.pool.upgrade();
        let member = pool.as_ref().and_then(|pool| {
            let own = pool
                .members()
                .iter()
                .find(|m| Arc::ptr_eq(&m.endpoint, &self.endpoint))
                .cloned()?;
            if avoid.contains(&own.endpoint.id.as_str()) {
                return pool.pick(avoid).or(Some(own));
            }
            Some(own)
        });
        match (pool, member) {
            (Some(pool), Some(member)) => {
                let (member, claimed) = pool.claim(member).await?;
                Ok((member.endpoint.clone(), claimed))
            }
            _ => Ok((self.endpoint.clone(), self.endpoint.source.claim().await?)),
        }
    }

    /// "Connects" to the upstream by claiming a data stream from the agent.
    async fn connect(&self, avoid: &[&str]) -> Result<TunnelConn, Failure> {
        let (endpoint, claimed) = self.claim(avoid).await?;
        let open = pb::Frame {
            open: Some(pb::StreamOpen {
                endpoint_id: endpoint.id.clone(),
                client_addr: self.client.to_string(),
                server_addr: self.server.to_string(),
                server_name: self.name.clone(),
                // A kept-alive stream outlives any one request: each
                // request carries its trace context in its headers.
                traceparent: String::new(),
            }),
            ..Default::default()
        };
        let (io, frames) = tunnel_io(claimed.inbound, vec![open]);
        claimed.attach.send(Box::pin(frames)).map_err(|_| {
            Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent's data stream closed",
            )
        })?;
        Ok(TunnelConn {
            io: TokioIo::new(io),
            served: ServedBy(endpoint),
            _permit: claimed.permit,
        })
    }
}

/// Why a request got no response from the upstream.
pub(crate) enum UpstreamError {
    /// No data stream (the agent is gone, at its limit, ...).
    Stream(Failure),
    /// The HTTP exchange on the stream failed.
    Hyper(hyper::Error),
}

impl From<Failure> for UpstreamError {
    fn from(failure: Failure) -> Self {
        UpstreamError::Stream(failure)
    }
}

impl From<hyper::Error> for UpstreamError {
    fn from(e: hyper::Error) -> Self {
        UpstreamError::Hyper(e)
    }
}

/// A request target: the origin form HTTP/1.1 sends (`/path?query`), or the
/// absolute form HTTP/2 takes `:scheme` and `:authority` from.
pub(super) fn request_target(path_and_query: &str) -> Result<Uri, Failure> {
    path_and_query
        .parse()
        .map_err(|_| Failure::new(ErrorCode::BAD_HOST, "the request target is invalid"))
}
