//! What a policy's expressions see: the connection, the endpoint, the
//! request and response as they are at that point, and what earlier
//! actions found. Each turns into a CEL value only when an expression
//! names it.

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::SystemTime};

use cel::Value;
use http::HeaderMap;

use super::cel::{Scratch, map_value};
use crate::mtls::ClientIdentity;

/// The visitor's connection.
#[derive(Clone, Debug)]
pub struct ConnFacts {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// This node's region.
    pub region: Arc<str>,
    pub start: SystemTime,
    pub tls: Option<TlsFacts>,
}

/// The TLS of the visitor's connection, when the edge terminated it.
#[derive(Clone, Debug, Default)]
pub struct TlsFacts {
    pub sni: Option<String>,
    pub version: String,
    pub cipher_suite: String,
    /// The client's certificate chain, leaf first, if it sent one.
    pub peer_chain: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
    /// The verified client certificate, once the mutual TLS module has
    /// read it.
    pub client: Option<ClientIdentity>,
}

/// The endpoint serving.
#[derive(Clone, Debug)]
pub struct EndpointFacts {
    pub id: String,
    pub url: String,
    pub host: String,
    pub port: u16,
    /// `https`, `http`, `tls` or `tcp`.
    pub protocol: &'static str,
}

impl EndpointFacts {
    pub(crate) fn of(endpoint: &crate::endpoint::Endpoint) -> EndpointFacts {
        let protocol = match endpoint.kind {
            crate::endpoint::EndpointKind::Http => "https",
            crate::endpoint::EndpointKind::Tls { .. } => "tls",
            crate::endpoint::EndpointKind::Tcp { .. } => "tcp",
        };
        let authority = endpoint
            .public_url
            .split_once("://")
            .map_or(endpoint.public_url.as_str(), |(_, rest)| rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                (host, port.parse().unwrap_or_default())
            }
            _ => (authority, 443),
        };
        EndpointFacts {
            id: endpoint.id.clone(),
            url: endpoint.public_url.clone(),
            host: host.to_string(),
            port,
            protocol,
        }
    }
}

/// The request as the policy has it so far.
pub(crate) struct ReqView<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub version: http::Version,
    pub headers: &'a HeaderMap,
    /// `http` or `https`: how the visitor reached the edge.
    pub scheme: &'static str,
    /// The routed name.
    pub host: &'a str,
    /// The name and port as the visitor wrote them (`Host`).
    pub authority: &'a str,
}

impl<'a> ReqView<'a> {
    pub fn of<B>(req: &'a http::Request<B>, scheme: &'static str, host: &'a str) -> Self {
        ReqView {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            scheme,
            host,
            authority: crate::http::request_host(req).unwrap_or(host),
        }
    }

    /// `scheme://authority/path?query`, the URL as the visitor asked for it.
    pub fn url(&self) -> String {
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        format!("{}://{}{path}", self.scheme, self.authority)
    }
}

/// The response as the policy has it so far: status and headers.
pub(crate) type ResView<'a> = (http::StatusCode, &'a HeaderMap);

/// One field's value: text and numbers as they are, anything else as the
/// CEL value.
pub(crate) enum Fact<'a> {
    Text(Cow<'a, str>),
    Int(i64),
    Value(Value),
}

impl Fact<'_> {
    fn into_value(self) -> Value {
        match self {
            Fact::Text(t) => s(t.into_owned()),
            Fact::Int(i) => Value::Int(i),
            Fact::Value(v) => v,
        }
    }
}

/// Everything one evaluation may read.
pub(crate) struct Facts<'a> {
    pub conn: &'a ConnFacts,
    pub endpoint: &'a EndpointFacts,
    pub req: Option<ReqView<'a>>,
    pub res: Option<ResView<'a>>,
    pub scratch: &'a Scratch,
}

fn s(v: impl Into<String>) -> Value {
    Value::String(Arc::new(v.into()))
}

fn list(items: impl IntoIterator<Item = String>) -> Value {
    Value::List(Arc::new(items.into_iter().map(s).collect()))
}

/// Header names (lower case) to their values, in order.
fn headers_value(headers: &HeaderMap) -> Value {
    let mut map: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for (name, value) in headers {
        map.entry(name.as_str().to_string())
            .or_default()
            .push(s(String::from_utf8_lossy(value.as_bytes())));
    }
    map_value(
        map.iter()
            .map(|(k, v)| (k.as_str(), Value::List(Arc::new(v.clone())))),
    )
}

/// Words that give a crawler or a script away in its `User-Agent`.
const BOT_MARKERS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "curl/",
    "wget/",
    "python-requests",
    "httpclient",
    "go-http-client",
    "headless",
    "facebookexternalhit",
    "preview",
];

/// `req.user_agent`: the header (`raw`) and what can be read from it.
fn user_agent(headers: &HeaderMap) -> Value {
    let raw = headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let lower = raw.to_ascii_lowercase();
    let is_bot = BOT_MARKERS.iter().any(|m| lower.contains(m));
    let is_tablet = lower.contains("ipad") || lower.contains("tablet");
    let is_mobile = !is_tablet
        && (lower.contains("mobile") || lower.contains("iphone") || lower.contains("android"));
    let (name, version) = raw
        .split_whitespace()
        .rev()
        .filter_map(|token| token.split_once('/'))
        .find(|(name, _)| !matches!(*name, "Safari" | "Mobile" | "AppleWebKit" | "Gecko"))
        .or_else(|| {
            raw.split_whitespace()
                .next()
                .and_then(|t| t.split_once('/'))
        })
        .unwrap_or((raw, ""));
    // Products that name themselves otherwise in the header.
    let name = match name {
        "Edg" | "EdgA" | "EdgiOS" => "Edge",
        "OPR" => "Opera",
        "CriOS" => "Chrome",
        "FxiOS" => "Firefox",
        other => other,
    };
    let os = [
        "Windows",
        "Android",
        "iPhone OS",
        "Mac OS X",
        "Linux",
        "CrOS",
    ]
    .iter()
    .find(|os| raw.contains(*os))
    .copied()
    .unwrap_or("");
    map_value([
        ("raw", s(raw)),
        ("name", s(name)),
        ("version", s(version)),
        ("os", s(os)),
        ("is_bot", Value::Bool(is_bot)),
        ("is_mobile", Value::Bool(is_mobile)),
        ("is_tablet", Value::Bool(is_tablet)),
        (
            "is_desktop",
            Value::Bool(!raw.is_empty() && !is_bot && !is_mobile && !is_tablet),
        ),
    ])
}

/// `a=1&b=2&a=3` as `{a: [1, 3], b: [2]}`, percent-decoded.
fn query_params(query: &str) -> Value {
    let mut map: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.entry(percent_decode(k))
            .or_default()
            .push(s(percent_decode(v)));
    }
    map_value(
        map.iter()
            .map(|(k, v)| (k.as_str(), Value::List(Arc::new(v.clone())))),
    )
}

pub(crate) fn percent_decode(text: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Cookie: a=1; b=2` as `{a: ['1'], b: ['2']}`.
fn cookies(headers: &HeaderMap) -> Value {
    let mut map: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for value in headers.get_all(http::header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let pair = pair.trim();
            if let Some((k, v)) = pair.split_once('=') {
                map.entry(k.trim().to_string())
                    .or_default()
                    .push(s(v.trim()));
            }
        }
    }
    map_value(
        map.iter()
            .map(|(k, v)| (k.as_str(), Value::List(Arc::new(v.clone())))),
    )
}

/// `conn.tls`.
fn tls_value(t: &TlsFacts) -> Value {
    let client = t.client.as_ref().map(|id| {
        map_value([
            (
                "subject",
                map_value([("common_name", s(id.subject_cn.clone().unwrap_or_default()))]),
            ),
            ("serial_number", s(id.serial.clone())),
            (
                "san",
                map_value([
                    ("dns_names", list(id.san_dns.clone())),
                    ("email_addresses", list(id.emails.clone())),
                ]),
            ),
            (
                "validity",
                map_value([(
                    "not_after",
                    s(postern_events::timestamp(id.not_after_time())),
                )]),
            ),
        ])
    });
    map_value([
        ("sni", s(t.sni.clone().unwrap_or_default())),
        ("version", s(t.version.clone())),
        ("cipher_suite", s(t.cipher_suite.clone())),
        ("client", client.unwrap_or(Value::Null)),
    ])
}

/// The fields requests and responses share, read from their headers.
fn message_field<'a>(headers: &'a HeaderMap, field: &str) -> Option<Fact<'a>> {
    let header = |name| {
        text(
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        )
    };
    Some(match field {
        "content_length" => Fact::Int(
            headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1),
        ),
        "content_type" => header(http::header::CONTENT_TYPE),
        "content_encoding" => header(http::header::CONTENT_ENCODING),
        "location" => header(http::header::LOCATION),
        _ => return None,
    })
}

/// The fields of each variable, in the order a whole map lists them.
const CONN_FIELDS: &[&str] = &[
    "client_ip",
    "client_port",
    "server_ip",
    "server_port",
    "server_region",
    "ts",
    "tls",
];
const ENDPOINT_FIELDS: &[&str] = &["id", "url", "host", "port", "protocol"];
const REQ_FIELDS: &[&str] = &[
    "method",
    "host",
    "url",
    "headers",
    "cookies",
    "content_length",
    "content_type",
    "content_encoding",
    "location",
    "version",
    "user_agent",
];
const URL_FIELDS: &[&str] = &[
    "scheme",
    "host",
    "port",
    "path",
    "raw_path",
    "query",
    "query_params",
    "authority",
    "uri",
    "raw",
];
const RES_FIELDS: &[&str] = &[
    "status_code",
    "headers",
    "content_length",
    "content_type",
    "content_encoding",
    "location",
];

/// A map of `fields`, each from `field`.
fn fields_value<'a>(fields: &[&'static str], field: impl Fn(&str) -> Option<Fact<'a>>) -> Value {
    map_value(
        fields
            .iter()
            .map(|name| (*name, field(name).map_or(Value::Null, Fact::into_value))),
    )
}

fn text<'a>(t: impl Into<Cow<'a, str>>) -> Fact<'a> {
    Fact::Text(t.into())
}

impl Facts<'_> {
    /// The value a dotted name (`req.url.path`, `conn.client_ip`) stands
    /// for, built alone, when it is one Postern builds alone; `None` leaves
    /// it to a shorter name and field selection. Evaluations ask for the
    /// longest name first, so an expression reading `req.method` never
    /// builds the whole request.
    pub fn lookup(&self, name: &str) -> Option<Value> {
        let mut parts = name.split('.');
        let root = parts.next()?;
        let (first, second, rest) = (parts.next(), parts.next(), parts.next());
        if rest.is_some() {
            return None;
        }
        let Some(first) = first else {
            return self.whole(root);
        };
        self.fact(root, first, second).map(Fact::into_value)
    }

    /// A whole variable.
    fn whole(&self, root: &str) -> Option<Value> {
        Some(match root {
            "conn" => fields_value(CONN_FIELDS, |f| self.conn_field(f)),
            "endpoint" => fields_value(ENDPOINT_FIELDS, |f| self.endpoint_field(f)),
            "req" => {
                self.req.as_ref()?;
                fields_value(REQ_FIELDS, |f| self.req_field(f))
            }
            "res" => {
                self.res.as_ref()?;
                fields_value(RES_FIELDS, |f| self.res_field(f))
            }
            "time" => map_value([(
                "now",
                Value::from(postern_events::timestamp(SystemTime::now())),
            )]),
            "actions" => self.actions_value(),
            "vars" => self.vars_value(),
            _ => return None,
        })
    }

    /// `root.first` or `root.first.second`, when Postern builds it alone.
    pub fn fact(&self, root: &str, first: &str, second: Option<&str>) -> Option<Fact<'_>> {
        match (root, second) {
            ("conn", None) => self.conn_field(first),
            ("endpoint", None) => self.endpoint_field(first),
            ("req", None) => self.req_field(first),
            ("req", Some(f)) if first == "url" => self.url_field(f),
            ("req", Some("raw")) if first == "user_agent" => Some(text(
                self.req
                    .as_ref()?
                    .headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default(),
            )),
            ("res", None) => self.res_field(first),
            _ => None,
        }
    }

    fn conn_field(&self, field: &str) -> Option<Fact<'_>> {
        let c = self.conn;
        Some(match field {
            "client_ip" => text(crate::outcome::ip_text(c.client.ip())),
            "client_port" => Fact::Int(i64::from(c.client.port())),
            "server_ip" => text(crate::outcome::ip_text(c.server.ip())),
            "server_port" => Fact::Int(i64::from(c.server.port())),
            "server_region" => text(&*c.region),
            "ts" => Fact::Value(map_value([(
                "start",
                s(postern_events::timestamp(c.start)),
            )])),
            "tls" => Fact::Value(c.tls.as_ref().map_or(Value::Null, tls_value)),
            _ => return None,
        })
    }

    fn endpoint_field(&self, field: &str) -> Option<Fact<'_>> {
        let e = self.endpoint;
        Some(match field {
            "id" => text(e.id.as_str()),
            "url" => text(e.url.as_str()),
            "host" => text(e.host.as_str()),
            "port" => Fact::Int(i64::from(e.port)),
            "protocol" => text(e.protocol),
            _ => return None,
        })
    }

    fn req_field(&self, field: &str) -> Option<Fact<'_>> {
        let r = self.req.as_ref()?;
        let headers = r.headers;
        Some(match field {
            "method" => text(r.method.as_str()),
            "host" => text(r.host),
            "url" => Fact::Value(fields_value(URL_FIELDS, |f| self.url_field(f))),
            "headers" => Fact::Value(headers_value(headers)),
            "cookies" => Fact::Value(cookies(headers)),
            "version" => text(postern_net::http_version_text(r.version)),
            "user_agent" => Fact::Value(user_agent(headers)),
            other => return message_field(headers, other),
        })
    }

    fn url_field(&self, field: &str) -> Option<Fact<'_>> {
        let r = self.req.as_ref()?;
        let uri = r.uri;
        let query = || uri.query().unwrap_or_default();
        Some(match field {
            "scheme" => text(r.scheme),
            "host" => text(r.host),
            "port" => Fact::Int(
                r.authority
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<i64>().ok())
                    .unwrap_or(if r.scheme == "https" { 443 } else { 80 }),
            ),
            "path" => text(percent_decode(uri.path())),
            "raw_path" => text(uri.path()),
            "query" => text(query()),
            "query_params" => Fact::Value(query_params(query())),
            "authority" => text(r.authority),
            "uri" => text(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
            "raw" => text(r.url()),
            _ => return None,
        })
    }

    fn res_field(&self, field: &str) -> Option<Fact<'_>> {
        let (status, headers) = self.res?;
        match field {
            "status_code" => Some(Fact::Int(i64::from(status.as_u16()))),
            "headers" => Some(Fact::Value(headers_value(headers))),
            other => message_field(headers, other),
        }
    }

    /// Whether `req` or `res` has a header named `lower` (lower case).
    pub fn has_header(&self, root: &str, lower: &str) -> Option<bool> {
        let headers = match root {
            "req" => self.req.as_ref()?.headers,
            "res" => self.res?.1,
            _ => return None,
        };
        Some(headers.contains_key(lower))
    }

    pub fn actions_value(&self) -> Value {
        map_value([(
            "ngrok",
            map_value(self.scratch.actions.iter().map(|(k, v)| (*k, v.clone()))),
        )])
    }

    pub fn vars_value(&self) -> Value {
        map_value(
            self.scratch
                .vars
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone())),
        )
    }
}

/// A connection, endpoint and scratch for unit tests to build [`Facts`]
/// on.
#[cfg(test)]
pub(crate) struct Sample {
    conn: ConnFacts,
    endpoint: EndpointFacts,
    scratch: super::cel::Scratch,
}

#[cfg(test)]
impl Sample {
    pub fn new() -> Sample {
        Sample {
            conn: ConnFacts {
                client: "192.0.2.7:5000".parse().unwrap(),
                server: "127.0.0.1:443".parse().unwrap(),
                region: "eu".into(),
                start: SystemTime::now(),
                tls: None,
            },
            endpoint: EndpointFacts {
                id: "ep_1".into(),
                url: "https://a.example.test".into(),
                host: "a.example.test".into(),
                port: 443,
                protocol: "https",
            },
            scratch: Default::default(),
        }
    }

    /// The facts of `req` (and `res`) reaching `https://a.example.test`.
    pub fn facts<'a>(&'a self, req: &'a http::Request<()>, res: Option<ResView<'a>>) -> Facts<'a> {
        Facts {
            conn: &self.conn,
            endpoint: &self.endpoint,
            req: Some(ReqView::of(req, "https", "a.example.test")),
            res,
            scratch: &self.scratch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}
