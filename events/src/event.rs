//! The two traffic events, with ngrok's field names and nesting.
//!
//! Every field of `object` is optional, as ngrok's selectable fields make
//! them; absent fields are not serialised. Decisions where ngrok's own
//! material contradicts itself:
//! - `http.request.method` is the method as the client sent it (`"GET"`),
//!   as in ngrok's example payloads and the Datadog pipeline, not the
//!   lower case of the field table.
//! - `conn.server_port` is an integer (the field table's `int32`), never the
//!   empty string of the examples.
//! - timestamps are RFC 3339 with nanoseconds, UTC (`Z`).
//! - `tls.version` is `"TLSv1.2"` / `"TLSv1.3"`; `tls.cipher_suite` is the
//!   IANA name (`"TLS_AES_128_GCM_SHA256"`).
//!
//! Postern's additions live under `object.postern`, so consumers of ngrok's
//! events read Postern's unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `http_request_complete.v0`
pub const HTTP_REQUEST_COMPLETE: &str = "http_request_complete.v0";
/// `tcp_connection_closed.v0`
pub const TCP_CONNECTION_CLOSED: &str = "tcp_connection_closed.v0";

/// Timestamps as RFC 3339 strings with nanoseconds.
pub type Timestamp = String;

/// The event types Postern publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    HttpRequestComplete,
    TcpConnectionClosed,
}

impl EventType {
    pub const ALL: [EventType; 2] = [
        EventType::HttpRequestComplete,
        EventType::TcpConnectionClosed,
    ];

    /// ngrok's name, `http_request_complete.v0`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::HttpRequestComplete => HTTP_REQUEST_COMPLETE,
            EventType::TcpConnectionClosed => TCP_CONNECTION_CLOSED,
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The envelope every event travels in. Deserialising picks the shape of
/// `object` from `event_type`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// `ev_` + 27 base-62 characters.
    pub event_id: String,
    pub event_type: String,
    pub event_timestamp: Timestamp,
    /// `ac_…`; one configured account per deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub object: EventObject,
    /// Always null for traffic events.
    pub principal: Option<serde_json::Value>,
}

impl Event {
    /// The type named by `event_type`, if Postern knows it.
    pub fn kind(&self) -> Option<EventType> {
        EventType::parse(&self.event_type)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Event, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        struct Envelope {
            event_id: String,
            event_type: String,
            event_timestamp: Timestamp,
            #[serde(default)]
            account_id: Option<String>,
            object: serde_json::Value,
            #[serde(default)]
            principal: Option<serde_json::Value>,
        }
        let e = Envelope::deserialize(deserializer)?;
        let object = match EventType::parse(&e.event_type) {
            Some(EventType::HttpRequestComplete) => {
                EventObject::Http(serde_json::from_value(e.object).map_err(D::Error::custom)?)
            }
            Some(EventType::TcpConnectionClosed) => {
                EventObject::Tcp(serde_json::from_value(e.object).map_err(D::Error::custom)?)
            }
            None => {
                return Err(D::Error::custom(format_args!(
                    "unknown event_type {:?}",
                    e.event_type
                )));
            }
        };
        Ok(Event {
            event_id: e.event_id,
            event_type: e.event_type,
            event_timestamp: e.event_timestamp,
            account_id: e.account_id,
            object,
            principal: e.principal,
        })
    }
}

/// The body of an event; which one is told by `event_type`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventObject {
    Http(Box<HttpRequestComplete>),
    Tcp(Box<TcpConnectionClosed>),
}

impl EventObject {
    /// `conn.*`, which both objects have.
    pub fn conn(&self) -> Option<&Conn> {
        match self {
            EventObject::Http(o) => o.conn.as_ref(),
            EventObject::Tcp(o) => o.conn.as_ref(),
        }
    }

    /// `postern.*`, which both objects have.
    pub fn postern(&self) -> Option<&PosternFields> {
        match self {
            EventObject::Http(o) => o.postern.as_ref(),
            EventObject::Tcp(o) => o.postern.as_ref(),
        }
    }
}

/// `object` of `http_request_complete.v0`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRequestComplete {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<Conn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_policy: Option<DecisionField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<DecisionField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_verification: Option<DecisionField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent_filter: Option<DecisionField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicyLogs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postern: Option<PosternFields>,
}

/// `object` of `tcp_connection_closed.v0`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpConnectionClosed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<Conn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_policy: Option<DecisionField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicyLogs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postern: Option<PosternFields>,
}

/// `conn.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Conn {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_ts: Option<Timestamp>,
    /// TCP events only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_ts: Option<Timestamp>,
    /// TCP events only: bytes from the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// TCP events only: bytes to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
}

/// `http.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Http {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<HttpRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponse>,
}

/// Headers as ngrok's events carry them: each key capitalised per word
/// (`content-type` as `Content-Type`), values lower-cased (bytes that are
/// not UTF-8 as U+FFFD), every value kept, as a JSON object of arrays.
///
/// They are held as the `HeaderMap` they came from, whose names and values
/// are shared rather than copied, and normalised only while the event is
/// written: a request costs its event one copy of the map, not a string
/// per header name and value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers(http::HeaderMap);

impl Headers {
    pub fn new(headers: &http::HeaderMap) -> Headers {
        Headers(headers.clone())
    }
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            map.serialize_entry(&Capitalised(name.as_str()), &Values(self.0.get_all(name)))?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Headers, D::Error> {
        use serde::de::Error;
        let written = BTreeMap::<String, Vec<String>>::deserialize(deserializer)?;
        let mut map = http::HeaderMap::new();
        for (name, values) in written {
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                D::Error::custom(format_args!("{name:?} is not an HTTP header name"))
            })?;
            for value in values {
                let value = http::HeaderValue::from_str(&value).map_err(|_| {
                    D::Error::custom(format_args!(
                        "the value {value:?} of header {name} is not an HTTP header value"
                    ))
                })?;
                map.append(name.clone(), value);
            }
        }
        Ok(Headers(map))
    }
}

/// One header's values, each lower-cased.
struct Values<'a>(http::header::GetAll<'a, http::HeaderValue>);

impl Serialize for Values<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|v| Lowercase(v.as_bytes())))
    }
}

/// Names and values up to this long are rewritten on the stack; longer
/// ones (rare) in a string of their own.
const ON_STACK: usize = 128;

/// Serialises `text` changed byte by byte by `change` (ASCII to ASCII),
/// without allocating when it is short.
fn serialize_changed<S: serde::Serializer>(
    serializer: S,
    text: &str,
    change: impl FnMut(u8) -> u8,
) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; ON_STACK];
    if text.len() <= ON_STACK {
        let out = &mut buf[..text.len()];
        for (o, b) in out.iter_mut().zip(text.bytes().map(change)) {
            *o = b;
        }
        // ASCII stays ASCII, so this is UTF-8; a change that broke that
        // would be written as U+FFFD rather than fail the event.
        serializer.serialize_str(&String::from_utf8_lossy(out))
    } else {
        let changed: Vec<u8> = text.bytes().map(change).collect();
        serializer.serialize_str(&String::from_utf8_lossy(&changed))
    }
}

/// A header name (lower case, ASCII) written capitalised per word.
struct Capitalised<'a>(&'a str);

impl Serialize for Capitalised<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut word_start = true;
        serialize_changed(serializer, self.0, |b| {
            let out = if word_start {
                b.to_ascii_uppercase()
            } else {
                b
            };
            word_start = b == b'-';
            out
        })
    }
}

/// A header value written lower-cased, with U+FFFD for bytes that are not
/// UTF-8 (as `String::from_utf8_lossy(..).to_lowercase()`), allocating
/// only for values that are long or not ASCII.
struct Lowercase<'a>(&'a [u8]);

impl Serialize for Lowercase<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) if text.is_ascii() => {
                if text.bytes().any(|b| b.is_ascii_uppercase()) {
                    serialize_changed(serializer, text, |b| b.to_ascii_lowercase())
                } else {
                    serializer.serialize_str(text)
                }
            }
            _ => serializer.serialize_str(&String::from_utf8_lossy(self.0).to_lowercase()),
        }
    }
}

/// `http.request.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `"HTTP/1.1"`, `"HTTP/2.0"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Url>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte_ts: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_byte_ts: Option<Timestamp>,
}

/// `http.request.url.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Url {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// `http.response.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte_ts: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_byte_ts: Option<Timestamp>,
}

/// `tls.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<ClientCert>,
}

/// `tls.client_cert.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientCert {
    /// Upper-case hex, colon-separated (`"0A:1B:…"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
}

/// `tls.client_cert.subject.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
}

/// `oauth.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<OAuthUser>,
}

/// `oauth.user.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OAuthUser {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A module's `allow` / `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Block,
}

/// `ip_policy.decision` and the like.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionField {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// `basic_auth.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BasicAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

/// `compression.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// `gzip`, `deflate`, `br` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// `traffic_policy.logs`: what the policy's `log` actions recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficPolicyLogs {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub logs: Vec<serde_json::Value>,
}

/// `backend.*`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_reused: Option<bool>,
}

/// `postern.*`: what Postern adds to ngrok's fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PosternFields {
    /// Region and node that received the visitor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Region and node whose agent served it (differs when routed across regions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_session_id: Option<String>,
    /// `tls` or `tcp` for connection events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_proto: Option<String>,
    /// `ERR_POSTERN_<n>` when the edge failed or refused the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Whole request or connection, in milliseconds (fractional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// A gRPC answer's status code (`grpc-status`, from its trailers or a
    /// trailers-only response).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PosternClientCert>,
}

/// `postern.client_cert.*`: what ngrok does not report of the client certificate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PosternClientCert {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Lower-case hex SHA-256 of the DER certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub san_dns: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
}
