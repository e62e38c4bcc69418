//! HTTP serving: one request routed by Host, its endpoint's policy run,
//! forwarded to the agent (or an internal endpoint), and its outcome
//! recorded.

use super::*;

pub(super) async fn serve_http_connection<IO>(inner: Arc<Inner>, io: IO, conn: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let pools: Arc<Mutex<HashMap<String, UpstreamPool>>> = Arc::default();
    let upstreams = Upstreams::new(inner.tracker.clone(), inner.stop_accepting.clone());
    let service_inner = inner.clone();
    let service_upstreams = upstreams.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let inner = service_inner.clone();
        let conn = conn.clone();
        let pools = pools.clone();
        let upstreams = service_upstreams.clone();
        async move {
            let visitor = VisitorConn {
                conn: &conn,
                pools: &pools,
                upstreams: &upstreams,
            };
            Ok::<_, std::convert::Infallible>(handle_request(&inner, visitor, req).await)
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

/// The visitor connection a request arrived on, and what its requests
/// share upstream.
#[derive(Clone, Copy)]
struct VisitorConn<'a> {
    conn: &'a ConnInfo,
    /// Upstream pools of this connection's own: those of endpoints whose
    /// streams carry the visitor's address (PROXY headers).
    pools: &'a Mutex<HashMap<String, UpstreamPool>>,
    upstreams: &'a Upstreams,
}

async fn handle_request(
    inner: &Inner,
    visitor: VisitorConn<'_>,
    req: Request<Incoming>,
) -> http::Response<Counted<proxy::ProxyBody>> {
    let conn = visitor.conn;
    inner.count(Counter::HttpRequests);
    let host = proxy::request_host(&req).map(normalize_host);
    let shown_host = match &host {
        Some(Ok(h)) => h.as_str(),
        _ => "",
    };
    let forwarded_for = req
        .headers()
        .get(crate::http::X_FORWARDED_FOR)
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
    // ACME HTTP-01 on the plain listener: the CA asks before any endpoint
    // may exist for the name, so this comes before routing.
    if conn.tls.is_none()
        && req.method() == http::Method::GET
        && let Some(key_authorization) = inner.acme.answer(req.uri().path())
    {
        return record.finish(http01_response(key_authorization));
    }
    let malformed = proxy::malformed(&req);
    let req = req.map(|body| Counted::new(body, record.request_body_stats()));
    let span = record.span().clone();
    let response = async {
        match (host, malformed) {
            (_, Some(failure)) => proxy::close_after(proxy::error_response(&failure)),
            (Some(Ok(host)), None) => match &inner.config.oauth {
                Some(oauth) if oauth.is_auth_host(&host) => {
                    // Boxed, like a policy's run and WebSocket-to-TCP: inline,
                    // those rare paths made every request's future 40 KB,
                    // and hyper moves that future once per request.
                    Box::pin(auth_host_request(oauth, conn, &host, &req)).await
                }
                // Boxed: the routing, the policy and the forwarding are 5.5
                // KB of future, which this block, its span's wrapper and
                // hyper would each copy again if it were inline.
                _ => {
                    Box::pin(route_request(
                        inner,
                        visitor,
                        &mut record,
                        client_ip,
                        &host,
                        req,
                    ))
                    .await
                }
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

async fn route_request(
    inner: &Inner,
    visitor: VisitorConn<'_>,
    record: &mut HttpRecord,
    client_ip: IpAddr,
    host: &str,
    req: Request<Counted<Incoming>>,
) -> http::Response<proxy::ProxyBody> {
    let conn = visitor.conn;
    let (route, sni_route) = {
        let routes = inner.routes.read().expect("routes lock");
        let route = routes.lookup(host).cloned();
        let sni_route = conn.sni.as_deref().map(|sni| routes.lookup(sni).cloned());
        (route, sni_route)
    };
    let tls = conn.tls.is_some();
    let Some((route, member)) = route
        .filter(|r| matches!(r.kind, EndpointKind::Http))
        .filter(|r| if tls { r.schemes.1 } else { r.schemes.0 })
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
        visitor,
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
    visitor: VisitorConn<'a>,
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
        let (inner, conn, host) = (self.inner, self.visitor.conn, self.host);
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
            (conn_facts, &member.facts)
        });
        let scheme = if conn.tls.is_some() { "https" } else { "http" };
        let mut scratch = Scratch::default();
        let mut head = None;
        if let Some((conn_facts, endpoint_facts)) = &facts {
            // Host, or HTTP/2's :authority.
            let visitor_host =
                proxy::request_host(&req).and_then(|h| http::HeaderValue::from_str(h).ok());
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
            // Boxed: see `handle_request`.
            let stop = Box::pin(policy.on_request(&mut cx)).await;
            inner.count_ip_denial(record.ip_decision_made());
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
            // A policy that set another Host (`host_header`): the upstream
            // still learns the name the visitor asked for.
            let headers = req.headers_mut();
            if let Some(original) = visitor_host
                && headers.get(http::header::HOST) != Some(&original)
                && !headers.contains_key(crate::http::X_FORWARDED_HOST)
            {
                headers.insert(crate::http::X_FORWARDED_HOST, original);
            }
            if policy.has(Phase::Response) {
                head = Some(request_head(&req));
            }
        }
        let pool = match &member.shared_pool {
            Some(pool) => pool.clone(),
            None => self
                .visitor
                .pools
                .lock()
                .expect("pools lock")
                .entry(member.endpoint.id.clone())
                .or_insert_with(|| {
                    UpstreamPool::new(
                        member.endpoint.clone(),
                        Arc::downgrade(&route.pool),
                        (conn.client, conn.local),
                        host.to_string(),
                        member.forwarding.upstream_http2,
                    )
                })
                .clone(),
        };
        let mut response = if member.forwarding.websocket_tcp {
            Box::pin(proxy::websocket_to_tcp(&pool, req, &inner.tracker)).await
        } else {
            let upstream = (self.visitor.upstreams, &pool);
            proxy::forward(&member.endpoint, upstream, conn, host, req, &inner.tracker).await
        };
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

/// The key authorization an ACME CA asked for, as RFC 8555 §8.3 wants it.
fn http01_response(key_authorization: String) -> http::Response<proxy::ProxyBody> {
    use http_body_util::BodyExt;
    let mut response = http::Response::new(
        http_body_util::Full::new(Bytes::from(key_authorization))
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed(),
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    response
}
