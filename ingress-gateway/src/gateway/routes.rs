//! The route table: names (public and `.internal`) and TCP ports to the
//! pools of endpoints serving them; adding an endpoint (TLS termination and
//! its compiled traffic policy are made here) and removing it.

use super::*;

/// Where an endpoint is bound, by id.
pub(super) struct Binding {
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
pub(super) struct TcpRoute {
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

impl Gateway {
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
        let forwarding = Forwarding {
            websocket_tcp: spec
                .http_modules
                .as_ref()
                .is_some_and(|m| m.websocket_tcp_converter),
            upstream_http2: spec.upstream_http2,
        };
        let shared_pool = (spec.protocol == Protocol::Http && !spec.proxy_proto).then(|| {
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            UpstreamPool::new(
                endpoint.clone(),
                Arc::downgrade(&route.pool),
                (unspecified, unspecified),
                domain.to_string(),
                forwarding.upstream_http2,
            )
        });
        route
            .pool
            .add(Member::new(endpoint.clone(), shared_pool, forwarding));
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
            http: spec.http_modules.clone(),
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
            schemes: match spec.http_modules.as_ref().map(|m| &m.schemes) {
                Some(schemes) if !schemes.is_empty() => (
                    schemes.iter().any(|s| s == "http"),
                    schemes.iter().any(|s| s == "https"),
                ),
                _ => (true, true),
            },
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
        route
            .pool
            .add(Member::new(endpoint.clone(), None, Forwarding::default()));
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
