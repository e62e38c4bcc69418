//! The public side of an edge node: the HTTP and HTTPS/TLS listeners, the
//! per-endpoint TCP listeners, the route table, and drain.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
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
    endpoint::{Endpoint, EndpointKind, Location, ServedBy, StreamSource, TerminateAt, open_frame},
    http::{self as proxy, ConnInfo, UpstreamPool, VisitorBody},
    metrics::Metrics,
    oauth::{IdpHttp, OAuthEndpoint, OAuthService},
    outcome::{self, ConnRecord, Counted, HttpRecord, Outcomes},
    policy::{
        ConnFacts, Document, EndpointFacts, InternalMiss, InternalRoutes, LocalRates, Modules,
        Phase, PolicyEnv, RateStore, RequestCx, ResponseCx, Scratch, TlsFacts, TrafficPolicy,
    },
    route::{Member, Pool, Route},
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
            max_headers: 100,
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

/// Counters of the public side.
#[derive(Debug, Default)]
pub struct Stats {
    pub tls_no_sni: AtomicU64,
    pub tls_unknown_sni: AtomicU64,
    pub tls_bad_client_hello: AtomicU64,
    pub tls_client_hello_timeout: AtomicU64,
    pub tls_handshake_failed: AtomicU64,
    /// Handshakes refused for a missing or bad client certificate (mTLS).
    pub tls_bad_client_cert: AtomicU64,
    pub accept_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub tcp_connections: AtomicU64,
    /// New connections closed because the edge was at its connection cap.
    pub shed_connections: AtomicU64,
    /// Connections or requests refused by an IP restriction.
    pub ip_denied: AtomicU64,
    /// Bad or missing PROXY headers from trusted load balancers.
    pub bad_proxy_headers: AtomicU64,
    /// TCP/TLS endpoint connections closed for being idle.
    pub idle_closed: AtomicU64,
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
            ("tls_bad_client_cert", get(&self.tls_bad_client_cert)),
            ("accept_errors", get(&self.accept_errors)),
            ("http_requests", get(&self.http_requests)),
            ("tcp_connections", get(&self.tcp_connections)),
            ("shed_connections", get(&self.shed_connections)),
            ("ip_denied", get(&self.ip_denied)),
            ("bad_proxy_headers", get(&self.bad_proxy_headers)),
            ("idle_closed", get(&self.idle_closed)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Where an endpoint is bound, by id.
struct Binding {
    endpoint: Arc<Endpoint>,
    place: Place,
}

enum Place {
    Domain(DomainPattern),
    /// A `.internal` name.
    Internal(DomainPattern),
    Port(u16),
}

/// Whether a name is an internal endpoint's (`*.internal`), reachable only
/// through `forward-internal`.
fn is_internal(domain: &DomainPattern) -> bool {
    let name = match domain {
        DomainPattern::Exact(name) => name.as_str(),
        DomainPattern::Wildcard(suffix) => suffix.as_str(),
    };
    name == "internal" || name.ends_with(".internal")
}

/// A TCP endpoint's port: its route and the switch of its listener.
struct TcpRoute {
    route: Arc<Route>,
    stop: CancellationToken,
}

/// Whether an endpoint may join the pool already serving its name or port:
/// both pool, with the same settings.
fn joinable(
    route: &Route,
    spec: &EndpointSpec,
    kind: &EndpointKind,
    place: &str,
) -> Result<(), Failure> {
    match (&route.pool_key, &spec.pool_key) {
        (Some(theirs), Some(ours)) if theirs == ours && route.kind == *kind => Ok(()),
        (Some(_), Some(_)) => Err(Failure::new(
            ErrorCode::ENDPOINT_ALREADY_BOUND,
            format!(
                "{place} is already bound by a pool of endpoints with other settings; \
                 every endpoint of a pool needs the same protocol and settings"
            ),
        )),
        _ => Err(Failure::new(
            ErrorCode::ENDPOINT_ALREADY_BOUND,
            format!(
                "{place} is already bound by another agent session; to share it, \
                 start every endpoint on it with pooling enabled"
            ),
        )),
    }
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
    /// HTTP endpoints on `.internal` names: never routed from a listener,
    /// reached only through `forward-internal`.
    internal: RwLock<Router<Arc<Route>>>,
    tcp_routes: Mutex<HashMap<u16, TcpRoute>>,
    bindings: Mutex<HashMap<String, Binding>>,
    http: auto::Builder<TokioExecutor>,
    graceful: Mutex<Option<GracefulShutdown>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    stats: Stats,
    /// Visitor connections open now, and the cap.
    connections: Arc<ConnectionLimit>,
    rates: Arc<dyn RateStore>,
    /// For JWKS: the OAuth client (its extra roots) or a plain one.
    http_client: IdpHttp,
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
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .max_headers(config.max_headers);
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
                outcomes,
                routes: RwLock::new(Router::default()),
                internal: RwLock::new(Router::default()),
                tcp_routes: Mutex::new(HashMap::new()),
                bindings: Mutex::new(HashMap::new()),
                http,
                graceful: Mutex::new(Some(GracefulShutdown::new())),
                tracker: TaskTracker::new(),
                stop_accepting: CancellationToken::new(),
                stats: Stats::default(),
                rates,
                http_client,
            }),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Requests and connections by endpoint.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.outcomes.metrics
    }

    /// Visitor connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.connections.open()
    }

    pub fn certs(&self) -> &Arc<CertStore> {
        &self.inner.certs
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

    /// Adds an endpoint served by `source`: a new route, or a new member
    /// of the pool of endpoints already serving its name or port when both
    /// pool with the same settings.
    pub fn add(
        &self,
        spec: EndpointSpec,
        source: Arc<dyn StreamSource>,
    ) -> Result<Arc<Endpoint>, Failure> {
        let id = spec.id.clone().unwrap_or_else(|| random_id("ep_"));
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
        let domain = match spec.domain.clone() {
            Some(domain) => domain,
            None => {
                let base = config.random_domain_base.as_ref().ok_or_else(|| {
                    Failure::new(
                        ErrorCode::INVALID_BIND,
                        "a domain is required: this edge assigns no random names",
                    )
                })?;
                DomainPattern::Exact(format!("{}.{base}", random_label()))
            }
        };
        let internal = is_internal(&domain);
        if internal && spec.protocol != Protocol::Http {
            return Err(Failure::new(
                ErrorCode::INVALID_BIND,
                format!("{domain}: only HTTP endpoints can be internal in Postern"),
            ));
        }
        let port = match config.https_public_port {
            443 => String::new(),
            _ if internal => String::new(),
            p => format!(":{p}"),
        };
        let kind = match spec.protocol {
            Protocol::Http => EndpointKind::Http,
            _ => EndpointKind::Tls {
                terminate_at: spec.terminate_at,
            },
        };
        let endpoint = Arc::new(Endpoint {
            public_url: format!("{}://{domain}{port}", kind.scheme()),
            id: id.clone(),
            name: spec.name.clone(),
            kind,
            source,
            remote: spec.remote.clone(),
        });
        let table = if internal {
            &self.inner.internal
        } else {
            &self.inner.routes
        };
        let mut routes = table.write().expect("routes lock");
        let route = match routes.get(&domain) {
            Some(route) => {
                joinable(route, &spec, &endpoint.kind, &domain.to_string())?;
                route.clone()
            }
            None => {
                let route = self.new_route(&endpoint.kind, &spec)?;
                // A fresh pattern: inserting cannot collide.
                let _ = routes.insert(&domain, route.clone());
                route
            }
        };
        let shared_pool = (spec.protocol == Protocol::Http && !spec.proxy_proto).then(|| {
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            UpstreamPool::new(
                endpoint.clone(),
                Arc::downgrade(&route.pool),
                unspecified,
                unspecified,
                domain.to_string(),
            )
        });
        route.pool.add(Member::new(endpoint.clone(), shared_pool));
        drop(routes);
        self.inner.bindings.lock().expect("bindings lock").insert(
            id,
            Binding {
                endpoint: endpoint.clone(),
                place: if internal {
                    Place::Internal(domain)
                } else {
                    Place::Domain(domain)
                },
            },
        );
        Ok(endpoint)
    }

    /// A route with the settings of its first endpoint and no member yet:
    /// its TLS termination and its compiled traffic policy.
    fn new_route(&self, kind: &EndpointKind, spec: &EndpointSpec) -> Result<Arc<Route>, Failure> {
        let modules = Modules {
            ip_restriction: spec.ip_policy.as_deref().cloned(),
            mutual_tls: spec.mutual_tls.clone(),
            oauth: spec.oauth.clone(),
        };
        let env = PolicyEnv {
            http: *kind == EndpointKind::Http,
            rates: self.inner.rates.clone(),
            http_client: self.inner.http_client.clone(),
            oauth: self.inner.config.oauth.clone(),
        };
        let policy = TrafficPolicy::build(
            spec.operator_policy.clone(),
            modules,
            spec.traffic_policy.clone(),
            &env,
        )
        .map_err(|e| e.failure())?;
        Ok(Arc::new(Route {
            kind: kind.clone(),
            pool_key: spec.pool_key.clone(),
            termination: self.termination(kind, spec.certificate.clone(), spec.mutual_tls.clone()),
            policy,
            pool: Pool::new(self.inner.outcomes.region.as_str().into()),
        }))
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
        let mut tcp_routes = self.inner.tcp_routes.lock().expect("tcp routes lock");
        let joined = match tcp_routes.get(&spec.remote_port) {
            Some(existing) if spec.remote_port != 0 => {
                let kind = EndpointKind::Tcp {
                    port: spec.remote_port,
                };
                let address = format!("port {}", spec.remote_port);
                joinable(&existing.route, &spec, &kind, &address)?;
                Some(existing.route.clone())
            }
            _ => None,
        };
        let (route, port) = match joined {
            Some(route) => (route, spec.remote_port),
            None => {
                let listener = bind_tcp_port(config, spec.remote_port)?;
                let port = listener
                    .local_addr()
                    .map(|a| a.port())
                    .unwrap_or(spec.remote_port);
                let route = self.new_route(&EndpointKind::Tcp { port }, &spec)?;
                let stop = self.inner.stop_accepting.child_token();
                tcp_routes.insert(
                    port,
                    TcpRoute {
                        route: route.clone(),
                        stop: stop.clone(),
                    },
                );
                self.serve_tcp(listener, route.clone(), stop);
                (route, port)
            }
        };
        let endpoint = Arc::new(Endpoint {
            id: id.clone(),
            name: spec.name,
            kind: EndpointKind::Tcp { port },
            public_url: format!("tcp://{}:{port}", config.tcp_public_host),
            source,
            remote: spec.remote,
        });
        route.pool.add(Member::new(endpoint.clone(), None));
        drop(tcp_routes);
        self.inner.bindings.lock().expect("bindings lock").insert(
            id,
            Binding {
                endpoint: endpoint.clone(),
                place: Place::Port(port),
            },
        );
        Ok(endpoint)
    }

    /// Accepts visitors of a TCP endpoint until `stop`.
    fn serve_tcp(&self, listener: TcpListener, route: Arc<Route>, stop: CancellationToken) {
        spawn_accept_loop(
            &self.inner,
            "tcp endpoint",
            listener,
            &stop,
            Shed::Close,
            move |inner, accepted| {
                let route = route.clone();
                async move {
                    let accepted = accepted;
                    bump(&inner.stats.tcp_connections);
                    let Some(first) = route.pool.pick(&[]) else {
                        return;
                    };
                    let mut record = ConnRecord {
                        client: accepted.client,
                        server: accepted.local,
                        name: "",
                        start: SystemTime::now(),
                        proto: "tcp",
                        endpoint: first.endpoint.clone(),
                        ip_decision: None,
                        logs: Vec::new(),
                    };
                    let admitted = on_connect(&inner, &route, &mut record);
                    let span = record.span();
                    let result = if let Err(refused) = admitted {
                        Err(refused)
                    } else {
                        let (r, w) = accepted.stream.into_split();
                        let visitor = Visitor {
                            client: accepted.client,
                            local: accepted.local,
                            name: "",
                        };
                        proxy_bytes(
                            &inner,
                            &route,
                            first,
                            &mut record,
                            r,
                            w,
                            accepted.prefix,
                            &visitor,
                        )
                        .instrument(span.clone())
                        .await
                    };
                    outcome::tcp_closed(&inner.outcomes, &record, &span, &result);
                    if let Err(e) = result {
                        tracing::debug!(endpoint = %record.endpoint.id, error = %e, "TCP connection not proxied");
                    }
                }
            },
        );
    }

    /// A bound endpoint by id.
    pub fn endpoint(&self, id: &str) -> Option<Arc<Endpoint>> {
        let bindings = self.inner.bindings.lock().expect("bindings lock");
        bindings.get(id).map(|b| b.endpoint.clone())
    }

    /// The bound endpoints: this node's agents' and, in a cluster, those
    /// served through other nodes.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        let bindings = self.inner.bindings.lock().expect("bindings lock");
        bindings.values().map(|b| b.endpoint.clone()).collect()
    }

    /// Removes an endpoint; a name or port whose last endpoint goes is
    /// routed no more (a TCP listener stops at once); connections in
    /// flight keep going until they end.
    pub fn remove(&self, endpoint_id: &str) -> bool {
        let binding = self
            .inner
            .bindings
            .lock()
            .expect("bindings lock")
            .remove(endpoint_id);
        match binding.map(|b| b.place) {
            Some(Place::Domain(domain)) => {
                remove_named(&self.inner.routes, &domain, endpoint_id);
                true
            }
            Some(Place::Internal(domain)) => {
                remove_named(&self.inner.internal, &domain, endpoint_id);
                true
            }
            Some(Place::Port(port)) => {
                let mut tcp_routes = self.inner.tcp_routes.lock().expect("tcp routes lock");
                if let Some(tcp) = tcp_routes.get(&port)
                    && !tcp.route.pool.remove(endpoint_id)
                {
                    tcp.stop.cancel();
                    tcp_routes.remove(&port);
                }
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

/// Takes an endpoint out of the pool serving `domain` in `table`; the name
/// is routed no more when it was the last one.
fn remove_named(table: &RwLock<Router<Arc<Route>>>, domain: &DomainPattern, endpoint_id: &str) {
    let mut routes = table.write().expect("routes lock");
    if let Some(route) = routes.get(domain)
        && !route.pool.remove(endpoint_id)
    {
        routes.remove(domain);
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

/// What a plain-HTTP connection over the edge's cap gets.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
ngrok-error-code: ERR_POSTERN_9003\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

impl AcceptEvents for Inner {
    fn accept_failed(&self) {
        bump(&self.stats.accept_errors);
    }

    fn shed(&self) {
        bump(&self.stats.shed_connections);
    }

    fn bad_proxy_header(&self) {
        bump(&self.stats.bad_proxy_headers);
    }
}

/// Accepts on a public listener until `token` is cancelled, through
/// `postern-net`'s loop: past the connection cap new connections are shed,
/// trusted load balancers' PROXY headers are read, and the gateway counts.
fn spawn_accept_loop<F, Fut>(
    inner: &Arc<Inner>,
    name: &'static str,
    listener: TcpListener,
    token: &CancellationToken,
    shed: Shed,
    handler: F,
) where
    F: Fn(Arc<Inner>, Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let owner = inner.clone();
    AcceptLoop::new(name, &inner.tracker, token)
        .cap(&inner.connections, shed)
        .proxy_headers(
            &inner.config.trusted_proxies,
            inner.config.client_hello_timeout,
        )
        .events(inner.clone())
        .spawn(listener, move |accepted| handler(owner.clone(), accepted));
}

/// Runs a TCP or TLS endpoint's `on_tcp_connect` rules for a new
/// connection; an `Err` closes it. The record gets the IP verdict and the
/// policy's logs.
fn on_connect(inner: &Inner, route: &Route, record: &mut ConnRecord<'_>) -> Result<(), Failure> {
    if !route.policy.has(Phase::Connect) {
        return Ok(());
    }
    let conn = ConnFacts {
        client: record.client,
        server: record.server,
        region: inner.outcomes.region.as_str().into(),
        start: record.start,
        tls: (!record.name.is_empty()).then(|| TlsFacts {
            sni: Some(record.name.to_string()),
            ..Default::default()
        }),
    };
    let verdict = route
        .policy
        .on_connect(&conn, &EndpointFacts::of(&record.endpoint));
    record.ip_decision = verdict.ip_decision;
    record.logs = verdict.logs;
    count_ip_denial(inner, verdict.ip_decision);
    verdict.result
}

/// Counts a visitor an IP restriction refused.
fn count_ip_denial(inner: &Inner, decision: Option<Decision>) {
    if decision == Some(Decision::Block) {
        bump(&inner.stats.ip_denied);
    }
}

/// Who a piped connection is from and for.
struct Visitor<'a> {
    client: SocketAddr,
    local: SocketAddr,
    /// The SNI, for TLS endpoints.
    name: &'a str,
}

/// Pipes a visitor's connection into a data stream of `first`'s agent, or
/// of another endpoint of the pool when that agent is gone; the record
/// names the endpoint that served.
#[allow(clippy::too_many_arguments)]
async fn proxy_bytes<R, W>(
    inner: &Inner,
    route: &Route,
    first: Arc<Member>,
    record: &mut ConnRecord<'_>,
    reader: R,
    writer: W,
    prefix: Bytes,
    visitor: &Visitor<'_>,
) -> Result<PipeOutcome, Failure>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: postern_proto::LocalWrite,
{
    let (member, claimed) = route.pool.claim(first).await?;
    record.served_by(&member.endpoint);
    let _permit = claimed.permit;
    let mut open = open_frame(
        &member.endpoint,
        visitor.client,
        visitor.local,
        visitor.name,
    );
    let prefix_len = prefix.len() as u64;
    open.data = prefix;
    let (outbound, pump) = pipe(reader, writer, claimed.inbound, vec![open]);
    claimed.attach.send(Box::pin(outbound)).map_err(|_| {
        Failure::new(
            ErrorCode::AGENT_FORWARD_FAILED,
            "the agent's data stream closed",
        )
    })?;
    let mut outcome = pump.run_with_idle_timeout(inner.config.idle_timeout).await;
    if matches!(&outcome.inbound, postern_proto::End::Aborted(reason) if reason.starts_with("idle"))
    {
        bump(&inner.stats.idle_closed);
    }
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
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client_ip = inner
        .config
        .trusted_proxies
        .http_client(conn.client, forwarded_for);
    let mut record = HttpRecord::start(
        &inner.outcomes,
        &req,
        SocketAddr::new(client_ip, conn.client.port()),
        conn.local,
        shown_host,
        conn.tls.as_ref(),
        conn.start,
    );
    let malformed = proxy::malformed(&req);
    let req = req.map(|body| Counted::new(body, record.request_body_stats()));
    let span = record.span().clone();
    let response = async {
        match (host, malformed) {
            (_, Some(failure)) => proxy::close_after(proxy::error_response(&failure)),
            (Some(Ok(host)), None) => match &inner.config.oauth {
                Some(oauth) if oauth.is_auth_host(&host) => {
                    auth_host_request(oauth, conn, &host, &req).await
                }
                _ => route_request(inner, conn, pools, &mut record, client_ip, &host, req).await,
            },
            (Some(Err(e)), None) => proxy::close_after(proxy::error_response(&Failure::new(
                ErrorCode::BAD_HOST,
                e.to_string(),
            ))),
            (None, None) => proxy::close_after(proxy::error_response(&Failure::new(
                ErrorCode::BAD_HOST,
                "no Host header",
            ))),
        }
    }
    .instrument(span)
    .await;
    record.finish(response)
}

#[allow(clippy::too_many_arguments)]
async fn route_request(
    inner: &Inner,
    conn: &ConnInfo,
    pools: &Mutex<HashMap<String, UpstreamPool>>,
    record: &mut HttpRecord,
    client_ip: IpAddr,
    host: &str,
    req: Request<Counted<Incoming>>,
) -> http::Response<proxy::ProxyBody> {
    let (route, sni_route) = {
        let routes = inner.routes.read().expect("routes lock");
        let route = routes.lookup(host).cloned();
        let sni_route = conn.sni.as_deref().map(|sni| routes.lookup(sni).cloned());
        (route, sni_route)
    };
    let Some((route, member)) = route
        .filter(|r| matches!(r.kind, EndpointKind::Http))
        .and_then(|r| Some((r.clone(), r.pool.pick(&[])?)))
    else {
        return proxy::error_response(&Failure::new(ErrorCode::ENDPOINT_OFFLINE, host));
    };
    record.served_by(&member.endpoint);
    if let Some(sni_route) = sni_route
        && !sni_route.is_some_and(|s| Arc::ptr_eq(&s, &route))
    {
        return proxy::error_response(&Failure::new(
            ErrorCode::MISDIRECTED_REQUEST,
            format!("SNI {:?} but Host {host}", conn.sni),
        ));
    }
    let mut req = req.map(VisitorBody::Streamed);
    proxy::strip_reserved(req.headers_mut());
    let visit = Visit {
        inner,
        conn,
        pools,
        client_ip,
        host,
        hops: 0,
    };
    visit.serve(&route, member, req, record).await
}

/// Internal endpoints a request may be forwarded through before it is a
/// loop (ngrok's `forward-internal` guard).
const MAX_HOPS: u8 = 3;

/// One visitor request being served: what a route's policy and the
/// forwarding need, and how many internal hops it has taken.
struct Visit<'a> {
    inner: &'a Inner,
    conn: &'a ConnInfo,
    pools: &'a Mutex<HashMap<String, UpstreamPool>>,
    client_ip: IpAddr,
    /// The routed name the visitor asked for.
    host: &'a str,
    hops: u8,
}

impl Visit<'_> {
    /// Runs `route`'s policy on the request and forwards it to `member`.
    async fn serve(
        &self,
        route: &Route,
        member: Arc<Member>,
        mut req: Request<VisitorBody>,
        record: &mut HttpRecord,
    ) -> http::Response<proxy::ProxyBody> {
        let (inner, conn, host) = (self.inner, self.conn, self.host);
        let policy = &route.policy;
        let facts = (!policy.is_empty()).then(|| {
            let conn_facts = ConnFacts {
                client: SocketAddr::new(self.client_ip, conn.client.port()),
                server: conn.local,
                region: inner.outcomes.region.as_str().into(),
                start: conn.start,
                tls: conn.tls.as_ref().map(|tls| TlsFacts {
                    sni: conn.sni.clone(),
                    version: tls.version.clone(),
                    cipher_suite: tls.cipher_suite.clone(),
                    peer_chain: conn.peer_chain.clone(),
                    client: conn.client_identity.clone(),
                }),
            };
            (conn_facts, EndpointFacts::of(&member.endpoint))
        });
        let scheme = if conn.tls.is_some() { "https" } else { "http" };
        let mut scratch = Scratch::default();
        let mut head = None;
        if let Some((conn_facts, endpoint_facts)) = &facts {
            let mut cx = RequestCx {
                req: &mut req,
                conn: conn_facts,
                endpoint: endpoint_facts,
                scheme,
                host,
                record,
                scratch: &mut scratch,
                internal: self,
            };
            let stop = policy.on_request(&mut cx).await;
            count_ip_denial(inner, record.ip_decision_made());
            match stop {
                Ok(None) => {}
                Ok(Some(response)) => {
                    record.policy_logs(scratch.logs);
                    return response;
                }
                Err(failure) => {
                    record.policy_logs(scratch.logs);
                    return proxy::error_response(&failure);
                }
            }
            if policy.has(Phase::Response) {
                head = Some(request_head(&req));
            }
        }
        let pool = match &member.shared_pool {
            Some(pool) => pool.clone(),
            None => self
                .pools
                .lock()
                .expect("pools lock")
                .entry(member.endpoint.id.clone())
                .or_insert_with(|| {
                    UpstreamPool::new(
                        member.endpoint.clone(),
                        Arc::downgrade(&route.pool),
                        conn.client,
                        conn.local,
                        host.to_string(),
                    )
                })
                .clone(),
        };
        let mut response = proxy::forward(&member.endpoint, &pool, conn, host, req).await;
        if let Some(ServedBy(endpoint)) = response.extensions().get::<ServedBy>() {
            record.served_by(endpoint);
        }
        for observer in scratch.observers.drain(..) {
            observer.observe(response.status());
        }
        if let (Some((conn_facts, endpoint_facts)), Some(head)) = (&facts, &head) {
            let mut cx = ResponseCx {
                res: &mut response,
                req: head,
                conn: conn_facts,
                endpoint: endpoint_facts,
                scheme,
                host,
                record,
                scratch: &mut scratch,
            };
            if let Err(failure) = policy.on_response(&mut cx) {
                response = proxy::error_response(&failure);
            }
        }
        record.policy_logs(scratch.logs);
        response
    }
}

impl InternalRoutes for Visit<'_> {
    fn forward<'a>(
        &'a self,
        target: &'a str,
        req: Request<VisitorBody>,
        record: &'a mut HttpRecord,
    ) -> BoxFuture<'a, Result<http::Response<proxy::ProxyBody>, InternalMiss>> {
        Box::pin(async move {
            if self.hops >= MAX_HOPS {
                return Err(InternalMiss {
                    failure: Failure::new(
                        ErrorCode::POLICY_FAILED,
                        format!(
                            "forward-internal went through {MAX_HOPS} internal endpoints: a loop"
                        ),
                    ),
                    req,
                });
            }
            let found = self
                .inner
                .internal
                .read()
                .expect("routes lock")
                .lookup(target)
                .cloned()
                .and_then(|route| Some((route.pool.pick(&[])?, route)));
            let Some((member, route)) = found else {
                return Err(InternalMiss {
                    failure: Failure::new(ErrorCode::ENDPOINT_OFFLINE, target.to_string()),
                    req,
                });
            };
            record.served_by(&member.endpoint);
            let next = Visit {
                hops: self.hops + 1,
                ..*self
            };
            Ok(next.serve(&route, member, req, record).await)
        })
    }
}

/// The method, target, version and headers of a request, for the rules
/// that look at it once the response is back.
fn request_head<B>(req: &Request<B>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head
}

/// A request to the OAuth auth host (the one callback URL). Over TLS its
/// SNI must name the auth host too.
async fn auth_host_request<B>(
    oauth: &OAuthService,
    conn: &ConnInfo,
    host: &str,
    req: &Request<B>,
) -> http::Response<proxy::ProxyBody> {
    if conn.sni.as_deref().is_some_and(|sni| sni != host) {
        return proxy::error_response(&Failure::new(
            ErrorCode::MISDIRECTED_REQUEST,
            format!("SNI {:?} but Host {host}", conn.sni),
        ));
    }
    oauth.serve_auth_host(req, conn.tls.is_some()).await
}

/// The fatal `unrecognized_name` alert (RFC 6066), sent before any
/// handshake state exists.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112];

async fn handle_tls_port(inner: Arc<Inner>, accepted: Accepted) {
    let Accepted {
        mut stream,
        client,
        local,
        prefix,
        slot: _slot,
    } = accepted;
    let config = &inner.config;
    let mut buf = BytesMut::from(prefix.as_ref());
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
    if inner
        .config
        .oauth
        .as_ref()
        .is_some_and(|o| o.is_auth_host(&name))
    {
        // The OAuth callback host: HTTPS with the shared certificates.
        let start = SystemTime::now();
        let config = inner.http_tls.clone();
        if let Some(tls) = accept_tls(&inner, config, buf.freeze(), stream).await {
            let conn = ConnInfo::tls(client, local, Some(name), tls.get_ref().1, start);
            serve_http_connection(inner.clone(), tls, conn).await;
        }
        return;
    }
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
    let start = SystemTime::now();
    if let (EndpointKind::Http, Some(config)) = (&route.kind, route.termination.clone()) {
        // HTTP endpoints apply IP restrictions per request, with a 403 page.
        if let Some(tls) = accept_tls(&inner, config, prefix, stream).await {
            let conn = ConnInfo::tls(client, local, Some(name), tls.get_ref().1, start);
            serve_http_connection(inner.clone(), tls, conn).await;
        }
        return;
    }
    let Some(first) = route.pool.pick(&[]) else {
        bump(&inner.stats.tls_unknown_sni);
        let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let mut record = ConnRecord {
        client,
        server: local,
        name: &name,
        start,
        proto: "tls",
        endpoint: first.endpoint.clone(),
        ip_decision: None,
        logs: Vec::new(),
    };
    let admitted = on_connect(&inner, &route, &mut record);
    let span = record.span();
    let visitor = Visitor {
        client,
        local,
        name: &name,
    };
    let result = async {
        match route.termination.clone() {
            // Refused before any byte reaches the agent, without a handshake.
            _ if let Err(refused) = admitted => Some(Err(refused)),
            Some(config) => {
                let tls = accept_tls(&inner, config, prefix, stream).await?;
                let (r, w) = tokio::io::split(tls);
                Some(
                    proxy_bytes(
                        &inner,
                        &route,
                        first,
                        &mut record,
                        r,
                        w,
                        Bytes::new(),
                        &visitor,
                    )
                    .await,
                )
            }
            None => {
                let (r, w) = stream.into_split();
                Some(proxy_bytes(&inner, &route, first, &mut record, r, w, prefix, &visitor).await)
            }
        }
    }
    .instrument(span.clone())
    .await;
    let Some(result) = result else {
        return;
    };
    outcome::tcp_closed(&inner.outcomes, &record, &span, &result);
    if let Err(e) = result {
        tracing::debug!(endpoint = %record.endpoint.id, error = %e, "TLS connection not proxied");
    }
}

async fn accept_tls(
    inner: &Inner,
    config: Arc<ServerConfig>,
    prefix: Bytes,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
    let io = Prefixed::new(prefix, stream);
    let accept = TlsAcceptor::from(config).accept(io).into_fallible();
    match tokio::time::timeout(inner.config.tls_handshake_timeout, accept).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err((e, mut io))) => {
            bump(&inner.stats.tls_handshake_failed);
            let client_cert = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                });
            if client_cert {
                bump(&inner.stats.tls_bad_client_cert);
            }
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
