//! The API's routes and handlers.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{config::WebAuth, guard, json};
use crate::{
    config::{Proto, api_tunnel},
    error::Chain,
    forward::Target,
    inspect::{self, BodyState},
    state::{AgentState, Command, CommandError},
};

/// The inspector page: plain HTML, CSS and JS, no build step.
const INSPECTOR_HTML: &str = include_str!("inspector.html");

/// Largest request body the API reads (a replay may carry an edited body).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// How long `POST /api/tunnels` and `DELETE /api/tunnels/<name>` wait for
/// the edge's answer.
const EDGE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `limit` of `GET /api/requests/http` when none is given.
const DEFAULT_LIST_LIMIT: usize = 50;

pub(crate) struct Api {
    pub state: Arc<AgentState>,
    pub web_addr: SocketAddr,
    /// Connections and replays.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

type ApiResponse = Response<Full<Bytes>>;

/// A failed call, answered with ngrok's error object.
struct ApiError {
    status: StatusCode,
    code: u32,
    msg: &'static str,
    err: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, msg: &'static str, err: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            msg,
            err: err.into(),
            retry_after: None,
        }
    }

    fn not_found(err: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, 100, "not found", err)
    }

    fn invalid(msg: &'static str, err: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 102, msg, err)
    }

    fn response(&self) -> ApiResponse {
        let mut response = json_response(
            self.status,
            &json::error(self.status, self.code, self.msg, &self.err),
        );
        if let Some(after) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        response
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let err = e.to_string();
        match e {
            CommandError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, 105, "tunnel already running", err)
            }
            CommandError::NotFound(_) => ApiError::not_found(err),
            CommandError::Refused(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, 103, "failed to start tunnel", err)
            }
            CommandError::Offline(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                104,
                "the agent is offline",
                err,
            ),
            CommandError::OverLimit(_) => {
                ApiError::new(StatusCode::CONFLICT, 103, "failed to start tunnel", err)
            }
            CommandError::Busy { retry_after } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    103,
                    "too many tunnel starts at once",
                    err,
                )
            },
        }
    }
}

fn with_headers(status: StatusCode, content_type: &'static str, body: Bytes) -> ApiResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn json_response(status: StatusCode, value: &Value) -> ApiResponse {
    let mut body = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    body.push(b'\n');
    with_headers(status, "application/json", Bytes::from(body))
}

fn no_content() -> ApiResponse {
    with_headers(StatusCode::NO_CONTENT, "text/plain", Bytes::new())
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        101,
        "method not allowed",
        format!("this path takes {allow}"),
    )
}

/// Percent-decodes a path segment or query value (`+` is a space only in
/// queries).
fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn query(uri: &Uri) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || ApiError::invalid("invalid query", format!("{pair:?} is not URL-encoded"));
        out.insert(
            decode(k, true).ok_or_else(bad)?,
            decode(v, true).ok_or_else(bad)?,
        );
    }
    Ok(out)
}

/// A tunnel name from the API: printable, no `/`.
fn valid_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::invalid(
            "invalid tunnel configuration",
            format!("name: {name:?} must be 1 to 64 printable characters without '/'"),
        ));
    }
    Ok(())
}

impl Api {
    pub async fn handle(&self, req: Request<Incoming>) -> ApiResponse {
        match self.route(req).await {
            Ok(response) => response,
            Err(e) => {
                let mut response = e.response();
                if e.status == StatusCode::UNAUTHORIZED {
                    let challenge = match self.state.config.web.auth {
                        WebAuth::Basic { .. } => "Basic realm=\"postern agent\", charset=\"UTF-8\"",
                        _ => "Bearer realm=\"postern agent\"",
                    };
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(challenge),
                    );
                }
                response
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<ApiResponse, ApiError> {
        let (parts, body) = req.into_parts();
        let web = &self.state.config.web;
        if !guard::host_allowed(&parts.headers, &web.allow_hosts, &self.own_domains()) {
            let host = parts
                .headers
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                107,
                "host not allowed",
                format!("Host {host:?} is not allowed; add it to web_allow_hosts"),
            ));
        }
        if !guard::authorized(&web.auth, &parts.headers) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                106,
                "not authorized",
                "this agent API requires the credentials set in web_auth",
            ));
        }
        if guard::cross_site(&parts.method, &parts.headers) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                107,
                "cross-site request refused",
                "the Origin of this request is another site",
            ));
        }
        let path = parts.uri.path();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let m = &parts.method;
        match segments.as_slice() {
            [] | [""] | ["inspect", "http"] => match *m {
                Method::GET | Method::HEAD => Ok(page()),
                _ => Err(method_not_allowed("GET")),
            },
            ["api", "tunnels"] => match *m {
                Method::GET => Ok(self.list_tunnels()),
                Method::POST => self.start_tunnel(read_body(body).await?).await,
                _ => Err(method_not_allowed("GET, POST")),
            },
            ["api", "tunnels", name] => {
                let name = decode(name, false)
                    .ok_or_else(|| ApiError::not_found(format!("no tunnel named {name:?}")))?;
                match *m {
                    Method::GET => self.get_tunnel(&name),
                    Method::DELETE => self.stop_tunnel(name).await,
                    _ => Err(method_not_allowed("GET, DELETE")),
                }
            }
            ["api", "requests", "http"] => match *m {
                Method::GET => self.list_requests(&parts.uri),
                Method::POST => self.replay(read_body(body).await?).await,
                Method::DELETE => {
                    if let Some(captures) = &self.state.captures {
                        captures.clear();
                    }
                    Ok(no_content())
                }
                _ => Err(method_not_allowed("GET, POST, DELETE")),
            },
            ["api", "requests", "http", id] => match *m {
                Method::GET => self.get_request(id),
                _ => Err(method_not_allowed("GET")),
            },
            ["api", "status"] => match *m {
                Method::GET => Ok(self.status()),
                _ => Err(method_not_allowed("GET")),
            },
            ["metrics"] => match *m {
                Method::GET => Ok(with_headers(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    Bytes::from(super::metrics::render(&self.state)),
                )),
                _ => Err(method_not_allowed("GET")),
            },
            _ => Err(ApiError::not_found(format!("no such path: {path}"))),
        }
    }

    /// Domains of HTTP tunnels whose upstream is this API: requests through
    /// them carry the tunnel's domain as their Host.
    fn own_domains(&self) -> Vec<String> {
        let mut domains = Vec::new();
        for t in self.state.tunnels() {
            let spec = &t.target.spec;
            if !super::forwards_to_api(spec, self.web_addr) {
                continue;
            }
            domains.extend(spec.domain.clone());
            if let Some(url) = t.public_url()
                && let Ok(uri) = url.parse::<Uri>()
                && let Some(host) = uri.host()
            {
                domains.push(host.to_string());
            }
        }
        domains
    }

    fn list_tunnels(&self) -> ApiResponse {
        let tunnels: Vec<Value> = self.state.tunnels().iter().map(json::tunnel).collect();
        json_response(
            StatusCode::OK,
            &json!({ "tunnels": tunnels, "uri": "/api/tunnels" }),
        )
    }

    fn get_tunnel(&self, name: &str) -> Result<ApiResponse, ApiError> {
        let t = self
            .state
            .tunnel(name)
            .ok_or_else(|| ApiError::from(CommandError::NotFound(name.to_string())))?;
        Ok(json_response(StatusCode::OK, &json::tunnel(&t)))
    }

    async fn start_tunnel(&self, body: Bytes) -> Result<ApiResponse, ApiError> {
        let invalid = |err: String| ApiError::invalid("invalid tunnel configuration", err);
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(mut fields) = value else {
            return Err(invalid(
                "the body must be a JSON object of tunnel keys".into(),
            ));
        };
        let name = match fields.remove("name") {
            Some(Value::String(name)) => name,
            Some(other) => return Err(invalid(format!("name: {other} is not a string"))),
            None => return Err(invalid("name: missing".into())),
        };
        valid_name(&name)?;
        let keys: serde_yaml_ng::Value =
            serde_json::from_value(Value::Object(fields)).map_err(|e| invalid(e.to_string()))?;
        let spec = api_tunnel(&name, keys, &self.state.config.upstream_tls)
            .map_err(|e| invalid(Chain(&e).to_string()))?;
        super::warn_if_open(&self.state, &spec, self.web_addr);
        let target = Target::new(spec, self.state.captures.as_ref())
            .map_err(|e| invalid(Chain(&e).to_string()))?;
        if self.state.tunnel(&name).is_some() {
            return Err(CommandError::Exists(name).into());
        }
        let (reply, answer) = oneshot::channel();
        self.command(
            Command::Start {
                target: Arc::new(target),
                reply,
            },
            answer,
        )
        .await?;
        let t = self
            .state
            .tunnel(&name)
            .ok_or_else(|| ApiError::from(CommandError::NotFound(name.clone())))?;
        let mut response = json_response(StatusCode::CREATED, &json::tunnel(&t));
        if let Ok(location) = HeaderValue::from_str(&json::tunnel_uri(&name)) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        Ok(response)
    }

    async fn stop_tunnel(&self, name: String) -> Result<ApiResponse, ApiError> {
        if self.state.tunnel(&name).is_none() {
            return Err(CommandError::NotFound(name).into());
        }
        let (reply, answer) = oneshot::channel();
        self.command(Command::Stop { name, reply }, answer).await?;
        Ok(no_content())
    }

    /// Sends a command to the session and waits for its answer.
    async fn command(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<(), CommandError>>,
    ) -> Result<(), ApiError> {
        if !self.state.status.borrow().online {
            let why = self
                .state
                .status
                .borrow()
                .last_error
                .clone()
                .unwrap_or_else(|| "connecting".into());
            return Err(CommandError::Offline(why).into());
        }
        let lost = || CommandError::Offline("the session ended before the edge answered".into());
        self.state
            .commands
            .send(command)
            .await
            .map_err(|_| lost())?;
        match tokio::time::timeout(EDGE_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(lost().into()),
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                103,
                "the edge did not answer",
                format!("no answer from the edge within {EDGE_ANSWER_TIMEOUT:?}"),
            )),
        }
    }

    fn captures(&self) -> Result<&Arc<inspect::Captures>, ApiError> {
        self.state.captures.as_ref().ok_or_else(|| {
            ApiError::not_found("inspection is off (inspect_db_size: -1)".to_string())
        })
    }

    fn list_requests(&self, uri: &Uri) -> Result<ApiResponse, ApiError> {
        let q = query(uri)?;
        let limit = match q.get("limit") {
            None => DEFAULT_LIST_LIMIT,
            Some(l) => l.parse::<usize>().ok().filter(|l| *l > 0).ok_or_else(|| {
                ApiError::invalid(
                    "invalid query",
                    format!("limit: {l:?} is not a positive number"),
                )
            })?,
        };
        let tunnel = q.get("tunnel_name").map(String::as_str);
        let requests: Vec<Value> = match &self.state.captures {
            Some(captures) => captures
                .list(limit, tunnel)
                .iter()
                .map(json::captured)
                .collect(),
            None => Vec::new(),
        };
        Ok(json_response(
            StatusCode::OK,
            &json!({ "uri": "/api/requests/http", "requests": requests }),
        ))
    }

    fn get_request(&self, id: &str) -> Result<ApiResponse, ApiError> {
        let c = self
            .captures()?
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no captured request {id:?}")))?;
        Ok(json_response(StatusCode::OK, &json::captured(&c)))
    }

    async fn replay(&self, body: Bytes) -> Result<ApiResponse, ApiError> {
        /// ngrok's `{id, tunnel_name}`; Postern adds optional edits.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ReplayRequest {
            id: String,
            tunnel_name: Option<String>,
            method: Option<String>,
            uri: Option<String>,
            headers: Option<BTreeMap<String, Vec<String>>>,
            body: Option<String>,
        }
        let invalid = |err: String| ApiError::invalid("invalid replay request", err);
        let r: ReplayRequest = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
        let captures = self.captures()?;
        let original = captures
            .get(&r.id)
            .ok_or_else(|| ApiError::not_found(format!("no captured request {:?}", r.id)))?;
        let tunnel_name = r.tunnel_name.as_deref().unwrap_or(&original.tunnel_name);
        let tunnel = self
            .state
            .tunnel(tunnel_name)
            .ok_or_else(|| ApiError::from(CommandError::NotFound(tunnel_name.to_string())))?;
        if tunnel.target.spec.proto != Proto::Http {
            return Err(invalid(format!(
                "tunnel_name: {tunnel_name:?} is not an HTTP tunnel"
            )));
        }
        let body = match r.body {
            Some(text) => Bytes::from(text),
            None => {
                let b = &original.request_body;
                let why = match &b.state {
                    // A gRPC streaming call whose client has not finished.
                    BodyState::Streaming => Some("it is still streaming".to_string()),
                    BodyState::Cut(e) => Some(format!("it was cut ({e})")),
                    BodyState::Complete if b.truncated() => Some(format!(
                        "{} of its {} bytes were kept",
                        b.data.len(),
                        b.size
                    )),
                    BodyState::Complete => None,
                };
                if let Some(why) = why {
                    return Err(invalid(format!(
                        "the captured body is incomplete: {why}; send an edited body to replay it"
                    )));
                }
                b.data.clone()
            }
        };
        let method = match r.method {
            Some(m) => Method::from_bytes(m.as_bytes())
                .map_err(|_| invalid(format!("method: {m:?} is not an HTTP method")))?,
            None => original.request.method.clone(),
        };
        let uri_text = r.uri.unwrap_or_else(|| original.request.uri.clone());
        let uri: Uri = uri_text
            .parse()
            .ok()
            .filter(|u: &Uri| u.scheme().is_none() && uri_text.starts_with('/'))
            .ok_or_else(|| invalid(format!("uri: {uri_text:?} must be a path like /a?b=c")))?;
        let headers = match r.headers {
            None => original.request.headers.map().into_owned(),
            Some(edited) => {
                let mut h = HeaderMap::new();
                for (name, values) in edited {
                    let n = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| invalid(format!("headers: {name:?} is not a header name")))?;
                    for v in values {
                        let v = HeaderValue::from_str(&v).map_err(|_| {
                            invalid(format!("headers.{name}: {v:?} is not a header value"))
                        })?;
                        h.append(n.clone(), v);
                    }
                }
                h
            }
        };
        let replay = inspect::Replay {
            method,
            uri,
            headers,
            body,
            of: original,
        };
        let id = inspect::replay(
            tunnel.target.clone(),
            captures.clone(),
            replay,
            &self.tracker,
            &self.shutdown,
        )
        .await
        .map_err(|failure| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                103,
                "replay failed",
                failure.to_string(),
            )
        })?;
        let mut response = no_content();
        // None when a store smaller than one capture let it go at once.
        if let Some(id) = id
            && let Ok(location) = HeaderValue::from_str(&json::request_uri(&id))
        {
            response.headers_mut().insert(header::LOCATION, location);
        }
        Ok(response)
    }

    fn status(&self) -> ApiResponse {
        let s = self.state.status.borrow().clone();
        let latency = self.state.latency();
        let state = if s.online {
            "online"
        } else if s.reconnects > 0 || s.last_error.is_some() {
            "reconnecting"
        } else {
            "connecting"
        };
        let tunnels: Vec<Value> = self
            .state
            .tunnels()
            .iter()
            .map(|t| {
                let v = json::tunnel(t);
                json!({
                    "name": v["name"],
                    "public_url": v["public_url"],
                    "status": v["status"],
                    "metrics": v["metrics"],
                })
            })
            .collect();
        let mut leg = json!({ "region": s.region });
        if let Some(rtt) = latency {
            leg["latency"] = json!(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
            leg["latency_ms"] = json!(rtt.as_secs_f64() * 1000.0);
        }
        json_response(
            StatusCode::OK,
            &json!({
                "status": state,
                "agent_version": env!("CARGO_PKG_VERSION"),
                "session": {
                    "id": s.session_id,
                    "region": s.region,
                    "node": s.node_id,
                    "legs": [leg],
                    "reconnects": s.reconnects,
                    "last_error": s.last_error,
                },
                "web_addr": self.web_addr.to_string(),
                "tunnels": tunnels,
                "uri": "/api/status",
            }),
        )
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                102,
                "request body not read",
                format!("{e} (the limit is {MAX_BODY} bytes)"),
            )
        })
}

/// The inspector page, which may only talk to this API and never be framed.
fn page() -> ApiResponse {
    let mut response = with_headers(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(INSPECTOR_HTML.as_bytes()),
    );
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(decode("my%20web", false).as_deref(), Some("my web"));
        assert_eq!(decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(decode("%zz", false), None);
        assert_eq!(decode("%e2%82%ac", false).as_deref(), Some("€"));
        let q = query(&"/x?limit=5&tunnel_name=my%20web".parse().unwrap())
            .ok()
            .expect("a valid query");
        assert_eq!(q["limit"], "5");
        assert_eq!(q["tunnel_name"], "my web");
    }

    #[test]
    fn json_bodies_become_tunnel_specs() {
        let spec = |body: &str| {
            let yaml: serde_yaml_ng::Value = serde_json::from_str(body).unwrap();
            api_tunnel("t", yaml, &BTreeMap::new())
        };
        let s = spec(
            r#"{"proto":"tcp","addr":22,"remote_addr":"1.tcp.example.test:20022","metadata":"x"}"#,
        )
        .unwrap();
        assert_eq!(s.proto, Proto::Tcp);
        assert_eq!(s.upstream.port, 22);
        assert_eq!(s.remote_port, 20022);
        let s = spec(r#"{"proto":"http","addr":"8080","inspect":false}"#).unwrap();
        assert!(!s.inspect);
        assert!(spec(r#"{"proto":"http","addr":"8080"}"#).unwrap().inspect);
        for (body, want) in [
            (r#"{"proto":"http","addr":"1","colour":"red"}"#, "colour"),
            (r#"{"proto":"http"}"#, "addr"),
            (
                r#"{"proto":"http","addr":"1","inspect":"maybe"}"#,
                "inspect",
            ),
            (
                r#"{"proto":"tls","addr":"1","crt":"/nonexistent.pem","key":"/k"}"#,
                "crt",
            ),
        ] {
            let err = format!("{:#}", spec(body).unwrap_err());
            assert!(err.contains(want), "{body}: {want:?} not in {err}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("passthrough").is_ok());
        assert!(valid_name("my web").is_ok());
        for bad in ["", "a/b", "tab\t", &"x".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }
}
