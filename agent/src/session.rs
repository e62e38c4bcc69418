//! The agent's session with the edge: connect, hello, bind every tunnel,
//! keep data streams parked, answer heartbeats, and reconnect with
//! exponential backoff and full jitter for as long as the token is valid,
//! binding the same tunnels again each time.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use postern_proto::{
    ErrorCode, Failure, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, h2_settings, pb,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Channel, Endpoint};

use crate::{
    config::{AgentConfig, MutualTlsCas, Proto, TerminateAt, TunnelSpec},
    forward::{Routes, StreamContext, Target, spawn_stream},
    tls::edge_client_config,
};

/// First reconnect delay cap; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lived this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// What the agent is doing, for the CLI and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub online: bool,
    pub session_id: String,
    pub region: String,
    pub node_id: String,
    /// (tunnel name, public URL), in config order.
    pub tunnels: Vec<(String, String)>,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// Why a session ended.
enum SessionEnd {
    /// Ctrl-C / shutdown: stop.
    Shutdown,
    /// Try again after a backoff.
    Lost(String),
    /// Retrying cannot help (bad token, refused bind at start-up).
    Fatal(Failure),
}

/// Runs the agent until `shutdown` is cancelled or a fatal error.
pub async fn run(
    config: AgentConfig,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = edge_client_config(&config.root_cas)?;
    let targets: Vec<Arc<Target>> = config
        .tunnels
        .iter()
        .map(|spec| Target::new(spec.clone()).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let instance_id = postern_proto_random();
    let mut attempt: u32 = 0;
    let mut ever_online = false;
    loop {
        let started = Instant::now();
        let end = match connect(&config, tls.clone()).await {
            Ok(channel) => {
                let session = Session {
                    config: &config,
                    targets: &targets,
                    instance_id: &instance_id,
                    status: &status,
                    shutdown: &shutdown,
                    ever_online,
                };
                session.serve(channel).await
            }
            Err(e) => SessionEnd::Lost(format!("connecting to {}: {e:#}", config.server_addr)),
        };
        ever_online |= status.borrow().online;
        status.send_modify(|s| s.online = false);
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(failure) => {
                status.send_modify(|s| s.last_error = Some(failure.to_string()));
                return Err(anyhow::anyhow!("{failure}"));
            }
            SessionEnd::Lost(reason) => {
                tracing::warn!(%reason, "session lost; reconnecting");
                status.send_modify(|s| {
                    s.last_error = Some(reason);
                    s.reconnects += 1;
                });
            }
        }
        if started.elapsed() >= STABLE_SESSION {
            attempt = 0;
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Full jitter: uniform in `[0, min(cap, base * 2^attempt))`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(rand::random::<f64>())
}

fn postern_proto_random() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Dials the edge: TCP, TLS with ALPN h2, then the HTTP/2 channel.
async fn connect(config: &AgentConfig, tls: Arc<ClientConfig>) -> anyhow::Result<Channel> {
    let name = ServerName::try_from(config.server_name.clone())?;
    let connector = EdgeConnector {
        addr: config.server_addr.clone(),
        name,
        tls: TlsConnector::from(tls),
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", config.server_addr))?
        .connect_timeout(config.connect_timeout)
        .initial_stream_window_size(h2_settings::STREAM_WINDOW)
        .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
        .max_frame_size(h2_settings::MAX_FRAME_SIZE)
        .http2_keep_alive_interval(config.heartbeat_interval)
        .keep_alive_timeout(config.heartbeat_tolerance)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = tokio::time::timeout(
        config.connect_timeout,
        endpoint.connect_with_connector(connector),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no connection within {:?}", config.connect_timeout))??;
    Ok(channel)
}

#[derive(Clone)]
struct EdgeConnector {
    addr: String,
    name: ServerName<'static>,
    tls: TlsConnector,
}

impl tower_service::Service<Uri> for EdgeConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = match localhost_addr(&this.addr) {
                Some(addr) => TcpStream::connect(addr).await?,
                None => TcpStream::connect(&this.addr).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Names under `.localhost` are loopback (RFC 6761), whatever the resolver says.
fn localhost_addr(addr: &str) -> Option<std::net::SocketAddr> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let port: u16 = port.parse().ok()?;
    (host == "localhost" || host.ends_with(".localhost")).then(|| ([127, 0, 0, 1], port).into())
}

struct Session<'a> {
    config: &'a AgentConfig,
    targets: &'a [Arc<Target>],
    instance_id: &'a str,
    status: &'a watch::Sender<Status>,
    shutdown: &'a CancellationToken,
    ever_online: bool,
}

fn agent_message(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

impl Session<'_> {
    async fn serve(&self, channel: Channel) -> SessionEnd {
        let mut client = pb::tunnel_client::TunnelClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        let hello = pb::Hello {
            protocol_version: MAX_PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            authtoken: self.config.authtoken.expose().to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            instance_id: self.instance_id.to_string(),
            os: std::env::consts::OS.to_string(),
            stream_pool: self.config.stream_pool,
        };
        let _ = tx.try_send(agent_message(pb::agent_message::Msg::Hello(hello)));
        let mut inbound = match client.control(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return SessionEnd::Lost(format!("control stream refused: {}", status.message()));
            }
        };
        let welcome = match inbound.message().await {
            Ok(Some(pb::EdgeMessage {
                msg: Some(pb::edge_message::Msg::Welcome(welcome)),
            })) => welcome,
            Ok(Some(pb::EdgeMessage {
                msg: Some(pb::edge_message::Msg::Error(error)),
            })) => return refused(Failure::from_pb(&error)),
            Ok(_) => {
                return SessionEnd::Lost("the edge closed the session before welcoming it".into());
            }
            Err(status) => {
                return SessionEnd::Lost(format!("control stream: {}", status.message()));
            }
        };
        let parse = |v: &str| {
            v.parse()
                .map_err(|_| SessionEnd::Lost("the edge sent a bad session id".into()))
        };
        let (session_id, stream_token) =
            match (parse(&welcome.session_id), parse(&welcome.stream_token)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return e,
            };
        let routes = Arc::new(Routes::default());
        let tracker = TaskTracker::new();
        let ctx = Arc::new(StreamContext {
            client: client.clone(),
            session_id,
            stream_token,
            routes: routes.clone(),
            tracker: tracker.clone(),
        });
        let end = self
            .run_session(&welcome, &tx, &mut inbound, &ctx, &routes)
            .await;
        tracker.close();
        end
    }

    async fn run_session(
        &self,
        welcome: &pb::Welcome,
        tx: &mpsc::Sender<pb::AgentMessage>,
        inbound: &mut tonic::Streaming<pb::EdgeMessage>,
        ctx: &Arc<StreamContext>,
        routes: &Routes,
    ) -> SessionEnd {
        // Bind every tunnel; the edge answers in order.
        let mut bound = HashMap::new();
        let mut urls = Vec::new();
        for (i, target) in self.targets.iter().enumerate() {
            let request = bind_request(i as u64 + 1, &target.spec);
            if tx
                .send(agent_message(pb::agent_message::Msg::Bind(request)))
                .await
                .is_err()
            {
                return SessionEnd::Lost("control stream closed".into());
            }
            let response = loop {
                match inbound.message().await {
                    Ok(Some(pb::EdgeMessage {
                        msg: Some(pb::edge_message::Msg::Bind(r)),
                    })) => break r,
                    Ok(Some(pb::EdgeMessage {
                        msg: Some(pb::edge_message::Msg::Ping(hb)),
                    })) => {
                        let _ = tx.try_send(agent_message(pb::agent_message::Msg::Pong(hb)));
                    }
                    Ok(Some(pb::EdgeMessage {
                        msg: Some(pb::edge_message::Msg::Error(e)),
                    })) => {
                        return refused(Failure::from_pb(&e));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Lost("the edge closed the session".into()),
                    Err(status) => {
                        return SessionEnd::Lost(format!("control stream: {}", status.message()));
                    }
                }
            };
            if let Some(error) = response.error {
                let failure = Failure::from_pb(&error);
                let failure = Failure::new(
                    failure.code,
                    format!("tunnel {:?}: {}", target.spec.name, failure.detail),
                );
                return if self.ever_online {
                    // The name may still be held by our own old session.
                    SessionEnd::Lost(failure.to_string())
                } else {
                    SessionEnd::Fatal(failure)
                };
            }
            urls.push((target.spec.name.clone(), response.public_url.clone()));
            bound.insert(response.endpoint_id, target.clone());
        }
        routes.replace(bound.clone());
        for _ in 0..self.config.stream_pool {
            spawn_stream(ctx.clone(), true);
        }
        self.status.send_modify(|s| {
            s.online = true;
            s.session_id = welcome.session_id.clone();
            s.region = welcome.region.clone();
            s.node_id = welcome.node_id.clone();
            s.tunnels = urls;
        });
        tracing::info!(session.id = %welcome.session_id, region = %welcome.region, "session online");

        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.tick().await;
        let mut last_seen = Instant::now();
        let mut nonce = 0u64;
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    unbind_all(tx, inbound, bound.keys()).await;
                    return SessionEnd::Shutdown;
                }
                _ = ticker.tick() => {
                    if last_seen.elapsed() > self.config.heartbeat_tolerance {
                        return SessionEnd::Lost(format!(
                            "no heartbeat from the edge for {:?}",
                            self.config.heartbeat_tolerance
                        ));
                    }
                    nonce += 1;
                    let _ = tx.try_send(agent_message(pb::agent_message::Msg::Ping(pb::Heartbeat { nonce })));
                    continue;
                }
                message = inbound.message() => message,
            };
            last_seen = Instant::now();
            use pb::edge_message::Msg;
            match message {
                Ok(Some(pb::EdgeMessage { msg: Some(msg) })) => match msg {
                    Msg::Ping(hb) => {
                        let _ = tx.try_send(agent_message(pb::agent_message::Msg::Pong(hb)));
                    }
                    Msg::OpenStreams(req) => {
                        for _ in 0..req.count.min(64) {
                            spawn_stream(ctx.clone(), false);
                        }
                    }
                    Msg::Drain(drain) => {
                        tracing::info!(reason = %drain.reason, "the edge is draining")
                    }
                    Msg::Error(error) => {
                        return SessionEnd::Lost(Failure::from_pb(&error).to_string());
                    }
                    Msg::Pong(_) | Msg::Welcome(_) | Msg::Bind(_) | Msg::Unbind(_) => {}
                },
                Ok(Some(pb::EdgeMessage { msg: None })) => {}
                Ok(None) => return SessionEnd::Lost("the edge closed the session".into()),
                Err(status) => {
                    return SessionEnd::Lost(format!("control stream: {}", status.message()));
                }
            }
        }
    }
}

/// Session refusals: a bad token or version is final, the rest is retried.
fn refused(failure: Failure) -> SessionEnd {
    match failure.code {
        ErrorCode::AUTHTOKEN_INVALID
        | ErrorCode::AUTHTOKEN_MALFORMED
        | ErrorCode::PROTOCOL_VERSION => SessionEnd::Fatal(failure),
        _ => SessionEnd::Lost(failure.to_string()),
    }
}

fn bind_request(request_id: u64, spec: &TunnelSpec) -> pb::BindRequest {
    let protocol = match spec.proto {
        Proto::Http => pb::Protocol::Http,
        Proto::Tls => pb::Protocol::Tls,
        Proto::Tcp => pb::Protocol::Tcp,
    };
    let terminate_at = match spec.terminate_at {
        None => pb::TerminateAt::Unspecified,
        Some(TerminateAt::Edge) => pb::TerminateAt::Edge,
        Some(TerminateAt::Agent) => pb::TerminateAt::Agent,
        Some(TerminateAt::Upstream) => pb::TerminateAt::Upstream,
    };
    // The certificate goes to the edge only when the edge terminates TLS.
    let edge_cert = match (spec.terminate_at, &spec.crt_key) {
        (None | Some(TerminateAt::Edge), Some((crt, key))) => {
            Some((crt.clone(), key.expose().as_bytes().to_vec()))
        }
        _ => None,
    };
    let (tls_cert_pem, tls_key_pem) = edge_cert.unwrap_or_default();
    pb::BindRequest {
        request_id,
        name: spec.name.clone(),
        protocol: protocol as i32,
        domain: spec.domain.clone().unwrap_or_default(),
        remote_port: u32::from(spec.remote_port),
        terminate_at: terminate_at as i32,
        tls_cert_pem,
        tls_key_pem,
        forwards_to: spec.upstream.url(spec.proto),
        mutual_tls_cas_pem: match &spec.mutual_tls_cas {
            Some(MutualTlsCas::Pem(pem)) if spec.terminate_at != Some(TerminateAt::Agent) => {
                pem.clone()
            }
            _ => Vec::new(),
        },
        mutual_tls_ca_ids: match &spec.mutual_tls_cas {
            Some(MutualTlsCas::Ids(ids)) => ids.clone(),
            _ => Vec::new(),
        },
        ip_restriction: None,
        oauth: None,
        proxy_proto: spec.proxy_proto.map_or(0, |v| match v {
            postern_proto::proxy_header::Version::V1 => 1,
            postern_proto::proxy_header::Version::V2 => 2,
        }),
    }
}

/// Unbinds everything before leaving, waiting briefly for the answers.
async fn unbind_all<'a>(
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::EdgeMessage>,
    endpoint_ids: impl Iterator<Item = &'a String>,
) {
    let mut pending = 0;
    for (i, id) in endpoint_ids.enumerate() {
        let unbind = pb::UnbindRequest {
            request_id: 1_000_000 + i as u64,
            endpoint_id: id.clone(),
        };
        if tx
            .send(agent_message(pb::agent_message::Msg::Unbind(unbind)))
            .await
            .is_ok()
        {
            pending += 1;
        }
    }
    let answers = async {
        while pending > 0 {
            match inbound.message().await {
                Ok(Some(pb::EdgeMessage {
                    msg: Some(pb::edge_message::Msg::Unbind(_)),
                })) => pending -= 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answers).await;
    tracing::info!("tunnels unbound");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_MAX);
            assert!(d < BACKOFF_BASE * 2u32.pow(attempt.min(16)) || d <= BACKOFF_MAX);
        }
        assert!(
            backoff(0) < BACKOFF_BASE,
            "the first retry comes within 0.5 s"
        );
        let spread: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(5).as_millis()).collect();
        assert!(spread.len() > 10, "full jitter spreads retries");
    }

    #[test]
    fn localhost_names_are_loopback() {
        assert_eq!(
            localhost_addr("tunnel.us.connect.postern.localhost:4443"),
            Some(([127, 0, 0, 1], 4443).into())
        );
        assert_eq!(
            localhost_addr("localhost:1"),
            Some(([127, 0, 0, 1], 1).into())
        );
        assert_eq!(localhost_addr("example.test:443"), None);
    }
}
