//! The public side of an edge node: its settings, the listeners it serves
//! and drain. The jobs live in the files under `gateway/`: the route table
//! (`routes`), the accept loop (`listener`), the TLS port's SNI dispatch
//! (`tls_port`), TCP endpoints and piping (`tcp`), HTTP serving through
//! each endpoint's policy (`serve_http`). Everything it counts goes to
//! the one [`Metrics`].

mod listener;
mod routes;
mod serve_http;
mod tcp;
mod tls_port;

use listener::{SHED_RESPONSE, spawn_accept_loop};
use routes::{Binding, TcpRoute};
use serve_http::serve_http_connection;
use tcp::{Visitor, on_connect, proxy_bytes};
use tls_port::handle_tls_port;

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use postern_events::Decision;
use postern_net::{
    AcceptEvents, AcceptLoop, Accepted, ConnectionLimit, IpPolicy, MtlsPolicy, Prefixed,
    RequestClientCert, RequireClientCert, Shed, TrustedProxies, random_id, random_label,
};
use postern_proto::{ErrorCode, Failure, PipeOutcome, pipe};
use rustls::{ServerConfig, server::danger::ClientCertVerifier, sign::CertifiedKey};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    acme_challenge::{ACME_TLS_ALPN, AcmeChallenges},
    endpoint::{Endpoint, EndpointKind, Location, ServedBy, StreamSource, TerminateAt, open_frame},
    http::{self as proxy, ConnInfo, Tracked, UpstreamPool, Upstreams, VisitorBody},
    metrics::{Counter, Metrics},
    oauth::{IdpHttp, OAuthEndpoint, OAuthService},
    outcome::{self, ConnRecord, Counted, HttpRecord, Outcomes},
    policy::{
        ConnFacts, Document, EndpointFacts, InternalMiss, InternalRoutes, LocalRates, Modules,
        Phase, PolicyEnv, RateStore, RequestCx, ResponseCx, Scratch, TlsFacts, TrafficPolicy,
    },
    route::{Forwarding, Member, Pool, Route},
    router::{DomainPattern, Router, normalize_host},
    sni::{self, Peek},
    tls::{
        CertStore, FixedNameResolver, StoreResolver, build_server_config, server_config,
        single_cert_config,
    },
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
    /// Visitor connections open at once; past it, new ones are shed.
    pub max_connections: usize,
    /// Largest HTTP/1 request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Most HTTP/1 request headers.
    pub max_headers: usize,
    /// HTTP/2: concurrent streams per connection, and flow-control windows.
    pub h2_max_concurrent_streams: u32,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// TCP and TLS endpoint connections with no byte either way for this
    /// long are closed.
    pub idle_timeout: Duration,
    /// Load balancers in front of the edge.
    pub trusted_proxies: TrustedProxies,
    /// OAuth/OIDC: the session store, the auth host and its callback.
    pub oauth: Option<Arc<OAuthService>>,
    /// Where traffic policies' rate limits count: this node's memory when
    /// `None`.
    pub rate_store: Option<Arc<dyn RateStore>>,
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
            max_connections: 20_000,
            max_header_bytes: 60 * 1024,
            max_headers: HYPER_MAX_HEADERS,
            h2_max_concurrent_streams: 100,
            h2_stream_window: 64 * 1024,
            h2_connection_window: 1024 * 1024,
            idle_timeout: Duration::from_secs(3600),
            trusted_proxies: TrustedProxies::default(),
            oauth: None,
            rate_store: None,
        }
    }
}

/// What an agent asks to bind, after the edge has checked it is allowed.
pub struct EndpointSpec {
    /// The endpoint's id; `None` makes a new one. An endpoint served
    /// through another node keeps the id it has there.
    pub id: Option<String>,
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
    /// Who may connect, by address.
    pub ip_policy: Option<Arc<IpPolicy>>,
    /// Log visitors in with OAuth/OIDC (HTTP endpoints).
    pub oauth: Option<Arc<OAuthEndpoint>>,
    /// ngrok's other HTTP modules the agent asked for.
    pub http_modules: Option<postern_proto::pb::HttpModules>,
    /// HTTP endpoints: requests go to the upstream as HTTP/2.
    pub upstream_http2: bool,
    /// The agent's traffic policy.
    pub traffic_policy: Option<Document>,
    /// The operator's traffic policy for the domain: runs first, and the
    /// agent cannot change it.
    pub operator_policy: Option<Document>,
    /// Pooling (ngrok's `pooling_enabled`): endpoints with the same key
    /// share a name or port and its traffic. The key stands for the
    /// settings above, which all endpoints of a pool must share.
    pub pool_key: Option<String>,
    /// The node whose agent serves it, when not this one.
    pub remote: Option<Location>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tls,
    Tcp,
}

struct Inner {
    config: GatewayConfig,
    /// Shared with every request's record, which keeps it to the end.
    outcomes: Arc<Outcomes>,
    certs: Arc<CertStore>,
    http_tls: Arc<ServerConfig>,
    tls_edge: Arc<ServerConfig>,
    /// For handshakes without SNI: the default certificate, and a client
    /// certificate asked for (mTLS is then decided per request).
    no_sni_tls: Option<Arc<ServerConfig>>,
    routes: RwLock<Router<Arc<Route>>>,
    /// HTTP endpoints on `.internal` names: never routed from a listener,
    /// reached only through `forward-internal`.
    internal: RwLock<Router<Arc<Route>>>,
    tcp_routes: Mutex<HashMap<u16, TcpRoute>>,
    bindings: Mutex<HashMap<String, Binding>>,
    http: auto::Builder<Tracked>,
    graceful: Mutex<Option<GracefulShutdown>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    /// Visitor connections open now, and the cap.
    connections: Arc<ConnectionLimit>,
    rates: Arc<dyn RateStore>,
    /// For JWKS: the OAuth client (its extra roots) or a plain one.
    http_client: IdpHttp,
    /// ACME challenges: HTTP-01 answered on the plain-HTTP listener,
    /// TLS-ALPN-01 on the HTTPS/TLS port.
    acme: Arc<AcmeChallenges>,
}

impl Inner {
    /// Counts one `counter` in the gateway's metrics.
    fn count(&self, counter: Counter) {
        self.outcomes.metrics.count(counter);
    }

    /// Counts a visitor an IP restriction refused.
    fn count_ip_denial(&self, decision: Option<Decision>) {
        if decision == Some(Decision::Block) {
            self.count(Counter::IpDenied);
        }
    }
}

/// hyper's HTTP/1.1 header limit when none is set (`max_headers`), and
/// the gateway's default.
const HYPER_MAX_HEADERS: usize = 100;

/// The public side of one edge node. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    pub fn new(config: GatewayConfig, certs: Arc<CertStore>, outcomes: Outcomes) -> Gateway {
        let tracker = TaskTracker::new();
        let mut http = auto::Builder::new(Tracked(tracker.clone()));
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192));
        // hyper's own limit is the default, 100, kept in arrays sized at
        // build time; another limit makes it size them for every request
        // (~1,700 instructions a request, counted with callgrind).
        if config.max_headers != HYPER_MAX_HEADERS {
            http.http1().max_headers(config.max_headers);
        }
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(config.h2_max_concurrent_streams)
            .initial_stream_window_size(config.h2_stream_window)
            .initial_connection_window_size(config.h2_connection_window)
            .max_header_list_size(config.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let rates = config
            .rate_store
            .clone()
            .unwrap_or_else(|| Arc::new(LocalRates::default()));
        let http_client = match &config.oauth {
            Some(oauth) => oauth.http().clone(),
            None => IdpHttp::new(&[], Duration::from_secs(10)),
        };
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
                connections: ConnectionLimit::new(config.max_connections),
                certs,
                config,
                outcomes: Arc::new(outcomes),
                routes: RwLock::new(Router::default()),
                internal: RwLock::new(Router::default()),
                tcp_routes: Mutex::new(HashMap::new()),
                bindings: Mutex::new(HashMap::new()),
                http,
                graceful: Mutex::new(Some(GracefulShutdown::new())),
                tracker,
                stop_accepting: CancellationToken::new(),
                rates,
                http_client,
                acme: Arc::default(),
            }),
        }
    }

    /// Requests and connections by endpoint.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.outcomes.metrics
    }

    /// Visitor connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.connections.open()
    }

    /// The public side's settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn certs(&self) -> &Arc<CertStore> {
        &self.inner.certs
    }

    /// The ACME challenges the listeners answer.
    pub fn acme_challenges(&self) -> &Arc<AcmeChallenges> {
        &self.inner.acme
    }

    /// Serves plain HTTP on `listener` until drain.
    pub fn serve_http(&self, listener: TcpListener) {
        spawn_accept_loop(
            &self.inner,
            "http",
            listener,
            &self.inner.stop_accepting,
            Shed::Reply(SHED_RESPONSE),
            |inner, accepted| async move {
                // Move it whole: the connection slot must live as long as
                // the connection (a closure captures only the fields used).
                let accepted = accepted;
                let conn = ConnInfo {
                    client: accepted.client,
                    local: accepted.local,
                    sni: None,
                    tls: None,
                    peer_chain: None,
                    client_identity: None,
                    start: SystemTime::now(),
                };
                let io = Prefixed::new(accepted.prefix, accepted.stream);
                serve_http_connection(inner, io, conn).await;
            },
        );
    }

    /// Serves HTTPS and SNI-routed TLS endpoints on `listener` until drain.
    pub fn serve_https(&self, listener: TcpListener) {
        spawn_accept_loop(
            &self.inner,
            "https",
            listener,
            &self.inner.stop_accepting,
            Shed::Close,
            handle_tls_port,
        );
    }

    /// Stops accepting, lets HTTP connections finish their requests and
    /// piped connections run, for at most `grace`; whether all of them
    /// finished within it.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.stop_accepting.cancel();
        let graceful = self.inner.graceful.lock().expect("graceful lock").take();
        self.inner.tracker.close();
        let all_done = async {
            if let Some(graceful) = graceful {
                graceful.shutdown().await;
            }
            self.inner.tracker.wait().await;
        };
        let within = tokio::time::timeout(grace, all_done).await.is_ok();
        if !within {
            tracing::warn!(grace = ?grace, "drain grace period over; closing the remaining connections");
        }
        within
    }
}
