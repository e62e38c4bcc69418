//! The API's JSON, in ngrok's shapes: Tunnel, CapturedRequest, the status
//! object and the error object. Postern adds fields (never renames or
//! drops ngrok's); rates and percentiles ngrok reports are left out rather
//! than faked, since the agent does not compute them.

use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, StatusCode};
use postern_net::http_version_text;
use serde_json::{Map, Value, json};

use crate::{
    config::Proto,
    inspect::{BodyState, Captured, CapturedBody, ResponseCapture},
    state::{BindState, Origin, Tunnel},
};

/// `/api/tunnels/<name>`, with the name percent-encoded.
pub(crate) fn tunnel_uri(name: &str) -> String {
    format!("/api/tunnels/{}", percent_encode(name))
}

pub(crate) fn request_uri(id: &str) -> String {
    format!("/api/requests/http/{id}")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Tunnel object.
pub(crate) fn tunnel(t: &Tunnel) -> Value {
    let spec = &t.target.spec;
    let m = t.target.metrics.snapshot();
    let public_url = t.public_url().unwrap_or("");
    let proto = match spec.proto {
        Proto::Http if public_url.starts_with("http://") => "http",
        Proto::Http => "https",
        Proto::Tls => "tls",
        Proto::Tcp => "tcp",
    };
    let (status, error) = match &t.state {
        BindState::Bound { .. } => ("online", None),
        BindState::Binding => ("binding", None),
        BindState::Failed { error, .. } => ("failed", Some(error.as_str())),
    };
    let mut v = json!({
        "name": spec.name,
        "uri": tunnel_uri(&spec.name),
        "public_url": public_url,
        "proto": proto,
        "config": {
            "addr": spec.upstream.url(spec.proto),
            "inspect": t.target.captures.is_some(),
        },
        "metrics": {
            "conns": { "count": m.conns_total, "gauge": m.conns_open },
            "bytes": { "in": m.bytes_in, "out": m.bytes_out },
        },
        "origin": match t.origin { Origin::Config => "config", Origin::Api => "api" },
        "status": status,
        "started_at": humantime::format_rfc3339_millis(t.started).to_string(),
    });
    // Requests are only seen, so only counted, where the agent speaks HTTP.
    if t.target.captures.is_some() {
        v["metrics"]["http"] = json!({ "count": m.http_requests });
    }
    if let Some(error) = error {
        v["error"] = json!(error);
    }
    v
}

/// Header names as Go (and so ngrok) writes them: `Content-Type`.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Headers as a map of name to values, as ngrok gives them.
fn headers(h: &HeaderMap) -> Value {
    let mut map: Map<String, Value> = Map::new();
    for (name, value) in h {
        let entry = map
            .entry(canonical(name.as_str()))
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry {
            values.push(Value::String(
                String::from_utf8_lossy(value.as_bytes()).into(),
            ));
        }
    }
    Value::Object(map)
}

/// The message as HTTP/1.1 text (reconstructed from what hyper parsed) and
/// the captured body: ngrok's `raw`, base64.
fn raw(first_line: &str, h: &HeaderMap, body: &CapturedBody) -> String {
    let mut bytes = Vec::with_capacity(256 + body.data.len());
    bytes.extend_from_slice(first_line.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    for (name, value) in h {
        bytes.extend_from_slice(canonical(name.as_str()).as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(&body.data);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn body_state(b: &CapturedBody) -> Value {
    let state = match &b.state {
        BodyState::Streaming => json!("streaming"),
        BodyState::Complete => json!("complete"),
        BodyState::Cut(why) => json!(format!("cut: {why}")),
    };
    json!({ "size": b.size, "captured": b.data.len(), "truncated": b.truncated(), "state": state })
}

/// Adds Postern's `trailers` to a message object when it had any.
fn with_trailers(mut message: Value, body: &CapturedBody) -> Value {
    if !body.trailers.is_empty() {
        message["trailers"] = headers(&body.trailers);
    }
    message
}

/// A gRPC answer's status and message, from its trailers or, in a
/// trailers-only answer, its `headers` (the response's, made a map once).
fn grpc_status(resp: &ResponseCapture, headers: &HeaderMap) -> Option<(u64, Option<String>)> {
    let source = [&resp.body.trailers, headers]
        .into_iter()
        .find(|h| h.contains_key("grpc-status"))?;
    let status = source.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = source
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned());
    Some((status, message))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A CapturedRequest object.
pub(crate) fn captured(c: &Captured) -> Value {
    let r = &c.request;
    let request_headers = r.headers.map();
    let request = json!({
        "method": r.method.as_str(),
        "proto": http_version_text(r.version),
        "headers": headers(&request_headers),
        "uri": r.uri,
        "raw": raw(&format!("{} {} {}", r.method, r.uri, http_version_text(r.version)), &request_headers, &c.request_body),
        "body": body_state(&c.request_body),
    });
    let request = with_trailers(request, &c.request_body);
    let response = match &c.response {
        None => Value::Null,
        Some(resp) => {
            let status = status_text(resp.status);
            let response_headers = resp.headers.map();
            let mut v = json!({
                "status": status,
                "status_code": resp.status.as_u16(),
                "proto": http_version_text(resp.version),
                "headers": headers(&response_headers),
                "raw": raw(&format!("{} {status}", http_version_text(resp.version)), &response_headers, &resp.body),
                "body": body_state(&resp.body),
            });
            if let Some((status, message)) = grpc_status(resp, &response_headers) {
                v["grpc_status"] = json!(status);
                if let Some(message) = message {
                    v["grpc_message"] = json!(message);
                }
            }
            with_trailers(v, &resp.body)
        }
    };
    let mut v = json!({
        "uri": request_uri(&c.id),
        "id": c.id,
        "tunnel_name": c.tunnel_name,
        "remote_addr": c.remote_addr,
        "start": humantime::format_rfc3339_nanos(c.start).to_string(),
        "duration": c.duration.map_or(0, nanos),
        "request": request,
        "response": response,
    });
    if let Some(error) = &c.error {
        v["error"] = json!(error);
    }
    if let Some(of) = &c.replay_of {
        v["replay_of"] = json!(of);
    }
    v
}

fn status_text(s: StatusCode) -> String {
    match s.canonical_reason() {
        Some(reason) => format!("{} {reason}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}

/// ngrok's error object: `{error_code, status_code, msg, details: {err}}`.
/// The codes are Postern's: 100 not found, 101 method not allowed, 102
/// invalid request, 103 failed at the edge or upstream, 104 offline, 105
/// conflict, 106 not authorized, 107 forbidden.
pub(crate) fn error(status: StatusCode, code: u32, msg: &str, err: &str) -> Value {
    json!({
        "error_code": code,
        "status_code": status.as_u16(),
        "msg": msg,
        "details": { "err": err },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{HeaderValue, Version};

    use super::*;
    use crate::{config::parse_raw, forward::Target, inspect::Captures};

    fn tunnel_of(yaml: &str, state: BindState) -> Tunnel {
        let config = parse_raw(serde_yaml_ng::from_str(yaml).unwrap())
            .unwrap()
            .validate(None)
            .unwrap();
        let captures = Arc::new(Captures::new(1000));
        let target = Target::new(config.tunnels[0].clone(), Some(&captures)).expect("target");
        Tunnel {
            target: Arc::new(target),
            origin: Origin::Config,
            state,
            started: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn tunnel_object_has_ngroks_fields() {
        let t = tunnel_of(
            "authtoken: t\nserver_addr: e:1\ntunnels:\n  my web:\n    proto: http\n    addr: 8080\n",
            BindState::Bound {
                endpoint_id: "ep_1".into(),
                public_url: "https://app.example.test".into(),
            },
        );
        let _conn = t.target.metrics.open_conn();
        let v = tunnel(&t);
        assert_eq!(v["name"], "my web");
        assert_eq!(v["uri"], "/api/tunnels/my%20web");
        assert_eq!(v["public_url"], "https://app.example.test");
        assert_eq!(v["proto"], "https");
        assert_eq!(v["config"]["addr"], "http://localhost:8080");
        assert_eq!(v["config"]["inspect"], true);
        assert_eq!(v["metrics"]["conns"]["count"], 1);
        assert_eq!(v["metrics"]["conns"]["gauge"], 1);
        assert_eq!(v["metrics"]["http"]["count"], 0);
        assert!(
            v["metrics"]["conns"].get("p50").is_none(),
            "no fake percentiles"
        );
        assert_eq!(v["status"], "online");

        let t = tunnel_of(
            "authtoken: t\nserver_addr: e:1\ntunnels:\n  w:\n    proto: http\n    addr: 1\n    inspect: false\n",
            BindState::Failed {
                error: "ERR_POSTERN_334".into(),
                attempts: 1,
                retry_at: std::time::Instant::now(),
            },
        );
        let v = tunnel(&t);
        assert_eq!(v["config"]["inspect"], false);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"], "ERR_POSTERN_334");
        assert_eq!(v["public_url"], "");
    }

    #[test]
    fn captured_request_object() {
        let mut c = crate::inspect::store_tests::captured("airt_1", "web", 3);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        c.request.headers = headers.into();
        c.duration = Some(Duration::from_millis(3));
        let v = captured(&c);
        assert_eq!(v["uri"], "/api/requests/http/airt_1");
        assert_eq!(v["tunnel_name"], "web");
        assert_eq!(v["start"], "2023-11-14T22:13:20.000000000Z");
        assert_eq!(v["duration"], 3_000_000);
        assert_eq!(v["request"]["method"], "POST");
        assert_eq!(v["request"]["proto"], "HTTP/1.1");
        assert_eq!(v["request"]["uri"], "/items?x=1");
        assert_eq!(
            v["request"]["headers"]["Content-Type"][0],
            "application/json"
        );
        assert_eq!(v["request"]["headers"]["X-Multi"], json!(["a", "b"]));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["request"]["raw"].as_str().unwrap())
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.starts_with("POST /items?x=1 HTTP/1.1\r\n"), "{raw}");
        assert!(raw.ends_with("\r\n\r\naaa"), "{raw}");
        assert_eq!(
            v["response"],
            Value::Null,
            "null until the upstream answers"
        );
    }

    #[test]
    fn grpc_answers_show_their_trailers_and_status() {
        let mut c = crate::inspect::store_tests::captured("airt_2", "grpc", 7);
        c.request.version = Version::HTTP_2;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-served", HeaderValue::from_static("unary"));
        c.response = Some(ResponseCapture {
            status: StatusCode::OK,
            version: Version::HTTP_2,
            headers: HeaderMap::new().into(),
            body: CapturedBody {
                trailers,
                ..CapturedBody::default()
            },
        });
        let v = captured(&c);
        assert_eq!(v["request"]["proto"], "HTTP/2.0");
        assert!(v["request"].get("trailers").is_none(), "none sent");
        assert_eq!(v["response"]["trailers"]["Grpc-Status"], json!(["0"]));
        assert_eq!(v["response"]["trailers"]["X-Served"], json!(["unary"]));
        assert_eq!(v["response"]["grpc_status"], 0);

        // A trailers-only answer carries the status in its headers.
        let response = c.response.as_mut().unwrap();
        response.body.trailers.clear();
        // As the passive inspector keeps them: the head as it passed.
        response.headers = crate::inspect::Headers::Head(bytes::Bytes::from_static(
            b"HTTP/1.1 200 OK\r\ngrpc-status: 3\r\ngrpc-message: bad thing\r\n\r\n",
        ));
        let v = captured(&c);
        assert_eq!(v["response"]["grpc_status"], 3);
        assert_eq!(v["response"]["grpc_message"], "bad thing");
        assert!(v["response"].get("trailers").is_none());
    }

    #[test]
    fn error_object_shape() {
        let v = error(
            StatusCode::BAD_REQUEST,
            102,
            "invalid tunnel configuration",
            "unknown field `colour`",
        );
        assert_eq!(v["error_code"], 102);
        assert_eq!(v["status_code"], 400);
        assert_eq!(v["details"]["err"], "unknown field `colour`");
    }
}
