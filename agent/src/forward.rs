//! The agent's data path: open a data stream, wait for the edge to claim it,
//! dial the upstream (PROXY header, TLS), and pipe bytes both ways. With
//! `terminate_at: agent`, TLS from the visitor ends here first. HTTP tunnels
//! with `inspect` are parsed beside the byte pipe, or go through the
//! inspector's proxy where a copy of the bytes is not enough.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use postern_net::proxy_header;
use postern_proto::{
    BoxFrames, ErrorCode, Failure, InboundFrames, attachable, direct::EdgeConnection, metadata, pb,
    pipe, tunnel_io,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{
    config::{MutualTlsCas, TerminateAt, TunnelSpec},
    error::TlsSetupError,
    inspect::{Captures, Tap, Watch},
    resolve::UpstreamAddrs,
    state::TunnelMetrics,
    tls::{agent_server_config, upstream_client_config},
};

/// How long dialling the upstream may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel, ready to serve streams.
pub struct Target {
    pub spec: TunnelSpec,
    pub metrics: Arc<TunnelMetrics>,
    /// Where requests are captured: set for HTTP tunnels with `inspect`
    /// while inspection is on.
    pub captures: Option<Arc<Captures>>,
    agent_tls: Option<TlsAcceptor>,
    upstream_tls: Option<TlsConnector>,
    /// The upstream's addresses, kept across dials.
    addrs: UpstreamAddrs,
}

impl Target {
    /// `captures` is the inspector's store, used when `spec.inspect`.
    pub fn new(
        spec: TunnelSpec,
        captures: Option<&Arc<Captures>>,
    ) -> Result<Target, TlsSetupError> {
        let agent_tls = match (&spec.terminate_at, &spec.crt_key) {
            (Some(TerminateAt::Agent), Some((crt, key))) => {
                let cas = match &spec.mutual_tls_cas {
                    Some(MutualTlsCas::Pem(pem)) => Some(pem.as_slice()),
                    _ => None,
                };
                Some(TlsAcceptor::from(agent_server_config(crt, key, cas)?))
            }
            _ => None,
        };
        let upstream_tls = if spec.upstream.tls {
            let mut config = upstream_client_config(spec.upstream.verify, &spec.upstream_tls)?;
            if spec.upstream.http2 {
                // The edge speaks HTTP/2 on the stream; the upstream must too.
                Arc::make_mut(&mut config).alpn_protocols = vec![b"h2".to_vec()];
            }
            Some(TlsConnector::from(config))
        } else {
            None
        };
        Ok(Target {
            agent_tls,
            upstream_tls,
            addrs: UpstreamAddrs::new(&spec.upstream.host, spec.upstream.port),
            metrics: Arc::default(),
            captures: captures.filter(|_| spec.inspect).cloned(),
            spec,
        })
    }
}

/// Bound endpoints by id.
#[derive(Default)]
pub struct Routes {
    targets: RwLock<HashMap<String, Arc<Target>>>,
}

impl Routes {
    pub fn insert(&self, endpoint_id: String, target: Arc<Target>) {
        self.targets
            .write()
            .expect("routes lock")
            .insert(endpoint_id, target);
    }

    /// The target of an endpoint that was bound.
    pub fn remove(&self, endpoint_id: &str) -> Option<Arc<Target>> {
        self.targets
            .write()
            .expect("routes lock")
            .remove(endpoint_id)
    }

    fn get(&self, endpoint_id: &str) -> Option<Arc<Target>> {
        self.targets
            .read()
            .expect("routes lock")
            .get(endpoint_id)
            .cloned()
    }
}

/// What a stream task needs.
pub struct StreamContext {
    pub channels: Channels,
    /// Both valid header values (checked when the edge sent them).
    pub session_id: String,
    pub stream_token: String,
    pub routes: Arc<Routes>,
    pub tracker: TaskTracker,
}

/// The session's connections to the edge, which data streams take in
/// turn: the control stream's (id 0) and those opened for data streams.
/// One the edge refuses (behind a load balancer it reached another node),
/// or that broke, leaves the rotation.
pub struct Channels {
    clients: std::sync::Mutex<Vec<(usize, EdgeConnection)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Channels {
    pub fn new(control: EdgeConnection) -> Channels {
        Channels {
            clients: std::sync::Mutex::new(vec![(0, control)]),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Adds the connection `id` (not 0) to the rotation.
    pub fn add(&self, id: usize, client: EdgeConnection) {
        self.clients
            .lock()
            .expect("channels lock")
            .push((id, client));
    }

    /// How many connections are in the rotation.
    pub fn len(&self) -> usize {
        self.clients.lock().expect("channels lock").len()
    }

    /// The connection for the next data stream.
    fn next(&self) -> (usize, EdgeConnection) {
        let clients = self.clients.lock().expect("channels lock");
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        clients[n % clients.len()].clone()
    }

    /// Takes connection `id` out of the rotation; false for the control
    /// stream's, which stays.
    pub fn remove(&self, id: usize) -> bool {
        if id == 0 {
            return false;
        }
        self.clients
            .lock()
            .expect("channels lock")
            .retain(|(i, _)| *i != id);
        true
    }
}

/// Opens a data stream as a tracked task. A pooled stream opens its own
/// replacement as soon as the edge claims it.
pub fn spawn_stream(ctx: Arc<StreamContext>, pooled: bool) {
    spawn_stream_on(ctx, pooled, None);
}

/// Opens a pooled stream on the connection `id`, just dialled again: the
/// edge counts a connection as the session's (and cuts it with the
/// session) once a data stream comes on it, and the streams that replace
/// claimed ones may not come on it for a long while (an HTTP endpoint's
/// upstream connections are kept alive). The edge closes the stream when
/// its pool is full; the connection has joined all the same.
pub fn join_connection(ctx: Arc<StreamContext>, id: usize, connection: EdgeConnection) {
    spawn_stream_on(ctx, true, Some((id, connection)));
}

fn spawn_stream_on(ctx: Arc<StreamContext>, pooled: bool, on: Option<(usize, EdgeConnection)>) {
    let tracker = ctx.tracker.clone();
    tracker.spawn(async move {
        if let Err(e) = serve_stream(&ctx, pooled, on).await {
            tracing::debug!(error = %e, "data stream ended with an error");
        }
    });
}

async fn serve_stream(
    ctx: &Arc<StreamContext>,
    pooled: bool,
    on: Option<(usize, EdgeConnection)>,
) -> Result<(), Failure> {
    let (attach_tx, frames) = attachable();
    let (channel, connection) = on.unwrap_or_else(|| ctx.channels.next());
    let metadata = [
        (metadata::SESSION, ctx.session_id.as_str()),
        (metadata::STREAM_TOKEN, ctx.stream_token.as_str()),
    ];
    let opened = connection.open_data(&metadata, Box::pin(frames)).await;
    let mut inbound = match opened {
        Ok(inbound) => inbound,
        Err(status) => {
            // A refusal on an extra connection, or a broken one: it leaves
            // the rotation (a broken one comes back when dialled again).
            let refused = matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::ResourceExhausted
            );
            if (refused || channel != 0) && ctx.channels.remove(channel) {
                tracing::warn!(
                    connection = channel,
                    error = status.message(),
                    "the edge refused a data stream on an extra connection (it reached another node, the session has its most connections, or the connection broke); the session goes on without it"
                );
                spawn_stream(ctx.clone(), pooled);
            }
            return Err(Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                status.message().to_string(),
            ));
        }
    };
    let first = match inbound.next().await {
        Some(Ok(frame)) => frame,
        // Ended unclaimed (pool trimmed, session over): nothing to do.
        None => return Ok(()),
        // Broken with its connection: a pooled one is replaced (on another
        // connection, or this one once it is back).
        Some(Err(_)) => {
            if pooled {
                spawn_stream(ctx.clone(), true);
            }
            return Ok(());
        }
    };
    if pooled {
        spawn_stream(ctx.clone(), true);
    }
    let Some(open) = first.open else {
        let failure = Failure::new(
            ErrorCode::PROTOCOL_VIOLATION,
            "the first frame must open the stream",
        );
        return Err(refuse(attach_tx, inbound, failure).await);
    };
    let Some(target) = ctx.routes.get(&open.endpoint_id) else {
        let failure = Failure::new(ErrorCode::UNKNOWN_ENDPOINT, open.endpoint_id);
        return Err(refuse(attach_tx, inbound, failure).await);
    };
    // One span per visitor connection, under the edge's when it sent one.
    let span = tracing::info_span!(
        parent: None,
        "stream",
        otel.kind = "server",
        tunnel = %target.spec.name,
        proto = ?target.spec.proto,
        endpoint.id = %open.endpoint_id,
        client.addr = %open.client_addr,
    );
    postern_telemetry::continue_traceparent(&span, &open.traceparent);
    serve_open(ctx, target, open, first.data, inbound, attach_tx)
        .instrument(span)
        .await
}

/// Serves a stream the edge opened for `target`.
async fn serve_open(
    ctx: &Arc<StreamContext>,
    target: Arc<Target>,
    open: pb::StreamOpen,
    first: Bytes,
    inbound: InboundFrames,
    attach_tx: oneshot::Sender<BoxFrames>,
) -> Result<(), Failure> {
    let conn = target.metrics.open_conn();
    let upstream = match dial(&target, &open).await {
        Ok(upstream) => upstream,
        Err(failure) => {
            tracing::warn!(tunnel = %target.spec.name, upstream = %target.spec.upstream, error = %failure.detail, "upstream unreachable");
            return Err(refuse(attach_tx, inbound, failure).await);
        }
    };
    // HTTP/1.1 is inspected beside the pipe; see `crate::inspect`.
    let beside_pipe = !target.spec.upstream.http2
        && target.agent_tls.is_none()
        && tracing::Span::current().is_disabled();
    let tap = match &target.captures {
        Some(captures) if beside_pipe => Some(Tap::new(
            captures.clone(),
            &target.spec.name,
            &open,
            target.metrics.clone(),
        )),
        _ => None,
    };
    if let Some(captures) = target.captures.as_ref().filter(|_| tap.is_none()) {
        let (mut io, frames) = tunnel_io(inbound, Vec::new());
        io.prepend(first);
        if attach_tx.send(Box::pin(frames)).is_err() {
            return Err(Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the data stream closed",
            ));
        }
        let stream = crate::inspect::Stream {
            target: target.clone(),
            captures: captures.clone(),
            open,
            tracker: ctx.tracker.clone(),
            _conn: conn,
        };
        return crate::inspect::serve(stream, io, upstream.boxed()).await;
    }
    let metrics = &target.metrics;
    match &target.agent_tls {
        None => match upstream {
            Upstream::Plain(tcp) => {
                let (r, w) = Watch::halves(tcp.into_split(), metrics, tap);
                splice(r, w, inbound, first, attach_tx).await
            }
            Upstream::Tls(tls) => {
                let (r, w) = Watch::halves(tokio::io::split(*tls), metrics, tap);
                splice(r, w, inbound, first, attach_tx).await
            }
        },
        Some(acceptor) => {
            let (mut io, frames) = tunnel_io(inbound, Vec::new());
            io.prepend(first);
            let _ = attach_tx.send(Box::pin(frames));
            let mut visitor = acceptor
                .accept(io)
                .await
                .map_err(|e| Failure::new(ErrorCode::TLS_HANDSHAKE, e.to_string()))?;
            let result = match upstream {
                Upstream::Plain(mut tcp) => {
                    tokio::io::copy_bidirectional(&mut visitor, &mut tcp).await
                }
                Upstream::Tls(mut tls) => {
                    tokio::io::copy_bidirectional(&mut visitor, &mut *tls).await
                }
            };
            result
                .map(|(to_upstream, to_visitor)| metrics.add_bytes(to_upstream, to_visitor))
                .map_err(|e| Failure::new(ErrorCode::CONNECTION_RESET, e.to_string()))
        }
    }
}

/// Tells the edge why this stream cannot be served, then keeps the stream
/// until the edge ends it: dropping it at once would reset the stream and
/// lose the error frame.
async fn refuse(
    attach: oneshot::Sender<BoxFrames>,
    mut inbound: InboundFrames,
    failure: Failure,
) -> Failure {
    let frame = pb::Frame {
        error: Some(failure.to_pb()),
        ..Default::default()
    };
    let _ = attach.send(Box::pin(futures_util::stream::iter([frame])));
    let drained = async { while let Some(Ok(_)) = inbound.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
    failure
}

/// Pipes a dialled upstream and the data stream, after writing the bytes
/// that came with the `open` frame. The upstream's halves count the bytes
/// ([`Watch`]).
async fn splice<R, W>(
    reader: R,
    mut writer: W,
    inbound: InboundFrames,
    first: Bytes,
    attach: oneshot::Sender<BoxFrames>,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: postern_proto::LocalWrite,
{
    if !first.is_empty() {
        writer
            .write_all(&first)
            .await
            .map_err(|e| Failure::new(ErrorCode::CONNECTION_RESET, e.to_string()))?;
    }
    let (outbound, pump) = pipe(reader, writer, inbound, Vec::new());
    if attach.send(Box::pin(outbound)).is_err() {
        return Err(Failure::new(
            ErrorCode::AGENT_FORWARD_FAILED,
            "the data stream closed",
        ));
    }
    let outcome = pump.run().await;
    tracing::debug!(?outcome, "stream finished");
    Ok(())
}

/// A connection to an upstream, plain or TLS.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A byte stream of any kind, for code that does not care which.
pub(crate) use crate::proxy::Io;

impl Upstream {
    pub(crate) fn boxed(self) -> Box<dyn Io> {
        match self {
            Upstream::Plain(tcp) => Box::new(tcp),
            Upstream::Tls(tls) => tls,
        }
    }
}

/// Dials a tunnel's upstream; `open` gives the PROXY header's addresses.
pub(crate) async fn dial(target: &Target, open: &pb::StreamOpen) -> Result<Upstream, Failure> {
    let upstream = &target.spec.upstream;
    let fail = |detail: String| {
        Failure::new(
            ErrorCode::UPSTREAM_DIAL_FAILED,
            format!("{upstream}: {detail}"),
        )
    };
    let mut tcp = match tokio::time::timeout(DIAL_TIMEOUT, target.addrs.connect()).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => {
            target.addrs.forget();
            return Err(fail(format!("no connection within {DIAL_TIMEOUT:?}")));
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Some(version) = target.spec.proxy_proto {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let client = open.client_addr.parse().unwrap_or(unspecified);
        let server = open.server_addr.parse().unwrap_or(unspecified);
        let header = proxy_header::encode(version, client, server);
        tcp.write_all(&header)
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    let Some(connector) = &target.upstream_tls else {
        return Ok(Upstream::Plain(tcp));
    };
    let name = ServerName::try_from(upstream.host.clone()).map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(DIAL_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(Upstream::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(fail(format!("TLS: {e}"))),
        Err(_) => Err(fail("TLS handshake timed out".into())),
    }
}
