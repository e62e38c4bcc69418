//! One outcome record per request or connection, published as an event
//! when it ends: `http_request_complete.v0` when the response body is done
//! (or dropped), `tcp_connection_closed.v0` when a piped connection closes.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use postern_events::{
    ClientCert, Conn, Decision, DecisionField, Event, EventSink, EventType, Headers, Http,
    HttpRequest, HttpRequestComplete, HttpResponse, PosternClientCert, PosternFields, Subject,
    TcpConnectionClosed, Tls, Url, timestamp,
};
use postern_proto::PipeOutcome;

use crate::{
    endpoint::Endpoint,
    metrics::{Metrics, decision_label},
    mtls::ClientIdentity,
};

/// Where outcomes go, and what every event says about this node.
#[derive(Clone)]
pub struct Outcomes {
    pub sink: Option<Arc<dyn EventSink>>,
    pub region: String,
    pub node_id: String,
    pub account_id: Option<String>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl Outcomes {
    fn postern(&self) -> PosternFields {
        PosternFields {
            region: Some(self.region.clone()),
            node_id: Some(self.node_id.clone()),
            ..Default::default()
        }
    }

    /// Whether an event of `event_type` would be published now.
    fn wants(&self, event_type: EventType) -> bool {
        self.sink
            .as_ref()
            .is_some_and(|sink| sink.wants(event_type))
    }

    fn publish(&self, event: impl FnOnce(Option<String>) -> Event) {
        if let Some(sink) = &self.sink {
            sink.publish(event(self.account_id.clone()));
        }
    }
}

/// TLS parameters of a visitor's connection.
#[derive(Clone, Debug, Default)]
pub struct TlsMeta {
    pub version: String,
    pub cipher_suite: String,
}

impl TlsMeta {
    pub fn of(conn: &rustls::ServerConnection) -> TlsMeta {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        // IANA names: rustls calls the TLS 1.3 suites `TLS13_…`.
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(|name| match name.strip_prefix("TLS13_") {
                Some(rest) => format!("TLS_{rest}"),
                None => name.to_string(),
            })
            .unwrap_or_default();
        TlsMeta {
            version,
            cipher_suite,
        }
    }
}

fn conn_fields(client: SocketAddr, server: SocketAddr, name: &str, start: SystemTime) -> Conn {
    Conn {
        client_ip: Some(ip_text(client.ip())),
        server_ip: Some(ip_text(server.ip())),
        server_name: (!name.is_empty()).then(|| name.to_string()),
        server_port: Some(server.port()),
        start_ts: Some(timestamp(start)),
        ..Default::default()
    }
}

/// An address as text, as `to_string` writes it; IPv4 (the common case)
/// without the formatting machinery, which costs more than the rest of
/// the connection's fields together.
pub(crate) fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    // Room for a port too (`socket_text`).
    let mut text = String::with_capacity(21);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// A socket address as text, as `to_string` writes it: `ip_text` and the
/// port.
pub(crate) fn socket_text(addr: SocketAddr) -> String {
    if addr.is_ipv6() {
        return addr.to_string();
    }
    let mut text = ip_text(addr.ip());
    text.push(':');
    text.push_str(itoa::Buffer::new().format(addr.port()));
    text
}

/// Byte count and first/last byte times of a body.
#[derive(Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    times: Mutex<Option<(SystemTime, SystemTime)>>,
    /// The body could not be read (for a request: the client sent a
    /// malformed body, such as a bad chunk size).
    failed: std::sync::atomic::AtomicBool,
}

impl BodyStats {
    fn saw(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut times = self.times.lock().expect("body stats lock");
        match times.as_mut() {
            Some((_, last)) => *last = now,
            None => *times = Some((now, now)),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn fill(&self) -> (u64, Option<String>, Option<String>) {
        let times = *self.times.lock().expect("body stats lock");
        (
            self.bytes.load(Ordering::Relaxed),
            times.map(|(first, _)| timestamp(first)),
            times.map(|(_, last)| timestamp(last)),
        )
    }
}

/// A body that counts what passes through it, and optionally publishes an
/// HTTP outcome when it is dropped.
pub struct Counted<B> {
    inner: B,
    stats: Arc<BodyStats>,
    /// Published when the body is dropped.
    _record: Option<Box<HttpRecord>>,
}

impl BodyStats {
    /// Whether reading the body failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl<B> Counted<B> {
    /// The counters of this body.
    pub fn stats(&self) -> Arc<BodyStats> {
        self.stats.clone()
    }

    pub fn new(inner: B, stats: Arc<BodyStats>) -> Self {
        Counted {
            inner,
            stats,
            _record: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.stats.saw(data.len());
                }
                if let (Some(trailers), Some(record)) = (frame.trailers_ref(), &mut self._record) {
                    record.grpc_status(trailers);
                }
            }
            Some(Err(_)) => self.stats.failed.store(true, Ordering::Relaxed),
            None => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The outcome of one HTTP request, published when dropped.
pub struct HttpRecord {
    outcomes: Arc<Outcomes>,
    object: HttpRequestComplete,
    /// Some subscription took HTTP events when the request came: the
    /// event is gathered and published. Otherwise only metrics and the
    /// span see the outcome.
    publish: bool,
    at: SystemTime,
    started: Instant,
    request_body: Arc<BodyStats>,
    response_body: Arc<BodyStats>,
    /// The request's span: continues the visitor's `traceparent`, ends
    /// with the record, and carries the outcome as fields.
    span: tracing::Span,
}

impl HttpRecord {
    /// Starts a record from the request as the visitor sent it, boxed: it
    /// is 1.4 KB, and it stays where it is until the event is published
    /// (the response's body keeps it) instead of being copied with every
    /// future that holds it.
    pub fn start<B>(
        outcomes: &Arc<Outcomes>,
        req: &Request<B>,
        client: SocketAddr,
        server: SocketAddr,
        host: &str,
        tls: Option<&TlsMeta>,
        conn_start: SystemTime,
    ) -> Box<HttpRecord> {
        let publish = outcomes.wants(EventType::HttpRequestComplete);
        // A root of its own (not a child of the connection), unless the
        // visitor sent a trace context to continue.
        let span = tracing::info_span!(
            parent: None,
            "request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %req.method(),
            http.host = host,
            client.addr = %client,
            endpoint.id = tracing::field::Empty,
            agent.session_id = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            decision = tracing::field::Empty,
            ip.decision = tracing::field::Empty,
            oauth.decision = tracing::field::Empty,
            mtls.subject_cn = tracing::field::Empty,
            error.code = tracing::field::Empty,
        );
        postern_telemetry::continue_trace(&span, req.headers());
        let mut record = Box::new(HttpRecord {
            outcomes: outcomes.clone(),
            // Only what metrics, spans and the response need; the event's
            // fields replace it below when some subscription takes HTTP
            // events (no strings are made for an event nobody takes).
            object: HttpRequestComplete {
                postern: Some(PosternFields::default()),
                ..Default::default()
            },
            publish,
            at: SystemTime::now(),
            started: Instant::now(),
            request_body: Arc::default(),
            response_body: Arc::default(),
            span,
        });
        if publish {
            record.object = request_fields(outcomes, req, (client, server), host, tls, conn_start);
        }
        record
    }

    /// The request's span; routing, modules and forwarding run in it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The counter to put on the request body.
    pub fn request_body_stats(&self) -> Arc<BodyStats> {
        self.request_body.clone()
    }

    /// Mutable access for modules and routing to add what they know.
    pub fn postern_mut(&mut self) -> &mut PosternFields {
        self.object.postern.get_or_insert_with(Default::default)
    }

    /// Names the endpoint that serves (or was chosen to serve) the request.
    pub fn served_by(&mut self, endpoint: &Endpoint) {
        let (region, node) = (&self.outcomes.region, &self.outcomes.node_id);
        let postern = self.object.postern.get_or_insert_with(Default::default);
        // Named already: the endpoint chosen is nearly always the one that
        // served, and naming it again is six strings made and dropped.
        if postern.endpoint_id.as_deref() == Some(endpoint.id.as_str())
            && postern.agent_session_id.as_deref() == Some(endpoint.source.session_id())
        {
            return;
        }
        if self.publish {
            serving_fields(postern, endpoint, region.clone(), node.clone());
        } else {
            serving_ids(postern, endpoint);
        }
    }

    /// Records the verified client certificate.
    pub fn client_cert(&mut self, identity: &ClientIdentity) {
        let tls = self.object.tls.get_or_insert_with(Default::default);
        tls.client_cert = Some(ClientCert {
            serial_number: Some(identity.serial.clone()),
            subject: Some(Subject {
                cn: identity.subject_cn.clone(),
            }),
        });
        self.span
            .record("mtls.subject_cn", identity.subject_cn.as_deref());
        self.postern_mut().client_cert = Some(PosternClientCert {
            issuer: Some(identity.issuer.clone()),
            sha256_fingerprint: Some(identity.sha256_fingerprint.clone()),
            san_dns: (!identity.san_dns.is_empty()).then(|| identity.san_dns.clone()),
            not_after: Some(timestamp(identity.not_after_time())),
        });
    }

    /// Records an IP restriction's decision.
    pub fn ip_decision(&mut self, decision: Decision) {
        self.span
            .record("ip.decision", decision_label(&[Some(decision)]));
        self.object.ip_policy = Some(DecisionField {
            decision: Some(decision),
        });
    }

    /// The IP restriction's decision, once made.
    pub fn ip_decision_made(&self) -> Option<Decision> {
        self.object.ip_policy.as_ref().and_then(|d| d.decision)
    }

    /// Records basic auth's decision and the user it let in.
    pub fn basic_auth(&mut self, decision: Decision, username: Option<&str>) {
        self.object.basic_auth = Some(postern_events::BasicAuth {
            decision: Some(decision),
            username: username.map(str::to_string),
        });
    }

    /// Records the compression chosen (`none` when the body passed as it
    /// was).
    pub fn compression(&mut self, algorithm: &str) {
        self.object.compression = Some(postern_events::Compression {
            algorithm: Some(algorithm.to_string()),
        });
    }

    /// Records the user agent filter's decision.
    pub fn user_agent_filter(&mut self, decision: Decision) {
        self.object.user_agent_filter = Some(DecisionField {
            decision: Some(decision),
        });
    }

    /// Records webhook verification's decision.
    pub fn webhook_verification(&mut self, decision: Decision) {
        self.object.webhook_verification = Some(DecisionField {
            decision: Some(decision),
        });
    }

    /// Records the circuit breaker's decision.
    pub fn circuit_breaker(&mut self, decision: Decision) {
        self.object.circuit_breaker = Some(DecisionField {
            decision: Some(decision),
        });
    }

    /// What the policy's `log` actions recorded.
    pub fn policy_logs(&mut self, logs: Vec<serde_json::Value>) {
        if !logs.is_empty() {
            self.object.traffic_policy = Some(postern_events::TrafficPolicyLogs { logs });
        }
    }

    /// The `oauth.*` fields, for the OAuth module to fill.
    pub fn oauth_mut(&mut self) -> &mut postern_events::OAuth {
        self.object.oauth.get_or_insert_with(Default::default)
    }

    /// Notes a gRPC status (`grpc-status`) in `headers`, if there is one.
    fn grpc_status(&mut self, headers: &http::HeaderMap) {
        if let Some(status) = headers
            .get(crate::http::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            self.postern_mut().grpc_status = Some(status);
        }
    }

    /// Attaches the record to the response the visitor gets; it is
    /// published when that body has been sent or dropped.
    pub fn finish<B>(mut self: Box<Self>, response: Response<B>) -> Response<Counted<B>> {
        let (parts, body) = response.into_parts();
        // A trailers-only answer (a gRPC error) has its status in the head.
        self.grpc_status(&parts.headers);
        if let Some(code) = parts
            .headers
            .get(crate::http::ERROR_CODE_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.postern_mut().error_code = Some(code.to_string());
        }
        self.object
            .http
            .get_or_insert_with(Default::default)
            .response = Some(HttpResponse {
            status_code: Some(parts.status.as_u16()),
            headers: self.publish.then(|| Headers::new(&parts.headers)),
            ..Default::default()
        });
        let stats = self.response_body.clone();
        Response::from_parts(
            parts,
            Counted {
                inner: body,
                stats,
                _record: Some(self),
            },
        )
    }
}

impl Drop for HttpRecord {
    fn drop(&mut self) {
        let req_len = self.request_body.bytes();
        let resp_len = self.response_body.bytes();
        let decision = decision_label(&[
            self.object.ip_policy.as_ref().and_then(|d| d.decision),
            self.object.oauth.as_ref().and_then(|o| o.decision),
            self.object.basic_auth.as_ref().and_then(|b| b.decision),
        ]);
        let status = self
            .object
            .http
            .as_ref()
            .and_then(|h| h.response.as_ref())
            .and_then(|r| r.status_code)
            .unwrap_or(0);
        let endpoint = self
            .object
            .postern
            .as_ref()
            .and_then(|p| p.endpoint_id.as_deref())
            .unwrap_or_default();
        self.outcomes.metrics.request(
            endpoint,
            status,
            decision,
            self.started.elapsed(),
            (req_len, resp_len),
        );
        let span = &self.span;
        span.record("http.response.status_code", status);
        span.record("decision", decision);
        if let Some(oauth) = self.object.oauth.as_ref().and_then(|o| o.decision) {
            span.record("oauth.decision", decision_label(&[Some(oauth)]));
        }
        if let Some(postern) = &self.object.postern {
            span.record("endpoint.id", postern.endpoint_id.as_deref());
            span.record("agent.session_id", postern.agent_session_id.as_deref());
            span.record("error.code", postern.error_code.as_deref());
        }
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        if self.publish {
            self.publish_event();
        }
    }
}

impl HttpRecord {
    /// Completes the event with the bodies' counts and times and the
    /// duration, and publishes it.
    fn publish_event(&mut self) {
        let (req_len, req_first, req_last) = self.request_body.fill();
        let (resp_len, resp_first, resp_last) = self.response_body.fill();
        let http = self.object.http.get_or_insert_with(Default::default);
        if let Some(request) = http.request.as_mut() {
            request.body_length = Some(req_len);
            request.first_byte_ts = req_first;
            request.last_byte_ts = req_last;
        }
        if let Some(response) = http.response.as_mut() {
            response.body_length = Some(resp_len);
            response.first_byte_ts = resp_first;
            response.last_byte_ts = resp_last;
        }
        self.postern_mut().duration_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
        let object = std::mem::take(&mut self.object);
        let at = self.at;
        self.outcomes
            .publish(|account| Event::http(object, at, account));
    }
}

/// The event's description of the request as the visitor sent it.
fn request_fields<B>(
    outcomes: &Outcomes,
    req: &Request<B>,
    (client, server): (SocketAddr, SocketAddr),
    host: &str,
    tls: Option<&TlsMeta>,
    conn_start: SystemTime,
) -> HttpRequestComplete {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut raw = String::with_capacity(scheme.len() + 3 + host.len() + target.len());
    for part in [scheme, "://", host, target] {
        raw.push_str(part);
    }
    HttpRequestComplete {
        conn: Some(conn_fields(client, server, host, conn_start)),
        http: Some(Http {
            request: Some(HttpRequest {
                method: Some(req.method().as_str().to_string()),
                version: Some(postern_net::http_version_text(req.version()).to_string()),
                headers: Some(Headers::new(req.headers())),
                user_agent: req
                    .headers()
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                url: Some(Url {
                    raw: Some(raw),
                    scheme: Some(scheme.to_string()),
                    host: Some(host.to_string()),
                    path: Some(path),
                    query,
                }),
                ..Default::default()
            }),
            response: None,
        }),
        tls: tls.map(|t| Tls {
            version: Some(t.version.clone()),
            cipher_suite: Some(t.cipher_suite.clone()),
            client_cert: None,
        }),
        postern: Some(outcomes.postern()),
        ..Default::default()
    }
}

/// `postern.endpoint_id`, `agent_session_id` and the serving region and
/// node: another node's when the endpoint is served through it.
fn serving_fields(postern: &mut PosternFields, endpoint: &Endpoint, region: String, node: String) {
    serving_ids(postern, endpoint);
    let (region, node) = match &endpoint.remote {
        Some(at) => (at.region.clone(), at.node_id.clone()),
        None => (region, node),
    };
    postern.serving_region = Some(region);
    postern.serving_node_id = Some(node);
}

/// The endpoint and the agent session that serve: all metrics and spans
/// need of `serving_fields`.
fn serving_ids(postern: &mut PosternFields, endpoint: &Endpoint) {
    postern.endpoint_id = Some(endpoint.id.clone());
    postern.agent_session_id = Some(endpoint.source.session_id().to_string());
}

/// A TCP or TLS endpoint connection, as its event describes it.
pub struct ConnRecord<'a> {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The SNI, for TLS endpoints.
    pub name: &'a str,
    pub start: SystemTime,
    /// `tcp` or `tls`.
    pub proto: &'static str,
    /// The endpoint serving it: the one first chosen from the pool, then
    /// the one that gave the data stream.
    pub endpoint: Arc<Endpoint>,
    pub ip_decision: Option<Decision>,
    /// What the policy's `log` actions recorded.
    pub logs: Vec<serde_json::Value>,
}

impl ConnRecord<'_> {
    /// The endpoint whose agent took the connection, when another member
    /// of the pool than the first chosen did.
    pub fn served_by(&mut self, endpoint: &Arc<Endpoint>) {
        if !Arc::ptr_eq(&self.endpoint, endpoint) {
            self.endpoint = endpoint.clone();
            let span = tracing::Span::current();
            span.record("endpoint.id", &endpoint.id);
            span.record("agent.session_id", endpoint.source.session_id());
        }
    }

    /// The connection's span, a trace root: TCP and TLS clients send no
    /// trace context. The agent's span for the stream continues it.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            parent: None,
            "connection",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            proto = self.proto,
            client.addr = %self.client,
            sni = self.name,
            endpoint.id = %self.endpoint.id,
            agent.session_id = %self.endpoint.source.session_id(),
            decision = decision_label(&[self.ip_decision]),
            bytes.in = tracing::field::Empty,
            bytes.out = tracing::field::Empty,
            error.code = tracing::field::Empty,
        )
    }
}

/// Publishes `tcp_connection_closed.v0` for a piped connection and ends
/// its span with the byte counts and error code.
pub fn tcp_closed(
    outcomes: &Outcomes,
    record: &ConnRecord<'_>,
    span: &tracing::Span,
    result: &Result<PipeOutcome, postern_proto::Failure>,
) {
    let (bytes_in, bytes_out) = match result {
        Ok(outcome) => (outcome.bytes_to_peer, outcome.bytes_from_peer),
        Err(_) => (0, 0),
    };
    span.record("bytes.in", bytes_in);
    span.record("bytes.out", bytes_out);
    if let Err(failure) = result {
        span.record("error.code", failure.code.id());
        span.record("otel.status_code", "ERROR");
    }
    outcomes.metrics.connection(
        &record.endpoint.id,
        record.proto,
        decision_label(&[record.ip_decision]),
        bytes_in,
        bytes_out,
    );
    // The event's fields (two timestamps, the addresses as text) are made
    // only when a subscription will take it.
    if !outcomes.wants(EventType::TcpConnectionClosed) {
        return;
    }
    let mut conn = conn_fields(record.client, record.server, record.name, record.start);
    conn.bytes_in = Some(bytes_in);
    conn.bytes_out = Some(bytes_out);
    conn.end_ts = Some(timestamp(SystemTime::now()));
    let mut postern = outcomes.postern();
    postern.endpoint_proto = Some(record.proto.to_string());
    let (region, node) = (outcomes.region.clone(), outcomes.node_id.clone());
    serving_fields(&mut postern, &record.endpoint, region, node);
    if let Err(failure) = result {
        postern.error_code = Some(failure.code.id());
    }
    postern.duration_ms = record
        .start
        .elapsed()
        .ok()
        .map(|d| d.as_secs_f64() * 1000.0);
    let object = TcpConnectionClosed {
        conn: Some(conn),
        ip_policy: record
            .ip_decision
            .map(|d| DecisionField { decision: Some(d) }),
        traffic_policy: (!record.logs.is_empty()).then(|| postern_events::TrafficPolicyLogs {
            logs: record.logs.clone(),
        }),
        postern: Some(postern),
    };
    outcomes.publish(|account| Event::tcp(object, SystemTime::now(), account));
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use postern_events::{EventObject, MemorySink};

    use super::*;
    use crate::{endpoint::EndpointKind, route::tests::Gone};

    fn endpoint(id: &str, remote: Option<(&str, &str)>) -> Endpoint {
        Endpoint {
            id: id.into(),
            name: "web".into(),
            kind: EndpointKind::Http,
            public_url: "https://app.example.test".into(),
            source: Arc::new(Gone),
            remote: remote.map(|(region, node)| crate::endpoint::Location {
                region: region.into(),
                node_id: node.into(),
            }),
        }
    }

    /// A record of `req` on node `us1` in `us`, published into `sink`.
    pub(crate) fn record(sink: &Arc<MemorySink>, req: &Request<()>) -> Box<HttpRecord> {
        let outcomes = Arc::new(Outcomes {
            sink: Some(sink.clone() as Arc<dyn EventSink>),
            region: "us".into(),
            node_id: "us1".into(),
            account_id: None,
            metrics: Default::default(),
        });
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        HttpRecord::start(
            &outcomes,
            req,
            addr,
            addr,
            "app.example.test",
            None,
            SystemTime::now(),
        )
    }

    /// The `postern` fields of the event a request published after
    /// `served` named its endpoints in turn.
    fn serving_after(served: &[&Endpoint]) -> PosternFields {
        let sink = Arc::new(MemorySink::default());
        let mut record = record(&sink, &Request::get("/").body(()).unwrap());
        for endpoint in served {
            record.served_by(endpoint);
        }
        drop(record.finish(Response::new(())));
        let events = sink.events();
        let EventObject::Http(object) = &events[0].object else {
            panic!("an HTTP event");
        };
        PosternFields {
            duration_ms: None,
            ..object.postern.clone().unwrap()
        }
    }

    #[test]
    fn the_event_names_the_endpoint_that_served_last() {
        let here = endpoint("ep_here", None);
        let there = endpoint("ep_there", Some(("eu", "eu1")));
        let once = serving_after(&[&here]);
        assert_eq!(
            serving_after(&[&here, &here]),
            once,
            "named twice: the same"
        );
        assert_eq!(once.endpoint_id.as_deref(), Some("ep_here"));
        assert_eq!(once.serving_region.as_deref(), Some("us"));
        assert_eq!(once.serving_node_id.as_deref(), Some("us1"));
        let moved = serving_after(&[&here, &there]);
        assert_eq!(moved.endpoint_id.as_deref(), Some("ep_there"));
        assert_eq!(moved.agent_session_id.as_deref(), Some("ts_gone"));
        assert_eq!(moved.serving_region.as_deref(), Some("eu"));
        assert_eq!(moved.serving_node_id.as_deref(), Some("eu1"));
        assert_eq!(
            moved.region.as_deref(),
            Some("us"),
            "the receiving node stays"
        );
    }

    #[test]
    fn addresses_are_written_as_to_string_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.0.10",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
            for port in [0, 9, 80, 443, 8080, 65535] {
                let addr = SocketAddr::new(ip, port);
                assert_eq!(socket_text(addr), addr.to_string());
            }
        }
    }
}
