//! One SDK connection: the streams the agent opens (heartbeats and RPCs),
//! the registry session its Auth opens, and the link through which the
//! registry reaches it (visitor streams, stopped tunnels).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{StreamExt, future::BoxFuture};
use postern_ingress::ClaimedStream;
use postern_proto::{BoxFrames, ErrorCode, Failure, TokenBucket, muxado::MuxError, pb};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::server::Connected;
use tracing::Instrument;

use super::{
    bind::{self, TunnelKind},
    messages::{self, ErrorResp, error_text, lower_keys, stream_type},
    mux::{Mux, MuxStream, StreamReader, StreamWriter},
};
use crate::{
    registry::{AgentHello, AgentSession, COMMAND_WAIT, Registry, SdkLink, SessionCommand},
    service::{PeerInfo, TlsConn},
};

/// How long an SDK has to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing session may take to flush its GOAWAY.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The largest RPC request read (a bind with CA bundles and a policy).
const MAX_RPC: usize = 1024 * 1024;
/// How long the edge waits for the agent to close an answered RPC stream.
const RPC_LINGER: Duration = Duration::from_secs(5);
/// Proxied connections at once for SDKs built on the Rust crate, whose
/// session dies past 512 concurrent streams (its RPC and heartbeat streams
/// count too, and a stream lingers there until both sides closed it).
pub const RUST_SDK_STREAMS: usize = 400;
/// Heartbeats as the SDKs default to them, until the Auth says otherwise.
const DEFAULT_HEARTBEAT: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(15));
/// Tunnel ids and client ids an SDK may choose are at most this long.
const MAX_ID: usize = 128;

/// A tunnel the SDK bound: its id on the SDK's side and what the proxy
/// headers say of it.
#[derive(Clone)]
struct Tunnel {
    ngrok_id: String,
    kind: TunnelKind,
}

/// What the registry holds of the SDK session: it opens visitor streams
/// and tells of stopped tunnels.
struct Link {
    mux: Mux,
    /// By endpoint id.
    tunnels: Arc<Mutex<HashMap<String, Tunnel>>>,
    tasks: TaskTracker,
    /// Why the agent does not take restart, stop and update, as its Auth
    /// said (`None`: it did not say, or takes it).
    refuses: Mutex<[Option<String>; 3]>,
}

/// The connection's state, shared by its stream tasks.
struct Conn {
    registry: Arc<Registry>,
    peer: PeerInfo,
    link: Arc<Link>,
    session: Mutex<Option<Arc<AgentSession>>>,
    /// The agent's heartbeat interval and tolerance.
    heartbeat: Mutex<(Duration, Duration)>,
    budget: Mutex<TokenBucket>,
}

/// Serves one SDK connection until it ends.
pub async fn run(
    conn: TlsConn,
    registry: Arc<Registry>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let peer = conn.connect_info();
    let span = tracing::info_span!("ngrok_session", client.addr = %peer.addr, session.id = tracing::field::Empty);
    let (mux, driver, mut accepted) = Mux::new(conn);
    let link = Arc::new(Link {
        mux: mux.clone(),
        tunnels: Arc::default(),
        tasks: tasks.clone(),
        refuses: Mutex::default(),
    });
    let state = Arc::new(Conn {
        budget: Mutex::new(registry.control_budget()),
        registry,
        peer,
        link,
        session: Mutex::new(None),
        heartbeat: Mutex::new(DEFAULT_HEARTBEAT),
    });
    let started = tokio::time::Instant::now();
    let driver = driver.run();
    tokio::pin!(driver);
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut closing: Option<tokio::time::Instant> = None;
    let end = async {
        loop {
            tokio::select! {
                end = &mut driver => return Some(end),
                stream = accepted.recv() => {
                    if let Some(stream) = stream {
                        tasks.spawn(serve_stream(state.clone(), stream).in_current_span());
                    }
                }
                _ = stop.cancelled(), if closing.is_none() => {
                    mux.go_away(MuxError::NONE, "the edge node is shutting down");
                    closing = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                }
                _ = ticker.tick() => {
                    if closing.is_some_and(|at| tokio::time::Instant::now() >= at) {
                        return None;
                    }
                    if closing.is_none() && let Some(reason) = state.overdue(started) {
                        state.end(reason);
                        closing = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                    }
                }
            }
        }
    }
    .instrument(span.clone())
    .await;
    let _enter = span.enter();
    match &end {
        Some(end) => tracing::debug!(%end, "ngrok agent connection ended"),
        None => tracing::debug!("ngrok agent connection cut after its GOAWAY"),
    }
    // A session that did not close in time is cut: its streams fail.
    mux.abort();
    let session = state.session.lock().expect("session lock").take();
    if let Some(session) = session {
        state.registry.close(&session, None);
    }
}

impl Conn {
    fn session(&self) -> Option<Arc<AgentSession>> {
        self.session.lock().expect("session lock").clone()
    }

    /// Why the session should end now: no Auth in time, or nothing from
    /// the agent for its heartbeat interval plus tolerance.
    fn overdue(&self, started: tokio::time::Instant) -> Option<Failure> {
        let session = self.session();
        if session.is_none() && started.elapsed() > AUTH_TIMEOUT && !self.registry.is_draining() {
            return Some(Failure::new(
                ErrorCode::PROTOCOL_VIOLATION,
                format!("no successful Auth within {AUTH_TIMEOUT:?}"),
            ));
        }
        let (interval, tolerance) = *self.heartbeat.lock().expect("heartbeat lock");
        let silent = self.link.mux.last_heard().elapsed();
        (silent > interval + tolerance).then(|| {
            Failure::new(
                ErrorCode::HEARTBEAT_TIMEOUT,
                format!("nothing from the agent for {silent:?}"),
            )
        })
    }

    /// Ends the session (and with it the connection) for `reason`.
    fn end(&self, reason: Failure) {
        tracing::info!(error = %reason, "ngrok agent session ends");
        match self.session() {
            Some(session) => self.registry.close(&session, Some(reason)),
            None => self.link.mux.go_away(MuxError::NONE, &error_text(&reason)),
        }
    }
}

/// Reads the stream type, then serves the stream.
async fn serve_stream(state: Arc<Conn>, stream: MuxStream) {
    let MuxStream {
        mut reader,
        mut writer,
    } = stream;
    let mut buf = BytesMut::new();
    if !matches!(reader.read_at_least(&mut buf, 4).await, Ok(true)) {
        return;
    }
    let kind = buf.get_u32();
    if kind == stream_type::AUTH && state.registry.is_draining() {
        // A refusal would cost a Rust SDK one of its few quick reconnect
        // attempts: hold the answer until the node stops.
        state.link.mux.gone().await;
        return;
    }
    if kind == stream_type::HEARTBEAT {
        echo(reader, writer, buf.freeze()).await;
        return;
    }
    let request = match read_json(&mut reader, buf).await {
        Ok(request) => request,
        Err(reason) => {
            tracing::debug!(kind, %reason, "unreadable RPC");
            writer.reset(MuxError::PROTOCOL).await;
            return;
        }
    };
    let reply = answer(&state, kind, request).await;
    if writer.write(Bytes::from(reply)).await.is_ok() && writer.finish().await.is_ok() {
        // The agent reads to the end, then closes its side.
        let _ = tokio::time::timeout(RPC_LINGER, async {
            while let Ok(Some(_)) = reader.read().await {}
        })
        .await;
    }
}

/// Echoes the agent's heartbeat nonces as they come.
async fn echo(mut reader: StreamReader, mut writer: StreamWriter, first: Bytes) {
    if !first.is_empty() && writer.write(first).await.is_err() {
        return;
    }
    while let Ok(Some(beat)) = reader.read().await {
        if writer.write(beat).await.is_err() {
            return;
        }
    }
    let _ = writer.finish().await;
}

/// Reads one JSON value (a trailing newline or none, FIN or not).
async fn read_json(reader: &mut StreamReader, mut buf: BytesMut) -> Result<Value, String> {
    loop {
        let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => return Ok(value),
            Some(Err(e)) if !e.is_eof() => return Err(format!("not JSON: {e}")),
            _ => {}
        }
        if buf.len() > MAX_RPC {
            return Err(format!("a request over {MAX_RPC} bytes"));
        }
        match reader.read().await {
            Ok(Some(data)) => buf.extend_from_slice(&data),
            Ok(None) => return Err("the stream ended before a whole request".into()),
            Err(code) => return Err(code.name().into()),
        }
    }
}

fn json(reply: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(reply).expect("replies serialize")
}

fn refusal(failure: &Failure) -> Vec<u8> {
    json(&ErrorResp {
        error: error_text(failure),
    })
}

/// The reply to one RPC.
async fn answer(state: &Arc<Conn>, kind: u32, original: Value) -> Vec<u8> {
    // The options are echoed as the SDK spelled them; everything is read
    // with lower-cased keys.
    let opts = original.as_object().and_then(|o| {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("opts"))
            .map(|(_, v)| v.clone())
    });
    let request = lower_keys(original);
    match kind {
        stream_type::AUTH => auth(state, request),
        stream_type::SRV_INFO => json(&messages::SrvInfoResp {
            region: state.registry.region().to_string(),
        }),
        stream_type::BIND | stream_type::UNBIND | stream_type::START_TUNNEL_WITH_LABEL => {
            let Some(session) = state.session() else {
                return refusal(&Failure::new(
                    ErrorCode::PROTOCOL_VIOLATION,
                    "authenticate (Auth) before anything else",
                ));
            };
            let budget = state
                .registry
                .spend(&mut state.budget.lock().expect("budget lock"));
            match budget {
                Ok(None) => {}
                Ok(Some(throttled)) => return refusal(&throttled),
                Err(flood) => {
                    state.end(flood.clone());
                    return refusal(&flood);
                }
            }
            match kind {
                stream_type::BIND => bind_endpoint(state, &session, request, opts).await,
                stream_type::UNBIND => unbind_endpoint(state, &session, request),
                _ => json(&messages::StartTunnelWithLabelResp {
                    id: String::new(),
                    error: error_text(&Failure::new(
                        ErrorCode::INVALID_BIND,
                        "labeled tunnels (StartTunnelWithLabel, ngrok's edges) are not supported by Postern; bind an HTTP, TLS or TCP endpoint by name instead",
                    )),
                }),
            }
        }
        stream_type::PATCH_TUNNEL_STATE => refusal(&Failure::new(
            ErrorCode::INVALID_BIND,
            "PatchTunnelState is not supported by Postern; unbind and bind the endpoint again",
        )),
        other => refusal(&Failure::new(
            ErrorCode::PROTOCOL_VIOLATION,
            format!("stream type {other} is not a request an agent sends"),
        )),
    }
}

/// Auth: opens the registry session.
fn auth(state: &Arc<Conn>, request: Value) -> Vec<u8> {
    let reply = |client_id: String, error: String| {
        json(&messages::AuthResp {
            version: "3".into(),
            client_id,
            error,
            extra: messages::AuthRespExtra {
                version: env!("CARGO_PKG_VERSION").into(),
                region: state.registry.region().to_string(),
                cookie: String::new(),
                account_name: String::new(),
            },
        })
    };
    let refuse = |failure: Failure| {
        state.registry.counters().session_refused(&failure);
        tracing::info!(error = %failure, "ngrok agent session refused");
        reply(String::new(), error_text(&failure))
    };
    if state.session().is_some() {
        return refuse(Failure::new(
            ErrorCode::PROTOCOL_VIOLATION,
            "this session is already authenticated",
        ));
    }
    let auth: messages::Auth = match serde_json::from_value(request) {
        Ok(auth) => auth,
        Err(e) => {
            return refuse(Failure::new(
                ErrorCode::PROTOCOL_VIOLATION,
                format!("the Auth request is not ngrok's Auth: {e}"),
            ));
        }
    };
    if auth.clientid.len() > MAX_ID {
        return refuse(Failure::new(
            ErrorCode::PROTOCOL_VIOLATION,
            format!("ClientId is longer than {MAX_ID} bytes"),
        ));
    }
    let client_id = match auth.clientid.as_str() {
        "" => postern_net::random_id(""),
        id => id.to_string(),
    };
    let extra = auth.extra;
    *state.link.refuses.lock().expect("refuses lock") = [
        &extra.restartunsupportederror,
        &extra.stopunsupportederror,
        &extra.updateunsupportederror,
    ]
    .map(|said| said.clone().filter(|why| !why.is_empty()));
    let agent_version = match extra.useragent.as_str() {
        "" => format!("{}/{}", extra.clienttype, extra.version),
        ua => ua.to_string(),
    };
    // Every SDK but ngrok-go is the Rust crate (Python and Node wrap it,
    // putting their own name first).
    let cap = if extra.clienttype.starts_with("ngrok-go") {
        usize::MAX
    } else {
        RUST_SDK_STREAMS
    };
    let hello = AgentHello {
        authtoken: extra.authtoken,
        agent_version,
        instance_id: client_id.clone(),
        os: extra.os,
    };
    let link: Arc<dyn SdkLink> = state.link.clone();
    let session = match state
        .registry
        .open_sdk_session(hello, link, Some(state.peer.clone()), cap)
    {
        Ok(session) => session,
        Err(failure) => return refuse(failure),
    };
    tracing::Span::current().record("session.id", session.id.as_str());
    *state.heartbeat.lock().expect("heartbeat lock") = (
        nanos(extra.heartbeatinterval, DEFAULT_HEARTBEAT.0),
        nanos(extra.heartbeattolerance, DEFAULT_HEARTBEAT.1),
    );
    if !extra.metadata.is_empty() {
        tracing::info!(metadata = %extra.metadata, "session metadata");
    }
    *state.session.lock().expect("session lock") = Some(session.clone());
    // When the registry ends the session (drain, revocation, a newer
    // session), the agent is told with a GOAWAY.
    let mux = state.link.mux.clone();
    state.link.tasks.spawn(
        async move {
            tokio::select! {
                _ = session.cancelled() => {
                    let reason = session.end_reason().map_or_else(
                        || "the session ended".to_string(),
                        |f| error_text(&f),
                    );
                    mux.go_away(MuxError::NONE, &reason);
                }
                _ = mux.gone() => {}
            }
        }
        .in_current_span(),
    );
    reply(client_id, String::new())
}

/// A duration the agent sent in nanoseconds, within 1 s to 10 min.
fn nanos(value: i64, default: Duration) -> Duration {
    match u64::try_from(value) {
        Ok(n) if n > 0 => {
            Duration::from_nanos(n).clamp(Duration::from_secs(1), Duration::from_secs(600))
        }
        _ => default,
    }
}

async fn bind_endpoint(
    state: &Arc<Conn>,
    session: &Arc<AgentSession>,
    request: Value,
    original_opts: Option<Value>,
) -> Vec<u8> {
    let refuse = |failure: Failure| {
        state.registry.bind_refused(&failure);
        tracing::info!(error = %failure, "ngrok bind refused");
        json(&messages::BindResp {
            error: error_text(&failure),
            ..Default::default()
        })
    };
    let bind: messages::Bind = match serde_json::from_value(request) {
        Ok(bind) => bind,
        Err(e) => {
            return refuse(Failure::new(
                ErrorCode::INVALID_BIND,
                format!("the Bind request is not ngrok's Bind: {e}"),
            ));
        }
    };
    if bind.id.len() > MAX_ID {
        return refuse(Failure::new(
            ErrorCode::INVALID_BIND,
            format!("Id is longer than {MAX_ID} bytes"),
        ));
    }
    let taken = state
        .link
        .tunnels
        .lock()
        .expect("tunnels lock")
        .values()
        .any(|t| !bind.id.is_empty() && t.ngrok_id == bind.id);
    if taken {
        return refuse(Failure::new(
            ErrorCode::INVALID_BIND,
            format!(
                "a tunnel with Id {:?} is already bound in this session",
                bind.id
            ),
        ));
    }
    let mapped = match bind::map(&bind) {
        Ok(mapped) => mapped,
        Err(failure) => return refuse(failure),
    };
    if !bind.extra.metadata.is_empty() || !bind.extra.description.is_empty() {
        tracing::info!(metadata = %bind.extra.metadata, description = %bind.extra.description, "endpoint metadata");
    }
    let (endpoint_id, url) = match state.registry.bind(session, mapped.request).await {
        Ok(bound) => bound,
        Err(failure) => return refuse(failure),
    };
    let ngrok_id = match bind.id.as_str() {
        "" => endpoint_id.clone(),
        id => id.to_string(),
    };
    state.link.tunnels.lock().expect("tunnels lock").insert(
        endpoint_id.clone(),
        Tunnel {
            ngrok_id: ngrok_id.clone(),
            kind: mapped.kind,
        },
    );
    json(&messages::BindResp {
        id: ngrok_id,
        opts: bind::echoed_opts(&original_opts.unwrap_or(Value::Null), &bind.proto, &url),
        url,
        proto: bind.proto,
        error: String::new(),
        extra: messages::BindRespExtra {
            token: String::new(),
            tunnel_id: endpoint_id,
        },
    })
}

fn unbind_endpoint(state: &Arc<Conn>, session: &Arc<AgentSession>, request: Value) -> Vec<u8> {
    let unbind: messages::Unbind = serde_json::from_value(request).unwrap_or_default();
    let endpoint_id = {
        let mut tunnels = state.link.tunnels.lock().expect("tunnels lock");
        let found = tunnels
            .iter()
            .find(|(_, t)| t.ngrok_id == unbind.id)
            .map(|(id, _)| id.clone());
        if let Some(id) = &found {
            tunnels.remove(id);
        }
        found
    };
    let result = match endpoint_id {
        Some(id) => state.registry.unbind(session, &id),
        None => Err(Failure::new(
            ErrorCode::UNKNOWN_ENDPOINT,
            format!("no tunnel with Id {:?} in this session", unbind.id),
        )),
    };
    match result {
        Ok(()) => json(&ErrorResp::default()),
        Err(failure) => refusal(&failure),
    }
}

impl SdkLink for Link {
    fn open_stream(&self) -> Result<ClaimedStream, Failure> {
        let MuxStream { reader, writer } = self.mux.open().map_err(|_| {
            Failure::new(
                ErrorCode::AGENT_FORWARD_FAILED,
                "the agent session has ended",
            )
        })?;
        let (attach, attached) = oneshot::channel();
        self.tasks
            .spawn(relay(writer, attached, self.tunnels.clone()).in_current_span());
        Ok(ClaimedStream {
            inbound: Box::pin(inbound_frames(reader)),
            attach,
            permit: None,
        })
    }

    fn endpoint_stopped(&self, endpoint_id: &str, failure: &Failure) {
        let Some(tunnel) = self
            .tunnels
            .lock()
            .expect("tunnels lock")
            .remove(endpoint_id)
        else {
            return;
        };
        let Ok(MuxStream { reader, mut writer }) = self.mux.open() else {
            return;
        };
        let stop = messages::StopTunnel {
            id: tunnel.ngrok_id,
            message: failure.to_string(),
            error_code: format!("ERR_NGROK_{}", failure.code.number),
        };
        let mut body = BytesMut::new();
        body.put_u32(stream_type::STOP_TUNNEL);
        body.put_slice(&json(&stop));
        self.tasks.spawn(async move {
            // No reply comes; the agent closes the stream.
            if writer.write(body.freeze()).await.is_ok() && writer.finish().await.is_ok() {
                let mut reader = reader;
                let _ = tokio::time::timeout(RPC_LINGER, async {
                    while let Ok(Some(_)) = reader.read().await {}
                })
                .await;
            }
        });
    }

    fn command(&self, command: SessionCommand) -> BoxFuture<'static, Result<(), Failure>> {
        let (slot, kind, body) = match &command {
            SessionCommand::Restart => (0, stream_type::RESTART, b"{}".to_vec()),
            SessionCommand::Stop => (1, stream_type::STOP, b"{}".to_vec()),
            SessionCommand::Update {
                version,
                permit_major_version,
            } => (
                2,
                stream_type::UPDATE,
                json(&messages::Update {
                    version: version.clone(),
                    permit_major_version: *permit_major_version,
                }),
            ),
        };
        let refused = self.refuses.lock().expect("refuses lock")[slot].clone();
        if let Some(why) = refused {
            let failure = Failure::new(
                ErrorCode::COMMAND_UNSUPPORTED,
                format!("the agent takes no {}: {why}", command.name()),
            );
            return Box::pin(async move { Err(failure) });
        }
        Box::pin(Self::run_command(self.mux.open(), kind, body))
    }
}

impl Link {
    /// Sends `command` on a stream of its own and reads the agent's reply.
    async fn run_command(
        stream: Result<MuxStream, MuxError>,
        kind: u32,
        body: Vec<u8>,
    ) -> Result<(), Failure> {
        let failed = |detail: String| Failure::new(ErrorCode::COMMAND_FAILED, detail);
        let MuxStream {
            mut reader,
            mut writer,
        } = stream.map_err(|_| failed("the agent session has ended".into()))?;
        let mut request = BytesMut::new();
        request.put_u32(kind);
        request.put_slice(&body);
        writer
            .write(request.freeze())
            .await
            .map_err(|code| failed(format!("sending the command: {}", code.name())))?;
        let reply = tokio::time::timeout(COMMAND_WAIT, read_json(&mut reader, BytesMut::new()))
            .await
            .map_err(|_| failed(format!("the agent did not answer within {COMMAND_WAIT:?}")))?
            .map_err(|e| failed(format!("the agent's reply: {e}")))?;
        let _ = writer.finish().await;
        let reply: messages::CommandResp = serde_json::from_value(lower_keys(reply))
            .map_err(|e| failed(format!("the agent's reply is not ngrok's: {e}")))?;
        match reply.error.filter(|e| !e.is_empty()) {
            None => Ok(()),
            Some(error) => Err(failed(format!("the agent answered: {error}"))),
        }
    }
}

/// The agent's side of a visitor stream as the gateway reads frames.
fn inbound_frames(
    reader: StreamReader,
) -> impl futures_util::Stream<Item = Result<pb::Frame, tonic::Status>> + Send {
    futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let frame = match reader.read().await {
            Ok(Some(data)) => {
                return Some((
                    Ok(pb::Frame {
                        data,
                        ..Default::default()
                    }),
                    Some(reader),
                ));
            }
            Ok(None) => pb::Frame {
                eof: true,
                ..Default::default()
            },
            Err(code) => pb::Frame {
                error: Some(
                    ErrorCode::CONNECTION_RESET
                        .to_pb(format!("the agent's stream ended: {}", code.name())),
                ),
                ..Default::default()
            },
        };
        Some((Ok(frame), None))
    })
}

/// Sends what the gateway plugs in: the proxy header built from its
/// `open` frame, then the visitor's bytes, half-close and resets.
async fn relay(
    mut writer: StreamWriter,
    attached: oneshot::Receiver<BoxFrames>,
    tunnels: Arc<Mutex<HashMap<String, Tunnel>>>,
) {
    let Ok(mut frames) = attached.await else {
        return;
    };
    let Some(first) = frames.next().await else {
        return;
    };
    let header = first.open.as_ref().and_then(|open| {
        let tunnels = tunnels.lock().expect("tunnels lock");
        let tunnel = tunnels.get(&open.endpoint_id)?;
        Some(messages::ProxyHeader {
            id: tunnel.ngrok_id.clone(),
            client_addr: open.client_addr.clone(),
            proto: tunnel.kind.proto.clone(),
            edge_type: String::new(),
            passthrough_tls: tunnel.kind.passthrough_tls,
        })
    });
    // Nothing was sent yet: dropping the stream sends nothing either.
    let Some(header) = header else { return };
    let header = json(&header);
    let mut head = BytesMut::with_capacity(12 + header.len() + first.data.len());
    head.put_u32(stream_type::PROXY);
    head.put_i64_le(header.len() as i64);
    head.put_slice(&header);
    head.put_slice(&first.data);
    if writer.write(head.freeze()).await.is_err() {
        return;
    }
    let mut finished = false;
    // The first frame's bytes went out with the header; its end may not.
    let mut next = Some(pb::Frame {
        data: Bytes::new(),
        open: None,
        ..first
    });
    while let Some(frame) = next {
        if frame.error.is_some() {
            writer.reset(MuxError::STREAM_CANCELLED).await;
            return;
        }
        if !frame.data.is_empty() && writer.write(frame.data).await.is_err() {
            return;
        }
        if frame.eof {
            finished = writer.finish().await.is_ok();
        }
        next = frames.next().await;
    }
    if !finished {
        writer.reset(MuxError::STREAM_CANCELLED).await;
    }
}
