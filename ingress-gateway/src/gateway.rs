//! The public side of an edge node: the HTTP and HTTPS/TLS listeners, the
//! per-endpoint TCP listeners, the route table, and drain.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use postern_proto::{ErrorCode, Failure, PipeOutcome, pipe};
use rustls::{ServerConfig, server::danger::ClientCertVerifier, sign::CertifiedKey};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    endpoint::{Endpoint, EndpointKind, StreamSource, TerminateAt, open_frame},
    http::{self as proxy, ConnInfo, UpstreamPool},
    mtls::{ClientIdentity, MtlsPolicy, RequestClientCert, RequireClientCert},
    outcome::{self, Counted, HttpRecord, Outcomes},
    router::{DomainPattern, Router, normalize_host},
    sni::{self, Peek},
    tls::{CertStore, FixedNameResolver, StoreResolver, build_server_config, server_config},
};

/// Settings of the public side.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Port shown in public HTTPS/TLS URLs (omitted when 443).
    pub https_public_port: u16,
    /// Address TCP endpoint listeners bind to.
    pub tcp_bind_ip: IpAddr,
    /// Host shown in `tcp://host:port` URLs.
    pub tcp_public_host: String,
    /// Ports TCP endpoints may use.
    pub tcp_ports: RangeInclusive<u16>,
    /// Base for random endpoint names when a bind names no domain.
    pub random_domain_base: Option<String>,
    /// How long a client may take to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// Largest ClientHello buffered for SNI routing.
    pub client_hello_max: usize,
    /// How long a TLS handshake may take once routed.
    pub tls_handshake_timeout: Duration,
    /// How long an HTTP/1 client may take to send request headers.
    pub header_read_timeout: Duration,
    /// The name whose certificate clients without SNI get (they are then
    /// routed by Host); `None` refuses them with `unrecognized_name`.
    pub default_server_name: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            https_public_port: 443,
            tcp_bind_ip: IpAddr::from([127, 0, 0, 1]),
            tcp_public_host: "localhost".into(),
            tcp_ports: 20000..=29999,
            random_domain_base: None,
            client_hello_timeout: Duration::from_secs(10),
            client_hello_max: 16 * 1024 + 5,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            default_server_name: None,
        }
    }
}

/// What an agent asks to bind, after the edge has checked it is allowed.
pub struct EndpointSpec {
    pub name: String,
    pub protocol: Protocol,
    /// HTTP/TLS: the domain; `None` picks a random name.
    pub domain: Option<DomainPattern>,
    /// TCP: the requested port; 0 picks a free one.
    pub remote_port: u16,
    pub terminate_at: TerminateAt,
    /// TLS terminated at the edge with the agent's own certificate.
    pub certificate: Option<Arc<CertifiedKey>>,
    /// The agent writes PROXY headers: never share upstream connections.
    pub proxy_proto: bool,
    /// Require client certificates (HTTP, and TLS terminated at the edge).
    pub mutual_tls: Option<Arc<MtlsPolicy>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tls,
    Tcp,
}

/// Counters of the public side.
#[derive(Debug, Default)]
pub struct Stats {
    pub tls_no_sni: AtomicU64,
    pub tls_unknown_sni: AtomicU64,
    pub tls_bad_client_hello: AtomicU64,
    pub tls_client_hello_timeout: AtomicU64,
    pub tls_handshake_failed: AtomicU64,
    pub accept_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub tcp_connections: AtomicU64,
}

impl Stats {
    /// Name and value of every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("tls_no_sni", get(&self.tls_no_sni)),
            ("tls_unknown_sni", get(&self.tls_unknown_sni)),
            ("tls_bad_client_hello", get(&self.tls_bad_client_hello)),
            (
                "tls_client_hello_timeout",
                get(&self.tls_client_hello_timeout),
            ),
            ("tls_handshake_failed", get(&self.tls_handshake_failed)),
            ("accept_errors", get(&self.accept_errors)),
            ("http_requests", get(&self.http_requests)),
            ("tcp_connections", get(&self.tcp_connections)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A routed endpoint with what serving it needs.
struct Route {
    endpoint: Arc<Endpoint>,
    /// HTTP endpoints without PROXY headers share one upstream pool.
    shared_pool: Option<UpstreamPool>,
    /// How TLS ends at the edge (HTTP, and TLS endpoints terminated here).
    termination: Option<Arc<ServerConfig>>,
    mtls: Option<Arc<MtlsPolicy>>,
}

enum Binding {
    Domain(DomainPattern),
    Port(CancellationToken),
}

struct Inner {
    config: GatewayConfig,
    outcomes: Outcomes,
    certs: Arc<CertStore>,
    http_tls: Arc<ServerConfig>,
    tls_edge: Arc<ServerConfig>,
    /// For handshakes without SNI: the default certificate, and a client
    /// certificate asked for (mTLS is then decided per request).
    no_sni_tls: Option<Arc<ServerConfig>>,
    routes: RwLock<Router<Arc<Route>>>,
    bindings: Mutex<HashMap<String, Binding>>,
    http: auto::Builder<TokioExecutor>,
    graceful: Mutex<Option<GracefulShutdown>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    stats: Stats,
}

/// The public side of one edge node. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    pub fn new(config: GatewayConfig, certs: Arc<CertStore>, outcomes: Outcomes) -> Gateway {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(100);
        Gateway {
            inner: Arc::new(Inner {
                http_tls: server_config(certs.clone(), &[b"h2", b"http/1.1"]),
                tls_edge: server_config(certs.clone(), &[]),
                no_sni_tls: config
                    .default_server_name
                    .clone()
                    .filter(|name| certs.lookup(name).is_some())
                    .map(|name| {
                        let resolver = Arc::new(FixedNameResolver {
                            store: certs.clone(),
                            name,
                        });
                        build_server_config(
                            resolver,
                            Some(Arc::new(RequestClientCert)),
                            &[b"h2", b"http/1.1"],
                        )
                    }),
                certs,
                config,
                outcomes,
                routes: RwLock::new(Router::default()),
                bindings: Mutex::new(HashMap::new()),
                http,
                graceful: Mutex::new(Some(GracefulShutdown::new())),
                tracker: TaskTracker::new(),
                stop_accepting: CancellationToken::new(),
                stats: Stats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn certs(&self) -> &Arc<CertStore> {
        &self.inner.certs
    }

    /// Serves plain HTTP on `listener` until drain.
    pub fn serve_http(&self, listener: TcpListener) {
        spawn_accept_loop(
            &self.inner,
            listener,
            self.inner.stop_accepting.clone(),
            |inner, stream, client| async move {
                let Ok(local) = stream.local_addr() else {
                    return;
                };
                let conn = ConnInfo {
                    client,
                    local,
                    sni: None,
                    tls: None,
                    peer_chain: None,
                    start: SystemTime::now(),
                };
                serve_http_connection(inner, stream, conn).await;
            },
        );
    }

    /// Serves HTTPS and SNI-routed TLS endpoints on `listener` until drain.
    pub fn serve_https(&self, listener: TcpListener) {
        spawn_accept_loop(
            &self.inner,
            listener,
            self.inner.stop_accepting.clone(),
            handle_tls_port,
        );
    }

    /// Adds an endpoint served by `source`.
    pub fn add(
        &self,
        spec: EndpointSpec,
        source: Arc<dyn StreamSource>,
    ) -> Result<Arc<Endpoint>, Failure> {
        let id = crate::random_id("ep_");
        match spec.protocol {
            Protocol::Tcp => self.add_tcp(id, spec, source),
            Protocol::Http | Protocol::Tls => self.add_named(id, spec, source),
        }
    }

    fn add_named(
        &self,
        id: String,
        spec: EndpointSpec,
        source: Arc<dyn StreamSource>,
    ) -> Result<Arc<Endpoint>, Failure> {
        let config = &self.inner.config;
        let domain = match spec.domain {
            Some(domain) => domain,
            None => {
                let base = config.random_domain_base.as_ref().ok_or_else(|| {
                    Failure::new(
                        ErrorCode::INVALID_BIND,
                        "a domain is required: this edge assigns no random names",
                    )
                })?;
                DomainPattern::Exact(format!("{}.{base}", crate::random_label()))
            }
        };
        let port = match config.https_public_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let kind = match spec.protocol {
            Protocol::Http => EndpointKind::Http,
            _ => EndpointKind::Tls {
                terminate_at: spec.terminate_at,
            },
        };
        let termination = self.termination(&kind, spec.certificate, spec.mutual_tls.clone());
        let endpoint = Arc::new(Endpoint {
            public_url: format!("{}://{domain}{port}", kind.scheme()),
            id: id.clone(),
            name: spec.name,
            kind,
            source,
        });
        let shared_pool = (spec.protocol == Protocol::Http && !spec.proxy_proto).then(|| {
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            UpstreamPool::new(
                id.clone(),
                endpoint.source.clone(),
                unspecified,
                unspecified,
                domain.to_string(),
            )
        });
        let route = Arc::new(Route {
            endpoint: endpoint.clone(),
            shared_pool,
            termination,
            mtls: spec.mutual_tls,
        });
        self.inner
            .routes
            .write()
            .expect("routes lock")
            .insert(&domain, route)
            .map_err(|_| {
                Failure::new(
                    ErrorCode::ENDPOINT_ALREADY_BOUND,
                    format!("{domain} is already bound by another agent session"),
                )
            })?;
        self.inner
            .bindings
            .lock()
            .expect("bindings lock")
            .insert(id, Binding::Domain(domain));
        Ok(endpoint)
    }

    /// The server config that terminates TLS for an endpoint, if the edge
    /// terminates it; shared unless the endpoint has its own certificate or
    /// requires client certificates.
    fn termination(
        &self,
        kind: &EndpointKind,
        certificate: Option<Arc<CertifiedKey>>,
        mtls: Option<Arc<MtlsPolicy>>,
    ) -> Option<Arc<ServerConfig>> {
        let (shared, alpn): (&Arc<ServerConfig>, &[&[u8]]) = match kind {
            EndpointKind::Http => (&self.inner.http_tls, &[b"h2", b"http/1.1"]),
            EndpointKind::Tls {
                terminate_at: TerminateAt::Edge,
            } => (&self.inner.tls_edge, &[]),
            _ => return None,
        };
        if certificate.is_none() && mtls.is_none() {
            return Some(shared.clone());
        }
        let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match certificate {
            Some(key) => Arc::new(rustls::sign::SingleCertAndKey::from(key)),
            None => Arc::new(StoreResolver(self.inner.certs.clone())),
        };
        let verifier =
            mtls.map(|policy| Arc::new(RequireClientCert(policy)) as Arc<dyn ClientCertVerifier>);
        Some(build_server_config(resolver, verifier, alpn))
    }

    fn add_tcp(
        &self,
        id: String,
        spec: EndpointSpec,
        source: Arc<dyn StreamSource>,
    ) -> Result<Arc<Endpoint>, Failure> {
        let config = &self.inner.config;
        let listener = bind_tcp_port(config, spec.remote_port)?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(spec.remote_port);
        let endpoint = Arc::new(Endpoint {
            id: id.clone(),
            name: spec.name,
            kind: EndpointKind::Tcp { port },
            public_url: format!("tcp://{}:{port}", config.tcp_public_host),
            source,
        });
        let token = self.inner.stop_accepting.child_token();
        self.inner
            .bindings
            .lock()
            .expect("bindings lock")
            .insert(id, Binding::Port(token.clone()));
        let served = endpoint.clone();
        spawn_accept_loop(
            &self.inner,
            listener,
            token,
            move |inner, stream, client| {
                let endpoint = served.clone();
                async move {
                    bump(&inner.stats.tcp_connections);
                    let Ok(local) = stream.local_addr() else {
                        return;
                    };
                    let start = SystemTime::now();
                    let (r, w) = stream.into_split();
                    let result =
                        proxy_bytes(&endpoint, r, w, Bytes::new(), client, local, "").await;
                    let ids = (endpoint.id.as_str(), endpoint.source.session_id());
                    outcome::tcp_closed(
                        &inner.outcomes,
                        client,
                        local,
                        "",
                        start,
                        "tcp",
                        Some(ids),
                        &result,
                    );
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %endpoint.id, error = %e, "TCP connection not proxied");
                    }
                }
            },
        );
        Ok(endpoint)
    }

    /// Removes an endpoint; its TCP listener stops at once, connections in
    /// flight keep going until they end.
    pub fn remove(&self, endpoint_id: &str) -> bool {
        let binding = self
            .inner
            .bindings
            .lock()
            .expect("bindings lock")
            .remove(endpoint_id);
        match binding {
            Some(Binding::Domain(domain)) => {
                let mut routes = self.inner.routes.write().expect("routes lock");
                if routes
                    .get(&domain)
                    .is_some_and(|r| r.endpoint.id == endpoint_id)
                {
                    routes.remove(&domain);
                }
                true
            }
            Some(Binding::Port(token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops accepting, lets HTTP connections finish their requests and
    /// piped connections run, for at most `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.inner.stop_accepting.cancel();
        let graceful = self.inner.graceful.lock().expect("graceful lock").take();
        self.inner.tracker.close();
        let all_done = async {
            if let Some(graceful) = graceful {
                graceful.shutdown().await;
            }
            self.inner.tracker.wait().await;
        };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!(grace = ?grace, "drain grace period over; closing the remaining connections");
        }
    }
}

fn bind_tcp_port(config: &GatewayConfig, requested: u16) -> Result<TcpListener, Failure> {
    let bind = |port: u16| -> io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(config.tcp_bind_ip, port)),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(config.tcp_bind_ip, port).into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    let range = config.tcp_ports.clone();
    if requested != 0 {
        if !range.contains(&requested) {
            return Err(Failure::new(
                ErrorCode::TCP_PORT_UNAVAILABLE,
                format!(
                    "port {requested} is outside this edge's TCP range {}-{}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        return bind(requested).map_err(|e| {
            Failure::new(
                ErrorCode::TCP_PORT_UNAVAILABLE,
                format!("port {requested} is not available: {e}"),
            )
        });
    }
    let span = u32::from(*range.end()) - u32::from(*range.start()) + 1;
    let offset = rand::random::<u32>() % span;
    for i in 0..span.min(256) {
        let port = *range.start() as u32 + (offset + i) % span;
        if let Ok(listener) = bind(port as u16) {
            return Ok(listener);
        }
    }
    Err(Failure::new(
        ErrorCode::TCP_PORT_UNAVAILABLE,
        "no free port in this edge's TCP range",
    ))
}

/// Accepts until `token` is cancelled. Running out of file descriptors is
/// back-pressure: log, wait, keep serving what is open.
fn spawn_accept_loop<F, Fut>(
    inner: &Arc<Inner>,
    listener: TcpListener,
    token: CancellationToken,
    handler: F,
) where
    F: Fn(Arc<Inner>, TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inner = inner.clone();
    let tracker = inner.tracker.clone();
    tracker.spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, client)) => {
                    backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    inner.tracker.spawn(handler(inner.clone(), stream, client));
                }
                Err(e) => {
                    bump(&inner.stats.accept_errors);
                    if is_resource_exhaustion(&e) {
                        tracing::warn!(error = %e, backoff = ?backoff, "accept failed for lack of resources; backing off");
                        tokio::select! {
                            _ = token.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    } else {
                        tracing::debug!(error = %e, "accept failed");
                    }
                }
            }
        }
    });
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Pipes a visitor's connection into a data stream of the endpoint's agent.
async fn proxy_bytes<R, W>(
    endpoint: &Endpoint,
    reader: R,
    writer: W,
    prefix: Bytes,
    client: SocketAddr,
    local: SocketAddr,
    name: &str,
) -> Result<PipeOutcome, Failure>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: postern_proto::LocalWrite,
{
    let claimed = endpoint.source.claim().await?;
    let mut open = open_frame(endpoint, client, local, name);
    let prefix_len = prefix.len() as u64;
    open.data = prefix;
    let (outbound, pump) = pipe(reader, writer, claimed.inbound, vec![open]);
    claimed.attach.send(Box::pin(outbound)).map_err(|_| {
        Failure::new(
            ErrorCode::AGENT_FORWARD_FAILED,
            "the agent's data stream closed",
        )
    })?;
    let mut outcome = pump.run().await;
    tracing::debug!(?outcome, "connection finished");
    outcome.bytes_to_peer += prefix_len;
    Ok(outcome)
}

async fn serve_http_connection<IO>(inner: Arc<Inner>, io: IO, conn: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let pools: Arc<Mutex<HashMap<String, UpstreamPool>>> = Arc::default();
    let service_inner = inner.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let inner = service_inner.clone();
        let conn = conn.clone();
        let pools = pools.clone();
        async move {
            Ok::<_, std::convert::Infallible>(handle_request(&inner, &conn, &pools, req).await)
        }
    });
    let connection = inner
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let watched = match inner.graceful.lock().expect("graceful lock").as_ref() {
        Some(graceful) => graceful.watch(connection),
        None => return, // draining: do not start new connections
    };
    if let Err(e) = watched.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

async fn handle_request(
    inner: &Inner,
    conn: &ConnInfo,
    pools: &Mutex<HashMap<String, UpstreamPool>>,
    req: Request<Incoming>,
) -> http::Response<Counted<proxy::ProxyBody>> {
    bump(&inner.stats.http_requests);
    let host = proxy::request_host(&req).map(normalize_host);
    let shown_host = match &host {
        Some(Ok(h)) => h.as_str(),
        _ => "",
    };
    let mut record = HttpRecord::start(
        &inner.outcomes,
        &req,
        conn.client,
        conn.local,
        shown_host,
        conn.tls.as_ref(),
        conn.start,
    );
    let req = req.map(|body| Counted::new(body, record.request_body_stats()));
    let response = match host {
        Some(Ok(host)) => route_request(inner, conn, pools, &mut record, &host, req).await,
        Some(Err(e)) => proxy::error_response(&Failure::new(ErrorCode::BAD_HOST, e.to_string())),
        None => proxy::error_response(&Failure::new(ErrorCode::BAD_HOST, "no Host header")),
    };
    record.finish(response)
}

async fn route_request(
    inner: &Inner,
    conn: &ConnInfo,
    pools: &Mutex<HashMap<String, UpstreamPool>>,
    record: &mut HttpRecord,
    host: &str,
    req: Request<Counted<Incoming>>,
) -> http::Response<proxy::ProxyBody> {
    let (route, sni_route) = {
        let routes = inner.routes.read().expect("routes lock");
        let route = routes.lookup(host).cloned();
        let sni_route = conn.sni.as_deref().map(|sni| routes.lookup(sni).cloned());
        (route, sni_route)
    };
    let Some(route) = route.filter(|r| matches!(r.endpoint.kind, EndpointKind::Http)) else {
        return proxy::error_response(&Failure::new(ErrorCode::ENDPOINT_OFFLINE, host));
    };
    let postern = record.postern_mut();
    postern.endpoint_id = Some(route.endpoint.id.clone());
    postern.agent_session_id = Some(route.endpoint.source.session_id().to_string());
    if let Some(sni_route) = sni_route
        && !sni_route.is_some_and(|s| Arc::ptr_eq(&s, &route))
    {
        return proxy::error_response(&Failure::new(
            ErrorCode::MISDIRECTED_REQUEST,
            format!("SNI {:?} but Host {host}", conn.sni),
        ));
    }
    let identity_headers = match &route.mtls {
        Some(policy) => match client_identity(conn, policy) {
            Ok(identity) => {
                record.client_cert(&identity);
                identity.headers()
            }
            Err(failure) => return proxy::error_response(&failure),
        },
        None => Vec::new(),
    };
    let pool = match &route.shared_pool {
        Some(pool) => pool.clone(),
        None => pools
            .lock()
            .expect("pools lock")
            .entry(route.endpoint.id.clone())
            .or_insert_with(|| {
                UpstreamPool::new(
                    route.endpoint.id.clone(),
                    route.endpoint.source.clone(),
                    conn.client,
                    conn.local,
                    host.to_string(),
                )
            })
            .clone(),
    };
    proxy::forward(&route.endpoint, &pool, conn, host, identity_headers, req).await
}

/// The client certificate of a request to an mTLS endpoint. When SNI chose
/// the endpoint, the handshake already required and verified it; without
/// SNI the certificate the client offered is verified here.
fn client_identity(conn: &ConnInfo, policy: &MtlsPolicy) -> Result<ClientIdentity, Failure> {
    let required = |detail: &str| Failure::new(ErrorCode::MTLS_CERT_REQUIRED, detail.to_string());
    let chain = conn
        .peer_chain
        .as_ref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| required("no client certificate was presented"))?;
    if conn.sni.is_none() {
        let now = rustls::pki_types::UnixTime::now();
        policy
            .verify(&chain[0], &chain[1..], now)
            .map_err(|e| required(&format!("the client certificate was refused: {e}")))?;
    }
    ClientIdentity::of(&chain[0]).ok_or_else(|| required("the client certificate cannot be read"))
}

/// The fatal `unrecognized_name` alert (RFC 6066), sent before any
/// handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112];

async fn handle_tls_port(inner: Arc<Inner>, mut stream: TcpStream, client: SocketAddr) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let config = &inner.config;
    let mut buf = BytesMut::with_capacity(1024);
    let peeked = tokio::time::timeout(
        config.client_hello_timeout,
        read_client_hello(&mut stream, &mut buf, config.client_hello_max),
    )
    .await;
    let hello = match peeked {
        Err(_) => {
            bump(&inner.stats.tls_client_hello_timeout);
            return;
        }
        Ok(Err(e)) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                bump(&inner.stats.tls_bad_client_hello);
                tracing::debug!(%client, error = %e, "bad ClientHello");
            }
            return;
        }
        Ok(Ok(hello)) => hello,
    };
    let Some(name) = hello.server_name else {
        bump(&inner.stats.tls_no_sni);
        match inner.no_sni_tls.clone() {
            // Serve HTTP with the default certificate; routing is by Host.
            Some(config) => {
                let start = SystemTime::now();
                if let Some(tls) = accept_tls(&inner, config, buf.freeze(), stream).await {
                    let conn = ConnInfo::tls(client, local, None, tls.get_ref().1, start);
                    serve_http_connection(inner.clone(), tls, conn).await;
                }
            }
            None => {
                let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            }
        }
        return;
    };
    let route = inner
        .routes
        .read()
        .expect("routes lock")
        .lookup(&name)
        .cloned();
    let Some(route) = route else {
        bump(&inner.stats.tls_unknown_sni);
        let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let prefix = buf.freeze();
    let endpoint = &route.endpoint;
    let start = SystemTime::now();
    let result = match (&endpoint.kind, route.termination.clone()) {
        (EndpointKind::Http, Some(config)) => {
            let Some(tls) = accept_tls(&inner, config, prefix, stream).await else {
                return;
            };
            let conn = ConnInfo::tls(client, local, Some(name), tls.get_ref().1, start);
            serve_http_connection(inner.clone(), tls, conn).await;
            return;
        }
        (EndpointKind::Tls { .. }, Some(config)) => {
            let Some(tls) = accept_tls(&inner, config, prefix, stream).await else {
                return;
            };
            let (r, w) = tokio::io::split(tls);
            proxy_bytes(endpoint, r, w, Bytes::new(), client, local, &name).await
        }
        (EndpointKind::Tls { .. }, None) => {
            let (r, w) = stream.into_split();
            proxy_bytes(endpoint, r, w, prefix, client, local, &name).await
        }
        _ => return,
    };
    let ids = (endpoint.id.as_str(), endpoint.source.session_id());
    outcome::tcp_closed(
        &inner.outcomes,
        client,
        local,
        &name,
        start,
        "tls",
        Some(ids),
        &result,
    );
    if let Err(e) = result {
        tracing::debug!(endpoint = %endpoint.id, error = %e, "TLS connection not proxied");
    }
}

async fn accept_tls(
    inner: &Inner,
    config: Arc<ServerConfig>,
    prefix: Bytes,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
    let io = Prefixed {
        prefix,
        inner: stream,
    };
    let accept = TlsAcceptor::from(config).accept(io).into_fallible();
    match tokio::time::timeout(inner.config.tls_handshake_timeout, accept).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err((e, mut io))) => {
            bump(&inner.stats.tls_handshake_failed);
            tracing::debug!(error = %e, "TLS handshake failed");
            // The alert is written; close gently so it is not lost to a
            // reset (a TLS 1.3 client may already have sent its request).
            let _ = io.shutdown().await;
            let mut sink = tokio::io::sink();
            let drain = tokio::io::copy(&mut io, &mut sink);
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            None
        }
        Err(_) => {
            bump(&inner.stats.tls_handshake_failed);
            None
        }
    }
}

/// Reads until `buf` holds a whole ClientHello.
async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<sni::ClientHello> {
    loop {
        match sni::peek_client_hello(buf, max) {
            Ok(Peek::Complete(hello)) => return Ok(hello),
            Ok(Peek::Incomplete) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let room = max.saturating_sub(buf.len()).min(4096);
        buf.reserve(room);
        let read = stream.read_buf(&mut (&mut *buf).limit(room)).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

use bytes::BufMut;

/// A stream that first replays bytes already read from it.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
