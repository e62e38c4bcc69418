//! The agent's configuration: ngrok v2-style YAML files (several may be
//! given; later files win, maps merge key by key), overlaid by CLI flags, then
//! validated into an [`AgentConfig`] that cannot hold a bad value.
//!
//! Keys ngrok has that Postern does not act on are accepted with a warning,
//! so an existing `ngrok.yml` loads; any other unknown key is an error that
//! names it.

use std::{fmt, path::Path, time::Duration};

use postern_net::{IpPolicy, Secret, parse_ca_bundle, proxy_header};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use crate::error::{ConfigError, bail, invalid};

mod url;
mod v3;

/// ngrok agent keys Postern accepts and ignores.
const IGNORED_AGENT_KEYS: &[&str] = &[
    "connect_interface",
    "console_ui",
    "console_ui_color",
    "crl_noverify",
    "dns_resolver_ips",
    "log",
    "log_level",
    "log_format",
    "metadata",
    "remote_management",
    "update_channel",
    "update_check",
];

/// ngrok tunnel keys Postern accepts and ignores.
const IGNORED_TUNNEL_KEYS: &[&str] = &["metadata", "bind_tls"];

/// The config file as written (after merging).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    /// `"2"`; other versions are refused.
    pub version: Option<Value>,
    pub authtoken: Option<Secret>,
    /// `host:port` of the edge's agent listener.
    pub server_addr: Option<String>,
    /// Region code; with `connect_domain` gives `tunnel.<region>.connect.<connect_domain>:443`.
    pub region: Option<String>,
    /// Postern: base domain of the agent ingress (the edge's `domain`).
    pub connect_domain: Option<String>,
    /// Postern: TLS name to verify instead of the `server_addr` host.
    pub tls_server_name: Option<String>,
    /// `host` (the system's trust store or `SSL_CERT_FILE`/`SSL_CERT_DIR`,
    /// the default), `trusted` (the Mozilla roots built in), or a PEM file
    /// of CAs to trust instead.
    pub root_cas: Option<String>,
    /// An outbound proxy for the tunnel connection: `http://`, `https://`
    /// or `socks5://`, with `user:password@` when it wants them. Default:
    /// `HTTPS_PROXY` / `ALL_PROXY`; `NO_PROXY` names hosts that bypass it.
    pub proxy_url: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_tolerance: Option<String>,
    /// Where the agent API and inspector listen: `host:port` (default
    /// `127.0.0.1:4040`, trying the next ports when it is taken), or `false`
    /// for neither.
    pub web_addr: Option<Value>,
    /// Extra `Host` values the agent API answers besides loopback names:
    /// IPs, CIDRs, exact names, or `.suffix` for a domain and its subdomains.
    #[serde(default)]
    pub web_allow_hosts: Vec<String>,
    /// Postern: credentials the agent API requires (`bearer_token` or
    /// `basic: "user:password"`).
    pub web_auth: Option<crate::api::RawWebAuth>,
    /// Bytes of captured HTTP requests kept for the inspector: 0 is the
    /// default (50 MB), -1 turns inspection off.
    pub inspect_db_size: Option<i64>,
    pub connect_timeout: Option<String>,
    /// Postern: idle data streams kept open for the edge (0: open on demand).
    pub stream_pool: Option<u32>,
    /// Postern: connections to the edge per session, the data streams
    /// spread across them (default: one per core, at most 4).
    pub connections: Option<u32>,
    /// Client certificates for TLS upstreams, keyed `host:port`, with `*`
    /// as the default.
    #[serde(default)]
    pub upstream_tls: std::collections::BTreeMap<String, RawUpstreamTls>,
    #[serde(default)]
    pub tunnels: indexmap_like::Tunnels,
    /// ngrok's key for `ngrok api`: the edge's admin API key, used by
    /// `postern api` (after `--api-key` and `POSTERN_API_KEY`).
    pub api_key: Option<Secret>,
    /// Postern: the edge's admin API, `http://host:port` or `https://…`
    /// (default `http://127.0.0.1:9090`, the edge's default admin listener),
    /// used by `postern api` (after `--api-url` and `POSTERN_API_URL`).
    pub api_url: Option<String>,
}

/// Tunnel definitions keep their file order (serde_yaml's Mapping does).
pub mod indexmap_like {
    use super::RawTunnel;
    use serde::{Deserialize, Deserializer};

    #[derive(Debug, Default)]
    pub struct Tunnels(pub Vec<(String, RawTunnel)>);

    impl<'de> Deserialize<'de> for Tunnels {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let map = serde_yaml_ng::Mapping::deserialize(d)?;
            let mut out = Vec::new();
            for (k, v) in map {
                let name = k
                    .as_str()
                    .ok_or_else(|| serde::de::Error::custom("tunnel names must be strings"))?
                    .to_string();
                let tunnel = super::raw_tunnel(v)
                    .map_err(|e| serde::de::Error::custom(format!("tunnels.{name}.{e}")))?;
                out.push((name, tunnel));
            }
            Ok(Tunnels(out))
        }
    }
}

/// One tunnel as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnel {
    /// `http`, `tls` or `tcp`.
    pub proto: Option<String>,
    /// Upstream: `8080`, `host:port`, `http://…`, `https://…` or `tls://…`.
    pub addr: Option<Value>,
    /// HTTP/TLS: the domain to serve (`app.example.com` or `*.example.com`).
    pub domain: Option<String>,
    /// Older ngrok name for `domain`.
    pub hostname: Option<String>,
    /// ngrok's endpoint URL (`--url`): `https://app.example.com`,
    /// `tls://…`, `tcp://host:port`, a bare host, or a scheme alone.
    pub url: Option<String>,
    /// HTTP/TLS: a label under the edge's base domain for random names.
    pub subdomain: Option<String>,
    /// TCP: `host:port` to ask for (the port is what counts).
    pub remote_addr: Option<String>,
    /// TLS: `edge`, `agent` or `upstream`.
    pub terminate_at: Option<String>,
    /// TLS: certificate and key (for `terminate_at: agent`, or sent to the edge).
    pub crt: Option<String>,
    pub key: Option<String>,
    /// `1` or `2`: write a PROXY protocol header to the upstream.
    pub proxy_proto: Option<Value>,
    /// Postern: verify an `https://`/`tls://` upstream's certificate (default true).
    pub upstream_tls_verify: Option<bool>,
    /// HTTP tunnels: `http1` (default) or `http2` (ngrok's v3
    /// `upstream.protocol`): the upstream speaks HTTP/2, h2c for `http://`.
    pub upstream_protocol: Option<String>,
    /// Mutual TLS: a PEM file of CAs client certificates must chain to, or
    /// ids of CAs in the edge's store (`ca_…`, a list or comma-separated).
    pub mutual_tls_cas: Option<Value>,
    /// ngrok's IP restrictions: `{allow_cidrs: [...], deny_cidrs: [...]}`.
    pub ip_restriction: Option<RawIpRestriction>,
    /// HTTP: capture requests for the inspector (default true).
    pub inspect: Option<bool>,
    /// HTTP: log visitors in with a named OAuth provider (ngrok's module).
    pub oauth: Option<crate::oauth::RawOAuth>,
    /// HTTP: log visitors in with any OpenID Provider.
    pub oidc: Option<crate::oauth::RawOidc>,
    /// ngrok's endpoint pooling: share the name or port with other agents
    /// that pool with the same settings; the edge balances across them.
    pub pooling_enabled: Option<bool>,
    /// ngrok's Traffic Policy for the endpoint: the document inline (a
    /// map), or its YAML or JSON text (`--traffic-policy-file` reads a
    /// file into it). `policy` is the name before ngrok agent 3.14.
    #[serde(alias = "policy")]
    pub traffic_policy: Option<Value>,
    /// HTTP: ngrok's modules (see `modules.rs`).
    pub basic_auth: Option<Vec<String>>,
    pub request_header: Option<crate::modules::RawHeaderEdits>,
    pub response_header: Option<crate::modules::RawHeaderEdits>,
    pub host_header: Option<String>,
    pub compression: Option<bool>,
    pub circuit_breaker: Option<f64>,
    #[serde(alias = "webhook_verification")]
    pub verify_webhook: Option<crate::modules::RawVerifyWebhook>,
    pub user_agent_filter: Option<crate::modules::RawUserAgentFilter>,
    pub websocket_tcp_converter: Option<bool>,
    pub schemes: Option<Vec<String>>,
}

/// Who may connect to an endpoint, by source address.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpRestriction {
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
}

/// Client certificate and trusted CA for one upstream (Tyk's "upstream
/// certificates"), keyed `host:port` or `*` in the agent config.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// Certificate (PEM) presented to the upstream.
    pub crt: Option<String>,
    pub key: Option<String>,
    /// CA (PEM) the upstream's certificate must chain to; default: the
    /// system roots.
    pub ca: Option<String>,
}

/// Where client certificates are checked.
#[derive(Clone, Debug)]
pub enum MutualTlsCas {
    /// A PEM bundle, checked where TLS ends (the edge, or this agent).
    Pem(Vec<u8>),
    /// CAs in the edge's store.
    Ids(Vec<String>),
}

/// What the agent presents to, and trusts of, a TLS upstream.
#[derive(Clone, Debug, Default)]
pub struct UpstreamTls {
    pub crt_key: Option<(Vec<u8>, Secret)>,
    pub ca_pem: Option<Vec<u8>>,
}

/// The tunnel's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http,
    Tls,
    Tcp,
}

/// Where TLS ends for a TLS tunnel.
pub use postern_proto::TerminateAt;

/// Where the agent sends the traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// Wrap the upstream connection in TLS.
    pub tls: bool,
    /// Verify the upstream's certificate.
    pub verify: bool,
    /// The upstream speaks HTTP/2 (`upstream_protocol: http2`).
    pub http2: bool,
}

impl Upstream {
    /// How the upstream reads for a tunnel of `proto`, e.g.
    /// `http://localhost:8080` or `tls://db:5433`.
    pub fn url(&self, proto: Proto) -> String {
        let scheme = match (proto, self.tls) {
            (Proto::Http, false) => "http://",
            (Proto::Http, true) => "https://",
            (_, true) => "tls://",
            (_, false) => "",
        };
        format!("{scheme}{self}")
    }

    /// What `host_header: rewrite` sets: the upstream's host, with its
    /// port unless it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        match (self.host.contains(':'), self.port == default) {
            (true, true) => format!("[{}]", self.host),
            (false, true) => self.host.clone(),
            _ => self.to_string(),
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A validated tunnel.
#[derive(Clone, Debug)]
pub struct TunnelSpec {
    pub name: String,
    pub proto: Proto,
    pub upstream: Upstream,
    pub domain: Option<String>,
    /// ngrok's `subdomain`: the edge puts it under its base domain.
    pub subdomain: Option<String>,
    /// The port `url` named (0: none); the edge refuses one it does not
    /// serve the scheme on.
    pub public_port: u16,
    pub remote_port: u16,
    pub terminate_at: Option<TerminateAt>,
    /// PEM certificate chain and key.
    pub crt_key: Option<(Vec<u8>, Secret)>,
    pub proxy_proto: Option<proxy_header::Version>,
    pub mutual_tls_cas: Option<MutualTlsCas>,
    /// For `https://` and `tls://` upstreams.
    pub upstream_tls: UpstreamTls,
    /// (allow, deny) CIDRs, checked here and enforced by the edge.
    pub ip_restriction: Option<(Vec<String>, Vec<String>)>,
    /// HTTP tunnels: requests are captured for the inspector.
    pub inspect: bool,
    /// HTTP tunnels: OAuth/OIDC, enforced by the edge.
    pub oauth: Option<crate::oauth::OAuthSpec>,
    /// Share the name or port with other pooling endpoints.
    pub pooling_enabled: bool,
    /// The Traffic Policy document's text, compiled and enforced by the edge.
    pub traffic_policy: Option<String>,
    /// HTTP tunnels: ngrok's modules, enforced by the edge.
    pub modules: Option<crate::modules::HttpModules>,
}

/// Which CAs the agent trusts for the edge.
#[derive(Clone, Debug)]
pub enum RootCas {
    /// The system's trust store, or `SSL_CERT_FILE` / `SSL_CERT_DIR` (the
    /// default).
    Host,
    /// The Mozilla roots built into the agent (ngrok's `trusted` names
    /// ngrok's own CAs; Postern has none of its own).
    Trusted,
    /// Only these (PEM).
    Pem(Vec<u8>),
}

/// Validated agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub authtoken: Secret,
    pub server_addr: String,
    pub server_name: String,
    pub root_cas: RootCas,
    /// The proxy the tunnel connection goes through, if any.
    pub proxy: Option<crate::proxy::Proxy>,
    pub heartbeat_interval: Duration,
    pub heartbeat_tolerance: Duration,
    pub connect_timeout: Duration,
    pub stream_pool: u32,
    /// Connections to the edge per session (the control stream's and
    /// `connections - 1` more for data streams).
    pub connections: usize,
    pub tunnels: Vec<TunnelSpec>,
    /// The agent API and inspector.
    pub web: crate::api::WebConfig,
    /// `upstream_tls` by `host:port` (`*`: the default), for tunnels started
    /// later through the agent API.
    pub upstream_tls: std::collections::BTreeMap<String, UpstreamTls>,
}

/// Reads and merges config files, in order.
pub fn load_files(paths: &[impl AsRef<Path>]) -> Result<Value, ConfigError> {
    let mut merged = Value::Mapping(Mapping::new());
    for path in paths {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if !matches!(value, Value::Mapping(_) | Value::Null) {
            bail!("{}: the top level must be a map of keys", path.display());
        }
        merge(&mut merged, value);
    }
    Ok(merged)
}

/// Deep merge: maps key by key, anything else replaced by the later value.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, Value::Null) if !base.is_null() => {}
        (base, over) => *base = over,
    }
}

/// Lays the command line over the merged files: `agent` holds agent keys
/// by their version 2 names, `tunnels` the command line's tunnel. A
/// version 3 file gets them under `agent:` by its names.
pub fn overlay(base: &mut Value, agent: Mapping, tunnels: Mapping) {
    let mut top = if v3::is_v3(base) {
        let renamed = agent
            .into_iter()
            .map(|(k, v)| (Value::from(v3::v3_name(k.as_str().unwrap_or_default())), v))
            .collect();
        Mapping::from_iter([(Value::from("agent"), Value::Mapping(renamed))])
    } else {
        agent
    };
    if !tunnels.is_empty() {
        top.insert(Value::from("tunnels"), Value::Mapping(tunnels));
    }
    merge(base, Value::Mapping(top));
}

/// A tunnel's keys as written: when one has a value of the wrong type, the
/// error starts with that key (`basic_auth: invalid type: …`).
fn raw_tunnel(body: Value) -> Result<RawTunnel, String> {
    RawTunnel::deserialize(body.clone()).map_err(|e| {
        let named = body.as_mapping().and_then(|map| {
            map.iter().find_map(|(key, value)| {
                let one = Mapping::from_iter([(key.clone(), value.clone())]);
                RawTunnel::deserialize(Value::Mapping(one))
                    .err()
                    .map(|e| format!("{}: {e}", key.as_str().unwrap_or("?")))
            })
        });
        named.unwrap_or_else(|| e.to_string())
    })
}

/// Drops ngrok keys Postern ignores, warning once per key.
fn drop_ignored(map: &mut Mapping, ignored: &[&str], context: &str) {
    for key in ignored {
        if map.remove(*key).is_some() {
            tracing::warn!("{context}{key}: accepted for ngrok compatibility and ignored");
        }
    }
}

/// Parses the merged YAML into the raw config.
pub fn parse_raw(mut value: Value) -> Result<RawAgentConfig, ConfigError> {
    if value.is_null() {
        return Ok(RawAgentConfig::default());
    }
    if v3::is_v3(&value) {
        let Value::Mapping(map) = value else {
            bail!("the config must be a map of keys");
        };
        value = Value::Mapping(v3::to_v2(map)?);
    }
    let Value::Mapping(map) = &mut value else {
        bail!("the config must be a map of keys");
    };
    drop_ignored(map, IGNORED_AGENT_KEYS, "");
    if let Some(Value::Mapping(tunnels)) = map.get_mut("tunnels") {
        for (name, tunnel) in tunnels.iter_mut() {
            if let Value::Mapping(t) = tunnel {
                let context = format!("tunnels.{}.", name.as_str().unwrap_or("?"));
                drop_ignored(t, IGNORED_TUNNEL_KEYS, &context);
            }
        }
    }
    let raw: RawAgentConfig = serde_yaml_ng::from_value(value).map_err(ConfigError::Syntax)?;
    match &raw.version {
        None => {}
        Some(Value::String(v)) if v == "2" => {}
        Some(Value::Number(n)) if n.as_u64() == Some(2) => {}
        Some(other) => {
            bail!(
                "version: {} is not supported; Postern reads ngrok's versions 2 and 3",
                scalar(other).unwrap_or_else(|| "this value".into())
            )
        }
    }
    Ok(raw)
}

fn duration(
    field: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|e| {
            ConfigError::field(format!("{field}: {v:?} is not a duration like \"10s\""), e)
        }),
    }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses an upstream address. `default_tls` is for bare ports of TLS
/// tunnels that re-encrypt; callers pass `false` for plain.
pub fn parse_upstream(addr: &str, verify: bool) -> Result<Upstream, ConfigError> {
    let (tls, rest, default_port) = if let Some(rest) = addr.strip_prefix("https://") {
        (true, rest, 443)
    } else if let Some(rest) = addr.strip_prefix("tls://") {
        (true, rest, 443)
    } else if let Some(rest) = addr.strip_prefix("http://") {
        (false, rest, 80)
    } else if let Some(rest) = addr.strip_prefix("tcp://") {
        (false, rest, 0)
    } else if addr.contains("://") {
        bail!("{addr:?}: the scheme must be http, https, tls or tcp");
    } else {
        (false, addr, 0)
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        bail!("{addr:?}: an upstream address cannot have a path");
    }
    let port_of = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid!("{addr:?}: {s:?} is not a port"))
    };
    let (host, port) = if rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() {
        ("localhost".to_string(), port_of(rest)?)
    } else if let Some(v6) = rest.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid!("{addr:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => port_of(p)?,
            None if default_port != 0 => default_port,
            None => bail!("{addr:?}: give a port"),
        };
        (ip.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port_of(port)?),
            None if default_port != 0 => (rest.to_string(), default_port),
            None => bail!("{addr:?}: give a port, like \"8080\" or \"localhost:8080\""),
        }
    };
    if host.is_empty() {
        bail!("{addr:?}: no host");
    }
    Ok(Upstream {
        host,
        port,
        tls,
        verify,
        http2: false,
    })
}

/// Reads `mutual_tls_cas`: CA ids, or a PEM file. Where TLS ends at this
/// agent, the bundle is checked here (only real CAs, at most ten).
fn mutual_tls_cas(
    value: &Value,
    proto: Proto,
    terminate_at: Option<TerminateAt>,
    field: &str,
) -> Result<MutualTlsCas, ConfigError> {
    let items: Vec<String> = match value {
        Value::Sequence(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other)
            .map(|s| {
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
    };
    match (proto, terminate_at) {
        (Proto::Tcp, _) => {
            bail!("{field}: TCP tunnels have no TLS to check client certificates in")
        }
        (Proto::Tls, None | Some(TerminateAt::Upstream)) => {
            bail!("{field}: mutual TLS needs terminate_at: edge or agent (ERR_POSTERN_1694)")
        }
        _ => {}
    }
    if !items.is_empty() && items.iter().all(|i| i.starts_with("ca_")) {
        if terminate_at == Some(TerminateAt::Agent) {
            bail!(
                "{field}: CA ids live in the edge's store; with terminate_at: agent give a PEM file"
            );
        }
        return Ok(MutualTlsCas::Ids(items));
    }
    if items.is_empty() || items.iter().any(|i| i.starts_with("ca_")) {
        bail!("{field}: give PEM files (or PEM text), or CA ids (ca_…), not both");
    }
    let mut bundle = Vec::new();
    for item in &items {
        let pem = pem_or_file(field, item)?;
        if terminate_at == Some(TerminateAt::Agent) {
            parse_ca_bundle(&pem)
                .map_err(|e| ConfigError::field(format!("{field}: {}", shown(item)), e))?;
        }
        bundle.extend_from_slice(&pem);
        bundle.push(b'\n');
    }
    Ok(MutualTlsCas::Pem(bundle))
}

/// A PEM value: the text itself when it holds a PEM block (ngrok's
/// version 3 files allow it inline), else the file it names.
fn pem_or_file(field: &str, value: &str) -> Result<Vec<u8>, ConfigError> {
    if value.contains("-----BEGIN ") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(value).map_err(|e| ConfigError::field(format!("{field}: reading {value}"), e))
}

/// How a PEM value is named in a message: its path, or "the inline PEM".
fn shown(value: &str) -> &str {
    if value.contains("-----BEGIN ") {
        "the inline PEM"
    } else {
        value
    }
}

impl RawUpstreamTls {
    fn validate(&self, field: &str) -> Result<UpstreamTls, ConfigError> {
        let read = |what: &str, path: &str| {
            std::fs::read(path)
                .map_err(|e| ConfigError::field(format!("{field}.{what}: reading {path}"), e))
        };
        let crt_key = match (&self.crt, &self.key) {
            (None, None) => None,
            (Some(crt), Some(key)) => Some((
                read("crt", crt)?,
                Secret::new(
                    String::from_utf8(read("key", key)?)
                        .map_err(|e| ConfigError::field("key: not UTF-8 PEM", e))?,
                ),
            )),
            _ => bail!("{field}: crt and key must be given together"),
        };
        let ca_pem = self.ca.as_deref().map(|ca| read("ca", ca)).transpose()?;
        Ok(UpstreamTls { crt_key, ca_pem })
    }
}

impl RawTunnel {
    fn validate(&self, name: &str) -> Result<TunnelSpec, ConfigError> {
        let field = |f: &str| format!("tunnels.{name}.{f}");
        let proto = match self.proto.as_deref() {
            Some("http") => Proto::Http,
            Some("tls") => Proto::Tls,
            Some("tcp") => Proto::Tcp,
            Some(other) => bail!("{}: {other:?} must be http, tls or tcp", field("proto")),
            None => bail!("{}: missing (http, tls or tcp)", field("proto")),
        };
        let addr = self
            .addr
            .as_ref()
            .and_then(scalar)
            .ok_or_else(|| invalid!("{}: missing (a port or an address)", field("addr")))?;
        let mut upstream = parse_upstream(&addr, self.upstream_tls_verify.unwrap_or(true))
            .map_err(|e| e.within(field("addr")))?;
        upstream.http2 = match self.upstream_protocol.as_deref() {
            None | Some("http1") => false,
            Some("http2") if proto == Proto::Http => true,
            Some("http2") => bail!(
                "{}: http2 is for HTTP tunnels; TLS and TCP tunnels carry bytes as they are",
                field("upstream_protocol")
            ),
            Some(other) => bail!(
                "{}: {other:?} is not http1 or http2",
                field("upstream_protocol")
            ),
        };
        let mut domain = self.domain.clone().or_else(|| self.hostname.clone());
        if domain.is_some() && proto == Proto::Tcp {
            bail!(
                "{}: TCP tunnels have no domain; use remote_addr",
                field("domain")
            );
        }
        if let Some(subdomain) = &self.subdomain {
            if proto == Proto::Tcp {
                bail!("{}: TCP tunnels have no subdomain", field("subdomain"));
            }
            if domain.is_some() {
                bail!(
                    "{}: give a domain or a subdomain, not both",
                    field("subdomain")
                );
            }
            url::check_subdomain(subdomain).map_err(|e| e.within(field("subdomain")))?;
        }
        let endpoint_url = match &self.url {
            Some(text) => {
                let parsed = url::EndpointUrl::parse(text).map_err(|e| e.within(field("url")))?;
                parsed
                    .check(proto)
                    .map_err(|e| e.within(format!("{}: {text:?}", field("url"))))?;
                Some(parsed)
            }
            None => None,
        };
        let mut public_port = 0;
        let mut remote_port_from_url = None;
        if let Some(endpoint_url) = &endpoint_url {
            let taken = match proto {
                Proto::Tcp => self.remote_addr.is_some(),
                _ => domain.is_some() || self.subdomain.is_some(),
            };
            if taken && endpoint_url.host.is_some() {
                let other = if proto == Proto::Tcp {
                    "remote_addr"
                } else {
                    "domain"
                };
                bail!("{}: give url or {other}, not both", field("url"));
            }
            match proto {
                Proto::Tcp => remote_port_from_url = endpoint_url.port,
                _ => {
                    if endpoint_url.host.is_some() {
                        domain = endpoint_url.host.clone();
                    }
                    public_port = endpoint_url.port.unwrap_or(0);
                }
            }
        }
        let schemes = match (
            endpoint_url.as_ref().and_then(|u| u.http_scheme()),
            &self.schemes,
        ) {
            (Some(scheme), Some(schemes)) if schemes.iter().any(|s| s != scheme) => bail!(
                "{}: the url serves {scheme} only; leave schemes out or make it [{scheme}]",
                field("schemes")
            ),
            (Some(scheme), _) => Some(vec![scheme.to_string()]),
            (None, schemes) => schemes.clone(),
        };
        let remote_port = match &self.remote_addr {
            None => remote_port_from_url.unwrap_or(0),
            Some(_) if proto != Proto::Tcp => bail!(
                "{}: only TCP tunnels have a remote_addr",
                field("remote_addr")
            ),
            Some(ra) => {
                let port = ra.rsplit_once(':').map(|(_, p)| p).unwrap_or(ra);
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid!("{}: {ra:?} has no valid port", field("remote_addr")))?
            }
        };
        let terminate_at = match self.terminate_at.as_deref() {
            None => None,
            Some(_) if proto != Proto::Tls => bail!(
                "{}: only TLS tunnels have terminate_at",
                field("terminate_at")
            ),
            Some("edge") => Some(TerminateAt::Edge),
            Some("agent") => Some(TerminateAt::Agent),
            Some("upstream") => Some(TerminateAt::Upstream),
            Some(other) => bail!(
                "{}: {other:?} must be edge, agent or upstream",
                field("terminate_at")
            ),
        };
        let crt_key = match (&self.crt, &self.key) {
            (None, None) => None,
            (Some(crt), Some(key)) => {
                let crt_pem = pem_or_file(&field("crt"), crt)?;
                let key_pem = String::from_utf8(pem_or_file(&field("key"), key)?).map_err(|e| {
                    ConfigError::field(format!("{}: not PEM text", field("key")), e)
                })?;
                let key_pem = Secret::new(key_pem);
                crate::tls::serving_key((shown(crt), &crt_pem), (shown(key), &key_pem))
                    .map_err(|e| ConfigError::field(format!("{}/key", field("crt")), e))?;
                Some((crt_pem, key_pem))
            }
            _ => bail!("{}: crt and key must be given together", field("crt")),
        };
        if crt_key.is_some() && proto != Proto::Tls {
            bail!("{}: only TLS tunnels take crt and key", field("crt"));
        }
        if terminate_at == Some(TerminateAt::Agent) && crt_key.is_none() {
            bail!(
                "{}: terminate_at: agent needs crt and key",
                field("terminate_at")
            );
        }
        if terminate_at == Some(TerminateAt::Upstream) && crt_key.is_some() {
            bail!(
                "{}: terminate_at: upstream passes TLS through; crt and key would go unused",
                field("crt")
            );
        }
        let proxy_proto = match &self.proxy_proto {
            None => None,
            Some(v) => {
                let text = scalar(v).unwrap_or_default();
                proxy_header::Version::from_config(&text)
                    .map_err(|e| invalid!("{}: {e}", field("proxy_proto")))?
            }
        };
        let mutual_tls_cas = match &self.mutual_tls_cas {
            None => None,
            Some(value) => Some(mutual_tls_cas(
                value,
                proto,
                terminate_at,
                &field("mutual_tls_cas"),
            )?),
        };
        let upstream_host = upstream.host_header();
        Ok(TunnelSpec {
            name: name.to_string(),
            proto,
            upstream,
            domain,
            subdomain: self.subdomain.clone(),
            public_port,
            remote_port,
            terminate_at,
            crt_key,
            proxy_proto,
            mutual_tls_cas,
            upstream_tls: UpstreamTls::default(),
            ip_restriction: match &self.ip_restriction {
                Some(r) => {
                    IpPolicy::parse(&r.allow_cidrs, &r.deny_cidrs)
                        .map_err(|e| invalid!("{}.{e}", field("ip_restriction")))?;
                    Some((r.allow_cidrs.clone(), r.deny_cidrs.clone()))
                }
                None => None,
            },
            // The converter's streams carry the visitor's bytes, not HTTP.
            inspect: proto == Proto::Http
                && self.inspect.unwrap_or(true)
                && !self.websocket_tcp_converter.unwrap_or(false),
            oauth: crate::oauth::spec(
                &format!("tunnels.{name}"),
                proto == Proto::Http,
                self.oauth.as_ref(),
                self.oidc.as_ref(),
            )?,
            pooling_enabled: self.pooling_enabled.unwrap_or(false),
            traffic_policy: self
                .traffic_policy
                .as_ref()
                .map(|v| policy_text(v, &field("traffic_policy")))
                .transpose()?,
            modules: crate::modules::validate(
                crate::modules::RawModules {
                    basic_auth: &self.basic_auth,
                    request_header: &self.request_header,
                    response_header: &self.response_header,
                    host_header: &self.host_header,
                    compression: &self.compression,
                    circuit_breaker: &self.circuit_breaker,
                    verify_webhook: &self.verify_webhook,
                    user_agent_filter: &self.user_agent_filter,
                    websocket_tcp_converter: &self.websocket_tcp_converter,
                    schemes: &schemes,
                },
                proto == Proto::Http,
                &upstream_host,
                &format!("tunnels.{name}"),
            )?,
        })
    }
}

/// A Traffic Policy as the text the edge compiles: a string as written,
/// a map as JSON. Only its shape is checked here; the edge checks the
/// rules and refuses the bind naming the one it cannot run.
fn policy_text(value: &Value, field: &str) -> Result<String, ConfigError> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Mapping(_) => serde_json::to_string(value)
            .map_err(|e| ConfigError::field(format!("{field}: cannot be written as JSON"), e))?,
        _ => bail!("{field}: a Traffic Policy document (a map of phases), or its text"),
    };
    match serde_yaml_ng::from_str::<Value>(&text) {
        Ok(Value::Mapping(_)) => Ok(text),
        Ok(Value::Null) => bail!("{field}: the policy is empty"),
        Ok(_) => {
            bail!("{field}: a Traffic Policy document is a map of phases (on_http_request: …)")
        }
        Err(e) => bail!("{field}: not YAML or JSON: {e}"),
    }
}

/// The `upstream_tls` entry for an upstream: its `host:port`, else `*`.
fn upstream_tls_for(
    upstream: &Upstream,
    entries: &std::collections::BTreeMap<String, UpstreamTls>,
) -> UpstreamTls {
    let target = format!("{}:{}", upstream.host, upstream.port);
    entries
        .get(&target)
        .or_else(|| entries.get("*"))
        .cloned()
        .unwrap_or_default()
}

/// A tunnel started through the agent API: the JSON body holds a config
/// tunnel's keys (ngrok keys Postern ignores are dropped, as in files).
pub(crate) fn api_tunnel(
    name: &str,
    mut body: Value,
    upstream_tls: &std::collections::BTreeMap<String, UpstreamTls>,
) -> Result<TunnelSpec, ConfigError> {
    if let Value::Mapping(map) = &mut body {
        drop_ignored(map, IGNORED_TUNNEL_KEYS, "");
    }
    let raw = raw_tunnel(body).map_err(ConfigError::Invalid)?;
    let mut spec = raw.validate(name)?;
    spec.upstream_tls = upstream_tls_for(&spec.upstream, upstream_tls);
    Ok(spec)
}

/// Connections per session at most (`connections`).
const MAX_CONNECTIONS: u32 = 16;

/// The problems found in a config, each naming its key; validation goes on
/// past the first, so that `postern config check` can list them all.
#[derive(Debug, Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    /// The value, or `None` with its error noted.
    fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.0.push(e)).ok()
    }
}

/// Where the edge's admin API is (`api_url`, `--api-url`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiUrl {
    /// As written, for messages.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// A path prefix the API is under, without a trailing `/`.
    pub base_path: String,
}

impl ApiUrl {
    /// The edge's default admin listener.
    pub const DEFAULT: &str = "http://127.0.0.1:9090";

    pub fn parse(text: &str) -> Result<ApiUrl, ConfigError> {
        let uri: http::Uri = text
            .parse()
            .ok()
            .ok_or_else(|| invalid!("{text:?} is not a URL like {:?}", Self::DEFAULT))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("{text:?}: the scheme must be http or https"),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid!("{text:?} has no host"))?;
        if uri.query().is_some() {
            bail!("{text:?}: a query string has no place in the API's address");
        }
        Ok(ApiUrl {
            url: text.to_string(),
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// `server_addr`, or the address `region` and `connect_domain` make, and
/// the TLS name to verify.
fn server_addr_and_name(
    server_addr: Option<String>,
    region: Option<&String>,
    connect_domain: Option<&String>,
    tls_server_name: Option<String>,
) -> Result<(String, String), ConfigError> {
    let server_addr = match (server_addr, region, connect_domain) {
        (Some(addr), _, _) => addr,
        (None, Some(region), Some(domain)) => format!("tunnel.{region}.connect.{domain}:443"),
        (None, _, _) => bail!(
            "server_addr: missing; pass --server-addr host:port, or --region with connect_domain \
             (dials tunnel.<region>.connect.<connect_domain>:443)"
        ),
    };
    let (host, _port) = server_addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| invalid!("server_addr: {server_addr:?} is not host:port"))?;
    let server_name = tls_server_name.unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    Ok((server_addr, server_name))
}

fn heartbeats(
    interval: &Option<String>,
    tolerance: &Option<String>,
) -> Result<(Duration, Duration), ConfigError> {
    let interval = duration("heartbeat_interval", interval, Duration::from_secs(10))?;
    let tolerance = duration("heartbeat_tolerance", tolerance, Duration::from_secs(15))?;
    if interval.is_zero() || tolerance <= interval {
        bail!("heartbeat_tolerance must be longer than heartbeat_interval, which must not be zero");
    }
    Ok((interval, tolerance))
}

impl RawAgentConfig {
    /// Validates; `names` picks tunnels (`None`: all of them). The error
    /// is [`ConfigError::Problems`], every problem found, a line each.
    pub fn validate(self, names: Option<&[String]>) -> Result<AgentConfig, ConfigError> {
        let mut problems = Problems::default();
        let authtoken = problems.check(self.authtoken.filter(|t| !t.is_empty()).ok_or_else(|| {
            invalid!(
                "authtoken: missing; pass --authtoken, set POSTERN_AUTHTOKEN or add it to the config"
            )
        }));
        let server = problems.check(server_addr_and_name(
            self.server_addr,
            self.region.as_ref(),
            self.connect_domain.as_ref(),
            self.tls_server_name,
        ));
        let root_cas = problems.check(match self.root_cas.as_deref() {
            None | Some("host") => Ok(RootCas::Host),
            Some("trusted") => Ok(RootCas::Trusted),
            Some(path) => std::fs::read(path)
                .map(RootCas::Pem)
                .map_err(|e| ConfigError::field(format!("root_cas: reading {path}"), e)),
        });
        let mut upstream_tls = std::collections::BTreeMap::new();
        for (key, raw) in &self.upstream_tls {
            if let Some(tls) = problems.check(raw.validate(&format!("upstream_tls.{key:?}"))) {
                upstream_tls.insert(key.clone(), tls);
            }
        }
        let mut tunnels = Vec::new();
        for (name, raw) in &self.tunnels.0 {
            if names.is_none_or(|n| n.contains(name))
                && let Some(mut spec) = problems.check(raw.validate(name))
            {
                spec.upstream_tls = upstream_tls_for(&spec.upstream, &upstream_tls);
                tunnels.push(spec);
            }
        }
        if let Some(names) = names
            && let Some(missing) = names
                .iter()
                .find(|n| !self.tunnels.0.iter().any(|(t, _)| t == *n))
        {
            problems.0.push(invalid!(
                "tunnels: no tunnel named {missing:?} in the config"
            ));
        }
        let heartbeats = problems.check(heartbeats(
            &self.heartbeat_interval,
            &self.heartbeat_tolerance,
        ));
        let connect_timeout = problems.check(duration(
            "connect_timeout",
            &self.connect_timeout,
            Duration::from_secs(10),
        ));
        let web = problems.check(crate::api::WebConfig::validate(
            self.web_addr.as_ref(),
            &self.web_allow_hosts,
            self.web_auth.as_ref(),
            self.inspect_db_size,
        ));
        if let Some(url) = &self.api_url {
            problems.check(ApiUrl::parse(url).map_err(|e| e.within("api_url")));
        }
        let proxy = problems.check(crate::proxy::Proxy::configured(self.proxy_url.as_deref()));
        let connections = match self.connections {
            None => postern_proto::h2_settings::default_connections(),
            Some(n @ 1..=MAX_CONNECTIONS) => n as usize,
            Some(n) => {
                problems.0.push(invalid!(
                    "connections: {n} is not between 1 and {MAX_CONNECTIONS}"
                ));
                1
            }
        };
        let (
            Some(authtoken),
            Some((server_addr, server_name)),
            Some(root_cas),
            Some(proxy),
            Some((heartbeat_interval, heartbeat_tolerance)),
            Some(connect_timeout),
            Some(web),
            true,
        ) = (
            authtoken,
            server,
            root_cas,
            proxy,
            heartbeats,
            connect_timeout,
            web,
            problems.0.is_empty(),
        )
        else {
            return Err(ConfigError::Problems(problems.0));
        };
        Ok(AgentConfig {
            authtoken,
            server_addr,
            server_name,
            root_cas,
            proxy,
            heartbeat_interval,
            heartbeat_tolerance,
            connect_timeout,
            stream_pool: self.stream_pool.unwrap_or(8),
            connections,
            tunnels,
            web,
            upstream_tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
        parse_raw(serde_yaml_ng::from_str(yaml).expect("YAML"))?.validate(None)
    }

    #[test]
    fn ngrok_v2_file_with_ignored_keys() {
        let c = parse(
            r#"
version: "2"
authtoken: tok-123
server_addr: tunnel.us.connect.example.test:443
console_ui: false
web_addr: localhost:4040
tunnels:
  web:
    proto: http
    addr: 8080
    domain: app.example.test
    inspect: false
  db:
    proto: tcp
    addr: 5432
    remote_addr: 1.tcp.example.test:20001
  secure:
    proto: tls
    addr: tls://internal:8443
    domain: s.example.test
    terminate_at: upstream
    proxy_proto: 2
"#,
        )
        .unwrap();
        assert_eq!(c.server_name, "tunnel.us.connect.example.test");
        let names: Vec<_> = c.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["web", "db", "secure"], "file order kept");
        assert_eq!(
            c.tunnels[0].upstream,
            Upstream {
                host: "localhost".into(),
                port: 8080,
                tls: false,
                verify: true,
                http2: false,
            }
        );
        assert_eq!(c.tunnels[1].remote_port, 20001);
        assert!(c.tunnels[2].upstream.tls);
        assert_eq!(c.tunnels[2].proxy_proto, Some(proxy_header::Version::V2));
        assert_eq!(format!("{:?}", c.authtoken), "********");
    }

    #[test]
    fn region_and_connect_domain_make_the_server_addr() {
        let c = parse("authtoken: t\nregion: eu\nconnect_domain: example.test\n").unwrap();
        assert_eq!(c.server_addr, "tunnel.eu.connect.example.test:443");
    }

    #[test]
    fn merge_later_wins_and_maps_merge() {
        let mut a: Value =
            serde_yaml_ng::from_str("authtoken: a\ntunnels:\n  x:\n    proto: http\n    addr: 1\n")
                .unwrap();
        let b: Value = serde_yaml_ng::from_str(
            "authtoken: b\ntunnels:\n  y:\n    proto: tcp\n    addr: 2\n  x:\n    addr: 3\n",
        )
        .unwrap();
        merge(&mut a, b);
        let c = parse_raw(a).unwrap();
        assert_eq!(c.authtoken.as_ref().map(Secret::expose), Some("b"));
        assert_eq!(c.tunnels.0.len(), 2);
        assert_eq!(
            c.tunnels.0[0].1.addr.as_ref().and_then(scalar).as_deref(),
            Some("3")
        );
        assert_eq!(c.tunnels.0[0].1.proto.as_deref(), Some("http"));
    }

    #[test]
    fn errors_name_the_field() {
        let base = "authtoken: t\nserver_addr: e:1\n";
        for (tail, want) in [
            ("bogus: 1\n", "bogus"),
            (
                "tunnels:\n  w:\n    proto: udp\n    addr: 1\n",
                "tunnels.w.proto",
            ),
            ("tunnels:\n  w:\n    proto: http\n", "tunnels.w.addr"),
            (
                "tunnels:\n  w:\n    proto: http\n    addr: 99999\n",
                "tunnels.w.addr",
            ),
            (
                "tunnels:\n  w:\n    proto: tls\n    addr: 1\n    terminate_at: agent\n",
                "tunnels.w.terminate_at",
            ),
            (
                "tunnels:\n  w:\n    proto: tls\n    addr: 1\n    terminate_at: middle\n",
                "tunnels.w.terminate_at",
            ),
            (
                "tunnels:\n  w:\n    proto: http\n    addr: 1\n    proxy_proto: 3\n",
                "tunnels.w.proxy_proto",
            ),
            (
                "tunnels:\n  w:\n    proto: http\n    addr: 1\n    colour: red\n",
                "colour",
            ),
            (
                "tunnels:\n  w:\n    proto: tcp\n    addr: 1\n    domain: a.test\n",
                "tunnels.w.domain",
            ),
            ("version: \"4\"\n", "version"),
            ("heartbeat_interval: soon\n", "heartbeat_interval"),
            ("connections: 0\n", "connections: 0 is not between 1 and 16"),
            (
                "connections: 17\n",
                "connections: 17 is not between 1 and 16",
            ),
        ] {
            let err = format!("{:#}", parse(&format!("{base}{tail}")).unwrap_err());
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
        let err = format!("{:#}", parse("server_addr: e:1\n").unwrap_err());
        assert!(err.contains("authtoken"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_a_line_each() {
        let err = format!(
            "{:#}",
            parse("server_addr: edge\nheartbeat_interval: soon\napi_url: ftp://x\n").unwrap_err()
        );
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 4, "{err}");
        assert!(lines[0].starts_with("authtoken: missing"), "{err}");
        assert!(
            lines[1].starts_with("server_addr: \"edge\" is not host:port"),
            "{err}"
        );
        assert!(lines[2].starts_with("heartbeat_interval"), "{err}");
        assert!(lines[3].starts_with("api_url: \"ftp://x\""), "{err}");
    }

    #[test]
    fn api_urls() {
        let url = ApiUrl::parse("https://admin.example.test/postern/").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port, url.base_path.as_str()),
            (true, "admin.example.test", 443, "/postern")
        );
        let url = ApiUrl::parse("http://[::1]:9090").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.base_path.as_str()),
            ("::1", 9090, "")
        );
        assert!(ApiUrl::parse("127.0.0.1:9090").is_err());
        assert!(ApiUrl::parse("http://x:9090/?a=b").is_err());
    }

    #[test]
    fn url_and_subdomain_keys() {
        let base = "authtoken: t\nserver_addr: e:1\ntunnels:\n  w:\n";
        let one = |tail: &str| parse(&format!("{base}{tail}")).map(|c| c.tunnels[0].clone());
        let t = one("    proto: http\n    addr: 1\n    url: https://App.example.test\n").unwrap();
        assert_eq!(t.domain.as_deref(), Some("app.example.test"));
        let schemes = &t.modules.as_ref().unwrap().0.schemes;
        assert_eq!(
            schemes,
            &["https"],
            "one scheme per URL, as ngrok's v3 agent"
        );
        let t = one("    proto: http\n    addr: 1\n    url: app.example.test:8443\n").unwrap();
        assert_eq!((t.public_port, t.modules.is_none()), (8443, true));
        let t =
            one("    proto: tcp\n    addr: 1\n    url: tcp://1.tcp.example.test:20001\n").unwrap();
        assert_eq!(t.remote_port, 20001);
        let t = one("    proto: tls\n    addr: 1\n    url: tls://\n").unwrap();
        assert_eq!(t.domain, None, "a scheme alone asks for a random name");
        let t = one("    proto: http\n    addr: 1\n    subdomain: my-app\n").unwrap();
        assert_eq!(t.subdomain.as_deref(), Some("my-app"));
        for (tail, want) in [
            (
                "    proto: http\n    addr: 1\n    url: tls://x.example.test\n",
                "tunnels.w.url",
            ),
            (
                "    proto: http\n    addr: 1\n    url: x.example.test\n    domain: y.example.test\n",
                "give url or domain",
            ),
            (
                "    proto: http\n    addr: 1\n    url: http://x.example.test\n    schemes: [https]\n",
                "tunnels.w.schemes",
            ),
            (
                "    proto: http\n    addr: 1\n    subdomain: a_b\n",
                "tunnels.w.subdomain",
            ),
            (
                "    proto: tcp\n    addr: 1\n    url: tcp://x.example.test\n",
                "host:port",
            ),
        ] {
            let err = format!("{:#}", one(tail).unwrap_err());
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
    }

    #[test]
    fn ngrok_v3_file() {
        let c = parse(
            r#"
version: 3
agent:
  authtoken: tok-3
  connect_url: tunnel.eu.connect.example.test:443
  connect_cas: host
  console_ui: false
endpoints:
  - name: web
    url: https://app.example.test
    upstream:
      url: 8080
      protocol: http1
    traffic_policy:
      on_http_request:
        - actions: [{type: deny}]
  - name: site
    url: http://site.example.test
    upstream:
      url: intranet.local
  - name: db
    url: tcp://1.tcp.example.test:20002
    upstream:
      url: 5432
      proxy_protocol: 2
  - name: secure
    url: tls://s.example.test
    bindings: [public]
    upstream:
      url: tls://
tunnels:
  old:
    proto: http
    addr: 9000
"#,
        )
        .unwrap();
        assert_eq!(c.server_addr, "tunnel.eu.connect.example.test:443");
        assert_eq!(format!("{:?}", c.authtoken), "********");
        let names: Vec<_> = c.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["web", "site", "db", "secure", "old"],
            "file order kept"
        );
        let t = |n: &str| c.tunnels.iter().find(|t| t.name == n).unwrap();
        assert_eq!(t("web").proto, Proto::Http);
        assert_eq!(t("web").domain.as_deref(), Some("app.example.test"));
        assert!(t("web").traffic_policy.as_deref().unwrap().contains("deny"));
        assert_eq!(
            t("site").upstream.url(Proto::Http),
            "http://intranet.local:80"
        );
        assert_eq!(t("db").proto, Proto::Tcp);
        assert_eq!(t("db").remote_port, 20002);
        assert_eq!(t("db").proxy_proto, Some(proxy_header::Version::V2));
        assert_eq!(t("secure").proto, Proto::Tls);
        assert_eq!(t("secure").upstream.url(Proto::Tls), "tls://localhost:443");
    }

    #[test]
    fn ngrok_v3_errors_name_the_key() {
        let head = "version: 3\nagent:\n  authtoken: t\n  connect_url: e:1\n";
        let endpoint = "endpoints:\n  - name: w\n    url: https://w.example.test\n";
        for (tail, want) in [
            (
                "  server_addr: e:2\n",
                "agent.server_addr: version 3 calls it connect_url",
            ),
            ("  bogus: 1\n", "bogus"),
            (
                &format!("{endpoint}    upstream:\n      url: 80\n      protocol: http3\n"),
                "endpoints[0] (w).upstream.protocol",
            ),
            (
                &format!("{endpoint}    upstream:\n      url: 80\n    colour: red\n"),
                "endpoints[0] (w).colour",
            ),
            (
                &format!("{endpoint}    upstream: {{}}\n"),
                "upstream.url: required",
            ),
            (
                &format!("{endpoint}    upstream:\n      url: 80\n    bindings: [kubernetes]\n"),
                "bindings",
            ),
            ("tunnels: 3\n", "tunnels"),
        ] {
            let err = format!("{:#}", parse(&format!("{head}{tail}")).unwrap_err());
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
        let err = format!("{:#}", parse("version: 3\nauthtoken: t\n").unwrap_err());
        assert!(
            err.contains("authtoken: not a version 3 top-level key"),
            "{err}"
        );
    }

    #[test]
    fn the_command_line_lands_under_agent_in_a_v3_file() {
        let mut value: Value =
            serde_yaml_ng::from_str("version: 3\nagent:\n  connect_url: e:1\n").unwrap();
        let agent = Mapping::from_iter([
            (Value::from("authtoken"), Value::from("cli")),
            (Value::from("server_addr"), Value::from("e:2")),
        ]);
        let tunnel: Value = serde_yaml_ng::from_str("proto: tcp\naddr: 22\n").unwrap();
        overlay(
            &mut value,
            agent,
            Mapping::from_iter([(Value::from("command_line"), tunnel)]),
        );
        let c = parse_raw(value).unwrap().validate(None).unwrap();
        assert_eq!(c.server_addr, "e:2");
        assert_eq!(c.authtoken.expose(), "cli");
        assert_eq!(c.tunnels[0].name, "command_line");
    }

    #[test]
    fn upstream_addresses() {
        let u = |s: &str| parse_upstream(s, true).unwrap();
        assert_eq!(
            u("8080"),
            Upstream {
                host: "localhost".into(),
                port: 8080,
                tls: false,
                verify: true,
                http2: false,
            }
        );
        assert_eq!(u("10.0.0.5:22").host, "10.0.0.5");
        assert_eq!(u("http://web").port, 80);
        assert_eq!(u("https://api.internal").port, 443);
        assert!(u("https://api.internal:8443").tls);
        assert!(u("tls://db:5433").tls);
        assert_eq!(u("[::1]:80").host, "::1");
        assert!(parse_upstream("ftp://x:1", true).is_err());
        assert!(parse_upstream("localhost", true).is_err());
        assert!(parse_upstream("http://x/path", true).is_err());
        assert!(parse_upstream("x:0", true).is_err());
    }
}
