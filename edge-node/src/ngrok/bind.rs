//! An SDK's `Bind` as Postern's own bind request: every endpoint option
//! the SDK sends is read here, key by key, onto the fields of
//! `pb::BindRequest` that Postern's agents fill, so the registry checks and
//! builds it as any other bind (`registry/bind.rs`). An option Postern does
//! not implement is refused, naming it; none is dropped silently.

use base64::Engine;
use postern_proto::{ErrorCode, Failure, pb};
use serde_json::{Map, Value};

use super::messages::Bind;

/// What the edge keeps of a bound tunnel to write its proxy headers.
#[derive(Clone, Debug)]
pub struct TunnelKind {
    /// `Proto` as the SDK sent it (`https`, `http`, `tcp`, `tls`).
    pub proto: String,
    /// A TLS endpoint whose bytes arrive still encrypted.
    pub passthrough_tls: bool,
}

/// A bind as Postern's bind request, with what to remember of it.
#[derive(Debug)]
pub struct Mapped {
    pub request: pb::BindRequest,
    pub kind: TunnelKind,
}

fn invalid(detail: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::INVALID_BIND, detail)
}

fn unsupported(option: &str, hint: &str) -> Failure {
    invalid(format!("{option} is not supported by Postern{hint}"))
}

/// Whether an option value asks for nothing: absent, null, `""`, `false`,
/// `0` or `[]`. (`{}` asks for something: `Compression: {}` turns it on.)
fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(_) => false,
    }
}

/// Reads the options object key by key (keys lower-cased).
struct Opts<'a> {
    map: &'a Map<String, Value>,
    proto: &'a str,
}

impl Opts<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !is_unset(v))
    }

    fn string(&self, key: &str, name: &str) -> Result<String, Failure> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(format!("Opts.{name} must be a string"))),
        }
    }

    fn strings(value: &Value, name: &str) -> Result<Vec<String>, Failure> {
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(format!("{name} must be a list of strings")))
                })
                .collect(),
            _ => Err(invalid(format!("{name} must be a list of strings"))),
        }
    }

    fn object(&self, key: &str, name: &str) -> Result<Option<&Map<String, Value>>, Failure> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(invalid(format!("Opts.{name} must be an object"))),
        }
    }

    fn field_strings(
        object: &Map<String, Value>,
        key: &str,
        name: &str,
    ) -> Result<Vec<String>, Failure> {
        object
            .get(key)
            .map_or(Ok(Vec::new()), |v| Self::strings(v, name))
    }

    fn field_string(object: &Map<String, Value>, key: &str, name: &str) -> Result<String, Failure> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(format!("{name} must be a string"))),
        }
    }

    fn base64(object: &Map<String, Value>, key: &str, name: &str) -> Result<Vec<u8>, Failure> {
        let text = Self::field_string(object, key, name)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| invalid(format!("{name} is not base64")))
    }

    /// `URL` (Go), then `Domain`, then `Hostname`: the name asked for.
    fn name(&self) -> Result<String, Failure> {
        if self.get("subdomain").is_some() {
            return Err(unsupported(
                "Opts.Subdomain",
                "; give the full name as the domain",
            ));
        }
        let url = self.string("url", "URL")?;
        if !url.is_empty() {
            let (scheme, rest) = url
                .split_once("://")
                .ok_or_else(|| invalid(format!("Opts.URL {url:?} has no scheme")))?;
            let scheme_fits = match self.proto {
                "http" | "https" => matches!(scheme, "http" | "https"),
                other => scheme == other,
            };
            if !scheme_fits {
                return Err(invalid(format!(
                    "Opts.URL {url:?} does not fit the protocol {}",
                    self.proto
                )));
            }
            return Ok(rest.trim_end_matches('/').to_string());
        }
        let domain = self.string("domain", "Domain")?;
        if !domain.is_empty() {
            return Ok(domain);
        }
        self.string("hostname", "Hostname")
    }

    fn proxy_proto(&self) -> Result<u32, Failure> {
        match self.map.get("proxyproto") {
            None | Some(Value::Null) => Ok(0),
            Some(v) => match v.as_u64() {
                Some(n @ 0..=2) => Ok(n as u32),
                _ => Err(invalid("Opts.ProxyProto must be 0, 1 or 2")),
            },
        }
    }

    fn ip_restriction(&self) -> Result<Option<pb::IpRestriction>, Failure> {
        let Some(o) = self.object("iprestriction", "IPRestriction")? else {
            return Ok(None);
        };
        Ok(Some(pb::IpRestriction {
            allow_cidrs: Self::field_strings(o, "allow_cidrs", "IPRestriction.allow_cidrs")?,
            deny_cidrs: Self::field_strings(o, "deny_cidrs", "IPRestriction.deny_cidrs")?,
        }))
    }

    /// `MutualTLSCA` / `MutualTLSAtEdge`: the CA bundle, PEM.
    fn mutual_tls(&self, key: &str, name: &str) -> Result<Vec<u8>, Failure> {
        match self.object(key, name)? {
            None => Ok(Vec::new()),
            Some(o) => Self::base64(o, "mutual_tls_ca", &format!("{name}.mutual_tls_ca")),
        }
    }

    fn traffic_policy(&self) -> Result<String, Failure> {
        if self.get("policy").is_some() {
            return Err(unsupported(
                "Opts.Policy (the legacy rule list)",
                "; send the rules as TrafficPolicy",
            ));
        }
        match self.get("trafficpolicy") {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid("Opts.TrafficPolicy must be a string")),
        }
    }

    /// Refuses keys this protocol's options do not have, or that ask for
    /// something not implemented; `known` are the ones read.
    fn refuse_others(&self, known: &[&str]) -> Result<(), Failure> {
        for (key, value) in self.map {
            if !known.contains(&key.as_str()) && !is_unset(value) {
                return Err(unsupported(
                    &format!("the endpoint option {key:?}"),
                    &format!(" for {} endpoints", self.proto),
                ));
            }
        }
        Ok(())
    }
}

/// Maps a bind. `opts` holds the options with lower-cased keys.
pub fn map(bind: &Bind) -> Result<Mapped, Failure> {
    check_extra(bind)?;
    let empty = Map::new();
    let map = match &bind.opts {
        Value::Object(o) => o,
        Value::Null => &empty,
        _ => return Err(invalid("Opts must be an object")),
    };
    let proto = bind.proto.as_str();
    let opts = Opts { map, proto };
    let mut request = pb::BindRequest {
        name: bind.extra.name.clone(),
        forwards_to: bind.forwardsto.clone(),
        proxy_proto: opts.proxy_proto()?,
        ip_restriction: opts.ip_restriction()?,
        pooling_enabled: bind.extra.poolingenabled,
        traffic_policy: opts.traffic_policy()?,
        upstream_http2: forwards_http2(bind)?,
        ..Default::default()
    };
    let mut passthrough_tls = false;
    match proto {
        "http" | "https" => {
            request.protocol = pb::Protocol::Http as i32;
            request.domain = opts.name()?;
            http_options(&opts, &mut request)?;
        }
        "tcp" => {
            request.protocol = pb::Protocol::Tcp as i32;
            request.remote_port = tcp_port(&opts)?;
            opts.refuse_others(&[
                "url",
                "addr",
                "proxyproto",
                "iprestriction",
                "trafficpolicy",
                "policy",
            ])?;
        }
        "tls" => {
            request.protocol = pb::Protocol::Tls as i32;
            request.domain = opts.name()?;
            passthrough_tls = tls_options(&opts, &mut request)?;
        }
        other => {
            return Err(invalid(format!(
                "Proto {other:?} is not one of http, https, tcp, tls"
            )));
        }
    }
    Ok(Mapped {
        request,
        kind: TunnelKind {
            proto: proto.to_string(),
            passthrough_tls,
        },
    })
}

/// `ForwardsProto` (the SDK's `app_protocol`): `http2` is Postern's
/// `upstream_protocol: http2`, the edge speaking HTTP/2 (h2c) on each
/// stream, which the SDK passes to its upstream as it is.
fn forwards_http2(bind: &Bind) -> Result<bool, Failure> {
    match (bind.forwardsproto.as_str(), bind.proto.as_str()) {
        ("" | "http1", _) => Ok(false),
        ("http2", "http" | "https") => Ok(true),
        ("http2", proto) => Err(invalid(format!(
            "ForwardsProto \"http2\" (app_protocol) is for http and https endpoints, not {proto}"
        ))),
        (other, _) => Err(invalid(format!(
            "ForwardsProto {other:?} (app_protocol) is not http1 or http2"
        ))),
    }
}

fn check_extra(bind: &Bind) -> Result<(), Failure> {
    if !bind.extra.ippolicyref.is_empty() {
        return Err(unsupported(
            "Extra.IPPolicyRef",
            "; list the CIDRs in the endpoint's IP restriction",
        ));
    }
    if let Some(binding) = bind.extra.bindings.iter().find(|b| *b != "public") {
        return Err(unsupported(
            &format!("the binding {binding:?}"),
            "; every Postern endpoint is public",
        ));
    }
    Ok(())
}

/// `Addr` (`host:port`, `:port` or empty) or Go's `tcp://host:port`.
fn tcp_port(opts: &Opts) -> Result<u32, Failure> {
    let url = opts.string("url", "URL")?;
    let addr = match url.strip_prefix("tcp://") {
        Some(rest) => rest.to_string(),
        None if url.is_empty() => opts.string("addr", "Addr")?,
        None => return Err(invalid(format!("Opts.URL {url:?} is not tcp://host:port"))),
    };
    if addr.is_empty() {
        return Ok(0);
    }
    let port = addr.rsplit_once(':').map_or(addr.as_str(), |(_, p)| p);
    port.parse::<u16>()
        .map(u32::from)
        .map_err(|_| invalid(format!("Opts.Addr {addr:?} has no port")))
}

fn http_options(opts: &Opts, request: &mut pb::BindRequest) -> Result<(), Failure> {
    opts.refuse_others(&[
        "url",
        "domain",
        "hostname",
        "subdomain",
        "auth",
        "localurlscheme",
        "proxyproto",
        "iprestriction",
        "trafficpolicy",
        "policy",
        "hostheaderrewrite",
        "compression",
        "circuitbreaker",
        "basicauth",
        "oauth",
        "oidc",
        "webhookverification",
        "mutualtlsca",
        "requestheaders",
        "responseheaders",
        "useragentfilter",
        "websockettcpconverter",
    ])?;
    if opts.get("auth").is_some() {
        return Err(unsupported(
            "Opts.Auth (the legacy basic auth string)",
            "; use BasicAuth",
        ));
    }
    let mut modules = pb::HttpModules {
        websocket_tcp_converter: opts
            .object("websockettcpconverter", "WebsocketTCPConverter")?
            .is_some(),
        ..Default::default()
    };
    if opts.get("hostheaderrewrite").is_some() {
        modules.host_header = "rewrite".into();
    }
    modules.compression = opts.object("compression", "Compression")?.is_some();
    if let Some(o) = opts.object("circuitbreaker", "CircuitBreaker")? {
        modules.circuit_breaker = o
            .get("error_threshold")
            .and_then(Value::as_f64)
            .filter(|t| *t > 0.0 && *t <= 1.0)
            .ok_or_else(|| {
                invalid("CircuitBreaker.error_threshold must be a number above 0 and at most 1")
            })?;
    }
    if let Some(o) = opts.object("basicauth", "BasicAuth")? {
        modules.basic_auth = basic_auth(o)?;
    }
    for (key, name, edits) in [
        (
            "requestheaders",
            "RequestHeaders",
            &mut modules.request_headers,
        ),
        (
            "responseheaders",
            "ResponseHeaders",
            &mut modules.response_headers,
        ),
    ] {
        if let Some(o) = opts.object(key, name)? {
            if o.get("addparsed")
                .is_some_and(|v| !is_unset(v) && v != &Value::Object(Map::new()))
            {
                return Err(unsupported(&format!("{name}.addParsed"), "; use add"));
            }
            *edits = Some(pb::HeaderEdits {
                add: Opts::field_strings(o, "add", &format!("{name}.add"))?,
                remove: Opts::field_strings(o, "remove", &format!("{name}.remove"))?,
            });
        }
    }
    if let Some(o) = opts.object("webhookverification", "WebhookVerification")? {
        if o.get("sealed_secret").is_some_and(|v| !is_unset(v)) {
            return Err(unsupported(
                "WebhookVerification.sealed_secret",
                "; send the secret",
            ));
        }
        modules.verify_webhook = Some(pb::WebhookVerification {
            provider: Opts::field_string(o, "provider", "WebhookVerification.provider")?,
            secret: Opts::field_string(o, "secret", "WebhookVerification.secret")?,
        });
    }
    if let Some(o) = opts.object("useragentfilter", "UserAgentFilter")? {
        modules.user_agent_filter = Some(pb::UserAgentFilter {
            allow: Opts::field_strings(o, "allow", "UserAgentFilter.allow")?,
            deny: Opts::field_strings(o, "deny", "UserAgentFilter.deny")?,
        });
    }
    request.oauth = oauth(opts)?;
    request.mutual_tls_cas_pem = opts.mutual_tls("mutualtlsca", "MutualTLSCA")?;
    if modules != pb::HttpModules::default() {
        request.modules = Some(modules);
    }
    Ok(())
}

/// `BasicAuth.credentials`: cleartext passwords travel on as their
/// SHA-256, as Postern's agents send them.
fn basic_auth(o: &Map<String, Value>) -> Result<Vec<pb::BasicAuthCredential>, Failure> {
    let Some(Value::Array(credentials)) = o.get("credentials") else {
        return Err(invalid("BasicAuth.credentials must be a list"));
    };
    credentials
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("BasicAuth.credentials[{i}]");
            let c = c
                .as_object()
                .ok_or_else(|| invalid(format!("{at} must be an object")))?;
            if c.get("hashed_password").is_some_and(|v| !is_unset(v)) {
                return Err(unsupported(
                    &format!("{at}.hashed_password"),
                    "; send cleartext_password",
                ));
            }
            let username = Opts::field_string(c, "username", &format!("{at}.username"))?;
            let password =
                Opts::field_string(c, "cleartext_password", &format!("{at}.cleartext_password"))?;
            if username.is_empty() || !(8..=128).contains(&password.chars().count()) {
                return Err(invalid(format!(
                    "{at}: a user name and a password of 8 to 128 characters are required"
                )));
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, password.as_bytes());
            Ok(pb::BasicAuthCredential {
                username,
                password_sha256: hex::encode(digest.as_ref()),
            })
        })
        .collect()
}

/// `OAuth` (a named provider) or `OIDC` (an issuer) as Postern's OAuth
/// options.
fn oauth(opts: &Opts) -> Result<Option<pb::OAuthOptions>, Failure> {
    let (o, name, provider) = match (opts.object("oauth", "OAuth")?, opts.object("oidc", "OIDC")?) {
        (Some(_), Some(_)) => return Err(invalid("give OAuth or OIDC, not both")),
        (Some(o), None) => (
            o,
            "OAuth",
            Opts::field_string(o, "provider", "OAuth.provider")?,
        ),
        (None, Some(o)) => (o, "OIDC", "oidc".to_string()),
        (None, None) => return Ok(None),
    };
    if o.get("sealed_client_secret").is_some_and(|v| !is_unset(v)) {
        return Err(unsupported(
            &format!("{name}.sealed_client_secret"),
            "; send client_secret",
        ));
    }
    let field = |key: &str| Opts::field_string(o, key, &format!("{name}.{key}"));
    let list = |key: &str| Opts::field_strings(o, key, &format!("{name}.{key}"));
    Ok(Some(pb::OAuthOptions {
        provider,
        issuer_url: field("issuer_url")?,
        client_id: field("client_id")?,
        client_secret: field("client_secret")?,
        scopes: list("scopes")?,
        allow_emails: list("allow_emails")?,
        allow_domains: list("allow_domains")?,
        ..Default::default()
    }))
}

/// TLS options; whether the bytes pass through still encrypted.
fn tls_options(opts: &Opts, request: &mut pb::BindRequest) -> Result<bool, Failure> {
    opts.refuse_others(&[
        "url",
        "domain",
        "hostname",
        "subdomain",
        "proxyproto",
        "iprestriction",
        "trafficpolicy",
        "policy",
        "mutualtlsatagent",
        "mutualtlsatedge",
        "tlstermination",
    ])?;
    request.mutual_tls_cas_pem = opts.mutual_tls("mutualtlsatedge", "MutualTLSAtEdge")?;
    let Some(t) = opts.object("tlstermination", "TLSTermination")? else {
        request.terminate_at = pb::TerminateAt::Upstream as i32;
        return Ok(true);
    };
    if t.get("sealed_key").is_some_and(|v| !is_unset(v)) {
        return Err(unsupported("TLSTermination.sealed_key", "; send the key"));
    }
    request.terminate_at = pb::TerminateAt::Edge as i32;
    request.tls_cert_pem = Opts::base64(t, "cert", "TLSTermination.cert")?;
    request.tls_key_pem = Opts::base64(t, "key", "TLSTermination.key")?;
    Ok(false)
}

/// The options to echo in the bind's answer: the SDK's own, with the name
/// or address as bound filled in, so that a reconnect asks for it again.
pub fn echoed_opts(original: &Value, proto: &str, public_url: &str) -> Value {
    let mut opts = match original {
        Value::Object(o) => o.clone(),
        _ => Map::new(),
    };
    let host_port = public_url.split_once("://").map_or(public_url, |(_, r)| r);
    let has = |opts: &Map<String, Value>, key: &str| {
        opts.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case(key) && !is_unset(v))
    };
    if proto == "tcp" {
        if !has(&opts, "Addr") && !has(&opts, "URL") {
            opts.insert("Addr".into(), Value::from(host_port));
        }
    } else if !has(&opts, "Domain") && !has(&opts, "Hostname") && !has(&opts, "URL") {
        let host = crate::registry::host_of(public_url);
        opts.insert("Domain".into(), Value::from(host));
        opts.insert("Hostname".into(), Value::from(host));
    }
    Value::Object(opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ngrok::messages::lower_keys;

    fn bind(json: &str) -> Result<Mapped, Failure> {
        let bind: Bind =
            serde_json::from_value(lower_keys(serde_json::from_str(json).unwrap())).unwrap();
        map(&bind)
    }

    #[test]
    fn an_http_bind_maps_onto_the_modules() {
        let mapped = bind(
            r#"{"Id":"","Proto":"https","ForwardsTo":"app://x","Opts":{"Domain":"app.example.test",
            "Hostname":"","Auth":"","Subdomain":"","HostHeaderRewrite":false,"LocalUrlScheme":null,
            "ProxyProto":0,"Compression":{},"CircuitBreaker":{"error_threshold":0.5},
            "IPRestriction":{"allow_cidrs":["127.0.0.0/8"]},
            "BasicAuth":{"credentials":[{"username":"u","cleartext_password":"password1"}]},
            "RequestHeaders":{"add":["X-A:1"],"remove":["X-B"]},"ResponseHeaders":null,
            "UserAgentFilter":{"deny":["bot"]},"MutualTLSCA":null,"OAuth":null,"OIDC":null,
            "WebhookVerification":null,"WebsocketTCPConverter":null,"TrafficPolicy":null},
            "Extra":{"Token":"","IPPolicyRef":"","Metadata":"","Bindings":[],"PoolingEnabled":false}}"#,
        )
        .unwrap();
        let req = mapped.request;
        assert_eq!(req.domain, "app.example.test");
        assert_eq!(req.protocol, pb::Protocol::Http as i32);
        let modules = req.modules.unwrap();
        assert!(modules.compression);
        assert_eq!(modules.circuit_breaker, 0.5);
        assert_eq!(modules.basic_auth[0].username, "u");
        assert_eq!(modules.request_headers.unwrap().add, ["X-A:1"]);
        assert_eq!(modules.user_agent_filter.unwrap().deny, ["bot"]);
        assert_eq!(req.ip_restriction.unwrap().allow_cidrs, ["127.0.0.0/8"]);
    }

    #[test]
    fn options_not_implemented_are_refused_by_name() {
        for (opts, named) in [
            (r#"{"Subdomain":"x"}"#, "Opts.Subdomain"),
            (r#"{"Auth":"u:p"}"#, "Opts.Auth"),
            (r#"{"Unheard":1}"#, "unheard"),
        ] {
            let json = format!(r#"{{"Proto":"https","Opts":{opts}}}"#);
            let err = bind(&json).unwrap_err();
            assert!(err.detail.contains(named), "{opts}: {err}");
        }
        let err = bind(r#"{"Proto":"https","ForwardsProto":"http3","Opts":{}}"#).unwrap_err();
        assert!(err.detail.contains("ForwardsProto \"http3\""), "{err}");
        let err = bind(r#"{"Proto":"tcp","Opts":{},"Extra":{"IPPolicyRef":"ipp_1"}}"#).unwrap_err();
        assert!(err.detail.contains("IPPolicyRef"), "{err}");
    }

    #[test]
    fn app_protocol_http2_and_the_websocket_converter_map_onto_postern_binds() {
        let h2 = bind(r#"{"Proto":"https","ForwardsProto":"http2","Opts":{}}"#).unwrap();
        assert!(h2.request.upstream_http2);
        let h1 = bind(r#"{"Proto":"https","ForwardsProto":"http1","Opts":{}}"#).unwrap();
        assert!(!h1.request.upstream_http2);
        let err = bind(r#"{"Proto":"tcp","ForwardsProto":"http2","Opts":{}}"#).unwrap_err();
        assert!(err.detail.contains("ForwardsProto"), "{err}");

        let ws = bind(r#"{"Proto":"https","Opts":{"WebsocketTCPConverter":{}}}"#).unwrap();
        assert!(ws.request.modules.unwrap().websocket_tcp_converter);
        let off = bind(r#"{"Proto":"https","Opts":{"WebsocketTCPConverter":null}}"#).unwrap();
        assert!(off.request.modules.is_none());
    }

    #[test]
    fn go_urls_name_the_endpoint() {
        let tcp =
            bind(r#"{"Proto":"tcp","Opts":{"URL":"tcp://1.tcp.example.test:20123"}}"#).unwrap();
        assert_eq!(tcp.request.remote_port, 20123);
        let http = bind(r#"{"Proto":"https","Opts":{"URL":"https://go.example.test"}}"#).unwrap();
        assert_eq!(http.request.domain, "go.example.test");
        assert!(bind(r#"{"Proto":"tls","Opts":{"URL":"https://x.example.test"}}"#).is_err());
    }

    #[test]
    fn tls_termination_decides_passthrough() {
        let passthrough = bind(r#"{"Proto":"tls","Opts":{"Domain":"t.example.test"}}"#).unwrap();
        assert!(passthrough.kind.passthrough_tls);
        let at_edge =
            bind(r#"{"Proto":"tls","Opts":{"Domain":"t.example.test","TLSTermination":{}}}"#)
                .unwrap();
        assert!(!at_edge.kind.passthrough_tls);
        assert_eq!(at_edge.request.terminate_at, pb::TerminateAt::Edge as i32);
    }

    #[test]
    fn the_echo_names_what_was_bound() {
        let opts = serde_json::json!({"Domain": "", "ProxyProto": 0});
        let echoed = echoed_opts(&opts, "https", "https://abc.example.test:8443");
        assert_eq!(echoed["Domain"], "abc.example.test");
        let echoed = echoed_opts(&serde_json::json!({"Addr": ""}), "tcp", "tcp://h:20001");
        assert_eq!(echoed["Addr"], "h:20001");
    }
}
