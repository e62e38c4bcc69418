//! HTTP endpoints: routing a request by Host, header hygiene, forwarding it
//! as HTTP/1.1 over a pool of tunnel data streams, WebSocket upgrades, and
//! the error pages visitors see.

mod h1;
mod upstream;
mod websocket_tcp;

use upstream::UpstreamError;
pub(crate) use upstream::{UpstreamPool, Upstreams};
pub(crate) use websocket_tcp::convert as websocket_to_tcp;

use std::{
    convert::Infallible,
    error::Error as StdError,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version,
    header::{self, HOST},
};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use postern_proto::{ErrorCode, Failure, TunnelIo, pb};
use rustls::pki_types::CertificateDer;

use crate::{
    endpoint::{Endpoint, ServedBy},
    outcome::{Counted, TlsMeta},
};

/// Runs the tasks hyper starts (an HTTP/2 connection's streams and
/// driver) on the gateway's task tracker, so drain waits for them.
#[derive(Clone)]
pub(crate) struct Tracked(pub tokio_util::task::TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// Any error a body may end with.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Response body: the upstream's, streamed (possibly compressed on the
/// way), or a page of the edge's own.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The visitor's request body on its way upstream: streamed as it arrives,
/// or, once a policy action had to read it whole (a webhook signature), the
/// bytes it read.
pub enum VisitorBody {
    Streamed(Counted<Incoming>),
    Read(Full<Bytes>),
}

impl http_body::Body for VisitorBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            VisitorBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            VisitorBody::Read(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            VisitorBody::Streamed(body) => body.is_end_stream(),
            VisitorBody::Read(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            VisitorBody::Streamed(body) => body.size_hint(),
            VisitorBody::Read(body) => body.size_hint(),
        }
    }
}

impl VisitorBody {
    /// The counters of a body still streaming, which tell a malformed
    /// visitor body from an upstream failure.
    fn stats(&self) -> Option<Arc<crate::outcome::BodyStats>> {
        match self {
            VisitorBody::Streamed(body) => Some(body.stats()),
            VisitorBody::Read(_) => None,
        }
    }
}

/// Header an edge failure carries; ngrok's name, so existing monitoring
/// keeps working. Upstreams can never set it.
pub const ERROR_CODE_HEADER: HeaderName = HeaderName::from_static("ngrok-error-code");

/// Header names the request path looks up on every request, made once:
/// a name given as a string is parsed and checked at each use.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The connection a request arrived on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// SNI of the TLS handshake, normalised; `None` on plain HTTP.
    pub sni: Option<String>,
    /// The TLS parameters; `None` on plain HTTP.
    pub tls: Option<TlsMeta>,
    /// The client's certificate chain, leaf first, if it sent one.
    pub peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The client certificate the handshake verified: an SNI-routed
    /// handshake to an endpoint requiring one.
    pub client_identity: Option<crate::mtls::ClientIdentity>,
    /// When the connection was accepted.
    pub start: std::time::SystemTime,
}

impl ConnInfo {
    /// A TLS connection after its handshake.
    pub fn tls(
        client: SocketAddr,
        local: SocketAddr,
        sni: Option<String>,
        tls: &rustls::ServerConnection,
        start: std::time::SystemTime,
    ) -> ConnInfo {
        let peer_chain = tls.peer_certificates().map(|c| Arc::new(c.to_vec()));
        // Without SNI the client certificate was asked for, not verified.
        let client_identity = peer_chain
            .as_ref()
            .filter(|_| sni.is_some())
            .and_then(|chain| chain.first())
            .and_then(crate::mtls::ClientIdentity::of);
        ConnInfo {
            client,
            local,
            sni,
            tls: Some(TlsMeta::of(tls)),
            peer_chain,
            client_identity,
            start,
        }
    }
}

/// A data stream as a hyper connection, holding its place in the agent's
/// connection limit.
pub(crate) struct TunnelConn {
    io: TokioIo<TunnelIo<postern_proto::InboundFrames>>,
    /// Tells each response which endpoint served it.
    pub served: ServedBy,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl hyper::rt::Read for TunnelConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Forwards one request to an endpoint and returns what the visitor gets.
/// The request's `ngrok-*` headers are the edge's own by now (see
/// [`strip_reserved`]). An upgraded connection (WebSocket) is piped on a
/// task of `tracker`, so drain waits for it.
pub(crate) async fn forward(
    endpoint: &Endpoint,
    (upstreams, pool): (&Upstreams, &UpstreamPool),
    conn: &ConnInfo,
    host: &str,
    mut req: Request<VisitorBody>,
    tracker: &tokio_util::task::TaskTracker,
) -> Response<ProxyBody> {
    let wants_upgrade = is_upgrade_request(&req);
    let visitor_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let upstream_req = match upstream_request(req, conn, wants_upgrade, pool.http2()) {
        Ok(r) => r,
        Err(failure) => return error_response(&failure),
    };
    let request_body = upstream_req.body().stats();
    let mut response = match upstreams.send(pool, upstream_req).await {
        Ok(response) => response,
        Err(_) if request_body.is_some_and(|b| b.failed()) => {
            // The client's own body was malformed (a bad chunk size, say):
            // its fault, and the connection cannot be trusted any more.
            let failure = Failure::new(ErrorCode::BAD_REQUEST, "the request body is malformed");
            return close_after(error_response(&failure));
        }
        Err(e) => {
            let failure = match e {
                UpstreamError::Stream(failure) => failure,
                UpstreamError::Hyper(e) => classify_client_error(&e),
            };
            tracing::debug!(endpoint = %endpoint.id, host, error = %failure, "upstream request failed");
            return error_response(&failure);
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(visitor_upgrade) = visitor_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tracker.spawn(async move {
            match tokio::try_join!(visitor_upgrade, upstream_upgrade) {
                Ok((visitor, upstream)) => {
                    let mut visitor = TokioIo::new(visitor);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut visitor, &mut upstream).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        clean_response_headers(response.headers_mut(), true);
        return response;
    }
    clean_response_headers(response.headers_mut(), false);
    response
}

fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers that describe one connection and never cross a proxy
/// (RFC 9110 7.6.1), plus the HTTP/2 `te`.
const HOPS: usize = 8;
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the Connection header names;
/// keeps `Connection: upgrade` and `Upgrade` when `keep_upgrade`.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // The usual token, `keep-alive`, names a header of the list below and
    // goes with it; only other names (`close`, a header of the sender's)
    // are made here, and the vector allocated for them.
    let mut named: Vec<HeaderName> = Vec::new();
    for token in connection_tokens(headers) {
        if HOP_BY_HOP
            .iter()
            .any(|hop| token.eq_ignore_ascii_case(hop.as_str()))
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
            && !(keep_upgrade && name == header::UPGRADE)
        {
            named.push(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    // A message has few of them, often one (`Connection`): one look at the
    // names it has costs less than a lookup of each of these.
    let mut present = [false; HOPS];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether a header name is in the edge's reserved `ngrok-*` space, in any
/// case and with `_` for `-`. Clients can never set these.
pub fn is_reserved_header(name: &str) -> bool {
    const PREFIX: &[u8] = b"ngrok-";
    name.len() >= PREFIX.len()
        && name.as_bytes()[..PREFIX.len()]
            .iter()
            .zip(PREFIX)
            .all(|(a, b)| a.to_ascii_lowercase() == *b || (*a == b'_' && *b == b'-'))
}

/// Removes every header in the `ngrok-*` space a visitor sent: from here
/// on only the edge (its modules and policies) sets them.
pub fn strip_reserved(headers: &mut HeaderMap) {
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_reserved_header(n.as_str()))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(name);
    }
}

/// The request as the upstream gets it: HTTP/1.1, or HTTP/2 when `http2`
/// (the Host then travels as `:authority`, and `te: trailers` stays).
fn upstream_request<B>(
    req: Request<B>,
    conn: &ConnInfo,
    upgrade: bool,
    http2: bool,
) -> Result<Request<B>, Failure> {
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_string());
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let headers = &mut parts.headers;
    if !headers.contains_key(HOST)
        && let Some(authority) = &authority
    {
        let value = HeaderValue::from_str(authority)
            .map_err(|_| Failure::new(ErrorCode::BAD_HOST, "bad :authority"))?;
        headers.insert(HOST, value);
    }
    let trailers = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // HTTP/1.1 sends the origin form; HTTP/2 takes `:authority` and
    // `:scheme` from an absolute one.
    parts.uri = match headers.get(HOST).and_then(|h| h.to_str().ok()) {
        Some(host) if http2 => upstream::request_target(&format!("http://{host}{path}"))?,
        _ if parts.uri.scheme().is_some() => upstream::request_target(path)?,
        _ => parts.uri,
    };
    if parts.version == Version::HTTP_2 && !http2 {
        join_cookies(headers);
    }
    parts.version = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    remove_hop_by_hop(headers, upgrade && !http2);
    if http2 {
        headers.remove(HOST);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    let client_ip = crate::outcome::ip_text(conn.client.ip());
    let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip,
    };
    headers.insert(
        X_FORWARDED_FOR,
        HeaderValue::from_str(&forwarded_for).expect("IP addresses are valid header values"),
    );
    let proto = if conn.sni.is_some() { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // The request's span (see `HttpRecord`) becomes the upstream's parent.
    postern_telemetry::inject_trace(&tracing::Span::current(), headers);
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(host) = headers.get(HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
    Ok(Request::from_parts(parts, body))
}

/// HTTP/2 may split cookies over several fields; HTTP/1.1 wants one
/// (RFC 9113 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let values: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.len() > 1
        && let Ok(joined) = HeaderValue::from_str(&values.join("; "))
    {
        headers.insert(header::COOKIE, joined);
    }
}

fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool) {
    remove_hop_by_hop(headers, upgrade);
    headers.remove(ERROR_CODE_HEADER);
}

/// Maps a client failure (hyper's, or the data stream's) to what the
/// visitor is told.
fn classify_client_error(e: &(dyn StdError + 'static)) -> Failure {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    let mut io_reset = None;
    while let Some(err) = source {
        if let Some(failure) = err.downcast_ref::<Failure>() {
            return failure.clone();
        }
        if let Some(remote) = err.downcast_ref::<pb::Error>() {
            return Failure::from_pb(remote);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // io::Error::source() skips the error it wraps; look inside.
            if let Some(remote) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<pb::Error>())
            {
                return Failure::from_pb(remote);
            }
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                io_reset = Some(io.to_string());
            }
        }
        source = err.source();
    }
    if let Some(detail) = io_reset {
        return Failure::new(ErrorCode::AGENT_FORWARD_FAILED, detail);
    }
    Failure::new(ErrorCode::UPSTREAM_INVALID_RESPONSE, e.to_string())
}

/// What makes a request unsafe to forward whatever its route: two Host
/// headers, `Content-Length` with `Transfer-Encoding` (request smuggling),
/// an HTTP/2 `Host` that differs from `:authority`.
pub fn malformed<B>(req: &Request<B>) -> Option<Failure> {
    let headers = req.headers();
    if headers.get_all(HOST).iter().count() > 1 {
        return Some(Failure::new(
            ErrorCode::BAD_HOST,
            "more than one Host header",
        ));
    }
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        return Some(Failure::new(
            ErrorCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Some(Failure::new(
            ErrorCode::BAD_REQUEST,
            "conflicting Content-Length headers",
        ));
    }
    if req.version() == Version::HTTP_2
        && let (Some(authority), Some(host)) = (req.uri().authority(), headers.get(HOST))
        && authority.as_str().as_bytes() != host.as_bytes()
    {
        return Some(Failure::new(
            ErrorCode::BAD_HOST,
            "Host differs from :authority",
        ));
    }
    None
}

/// Asks the server to close the connection after this response.
pub fn close_after(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// How long a visitor is asked to wait before retrying a 503.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// The short page a visitor gets when the edge fails a request.
pub fn error_response(failure: &Failure) -> Response<ProxyBody> {
    error_page(failure.code, "", None)
}

/// A page the edge answers itself: the code's status and summary, a detail
/// line and a link (e.g. to log in again) when given, and the code in
/// `ngrok-error-code`; never cached, and a 503 says when to retry.
pub fn error_page(
    code: ErrorCode,
    detail: &str,
    link: Option<(&str, &str)>,
) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(code.http_status).unwrap_or(StatusCode::BAD_GATEWAY);
    let id = code.id();
    let paragraph = |text: String| format!("<p>{text}</p>");
    let detail = Some(detail)
        .filter(|d| !d.is_empty())
        .map(|d| paragraph(escape(d)))
        .unwrap_or_default();
    let link = link
        .map(|(href, text)| paragraph(format!("<a href=\"{}\">{}</a>", escape(href), escape(text))))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status}</title></head>\
         <body><h1>{status}</h1><p>{}</p>{detail}{link}<p><code>{id}</code></p></body></html>\n",
        escape(code.summary),
    );
    let mut response = Response::new(
        Full::new(Bytes::from(page))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        ERROR_CODE_HEADER,
        HeaderValue::from_str(&id).expect("ids are ASCII"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    response
}

/// `s` safe inside HTML text and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The Host a request names: the Host header, else the `:authority`.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers_in_every_spelling() {
        for name in [
            "ngrok-mtls-subject-cn",
            "Ngrok-Mtls-Subject-Cn",
            "ngrok_mtls_subject_cn",
            "NGROK_AUTH_USER_EMAIL",
            "ngrok-error-code",
        ] {
            assert!(is_reserved_header(name), "{name}");
        }
        for name in ["ngrokx", "x-ngrok-foo", "ngro", "host"] {
            assert!(!is_reserved_header(name), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_removed_and_connection_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut upgrade = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        remove_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(upgrade.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn error_page_carries_code_and_status() {
        let r = error_response(&Failure::new(ErrorCode::ENDPOINT_OFFLINE, "x"));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[ERROR_CODE_HEADER], "ERR_POSTERN_3200");
    }
}
