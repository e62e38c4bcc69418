//! ngrok's HTTP modules at the agent: the v2 tunnel keys and the `http`
//! command's flags (`--basic-auth`, `--request-header-add`, …), checked
//! here so a mistake names the key before anything is sent, and carried in
//! the bind for the edge to enforce. Passwords leave the agent only as
//! their SHA-256.

use clap::Args;
use postern_proto::pb;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use crate::error::{ConfigError, bail, invalid};

/// `request_header` / `response_header`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderEdits {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `verify_webhook`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerifyWebhook {
    pub provider: String,
    #[serde(default)]
    pub secret: String,
}

/// `user_agent_filter`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUserAgentFilter {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The module keys of a tunnel as written.
pub struct RawModules<'a> {
    pub basic_auth: &'a Option<Vec<String>>,
    pub request_header: &'a Option<RawHeaderEdits>,
    pub response_header: &'a Option<RawHeaderEdits>,
    pub host_header: &'a Option<String>,
    pub compression: &'a Option<bool>,
    pub circuit_breaker: &'a Option<f64>,
    pub verify_webhook: &'a Option<RawVerifyWebhook>,
    pub user_agent_filter: &'a Option<RawUserAgentFilter>,
    pub websocket_tcp_converter: &'a Option<bool>,
    pub schemes: &'a Option<Vec<String>>,
}

/// The modules as the bind carries them; its `Debug` never shows the
/// webhook secret.
#[derive(Clone, Default, PartialEq)]
pub struct HttpModules(pub pb::HttpModules);

impl std::fmt::Debug for HttpModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.0;
        f.debug_struct("HttpModules")
            .field(
                "basic_auth_users",
                &m.basic_auth.iter().map(|c| &c.username).collect::<Vec<_>>(),
            )
            .field("request_headers", &m.request_headers)
            .field("response_headers", &m.response_headers)
            .field("host_header", &m.host_header)
            .field("compression", &m.compression)
            .field("circuit_breaker", &m.circuit_breaker)
            .field(
                "verify_webhook",
                &m.verify_webhook.as_ref().map(|v| &v.provider),
            )
            .field("user_agent_filter", &m.user_agent_filter)
            .field("schemes", &m.schemes)
            .finish()
    }
}

/// Checks the module keys of tunnel `field` (`tunnels.<name>`) and builds
/// what the bind carries; `upstream_host` is what `host_header: rewrite`
/// sets. `None` when no module is set.
pub fn validate(
    raw: RawModules<'_>,
    http: bool,
    upstream_host: &str,
    field: &str,
) -> Result<Option<HttpModules>, ConfigError> {
    let mut m = pb::HttpModules::default();
    let key = |k: &str| format!("{field}.{k}");
    if let Some(pairs) = raw.basic_auth {
        if pairs.len() > 10 {
            bail!("{}: at most 10 user:password pairs", key("basic_auth"));
        }
        for (i, pair) in pairs.iter().enumerate() {
            let credential = pb::BasicAuthCredential::from_pair(pair)
                .map_err(|e| invalid!("{}[{i}]: {e}", key("basic_auth")))?;
            m.basic_auth.push(credential);
        }
    }
    let edits = |edits: &Option<RawHeaderEdits>,
                 name: &str|
     -> Result<Option<pb::HeaderEdits>, ConfigError> {
        let Some(edits) = edits else { return Ok(None) };
        for (i, line) in edits.add.iter().enumerate() {
            match line.split_once(':') {
                Some((n, _)) if !n.trim().is_empty() => {}
                _ => bail!("{}.add[{i}]: {line:?} is not \"name: value\"", key(name)),
            }
        }
        Ok(Some(pb::HeaderEdits {
            add: edits.add.clone(),
            remove: edits.remove.clone(),
        }))
    };
    m.request_headers = edits(raw.request_header, "request_header")?;
    m.response_headers = edits(raw.response_header, "response_header")?;
    if let Some(host) = raw.host_header {
        m.host_header = match host.as_str() {
            "rewrite" => upstream_host.to_string(),
            "preserve" | "" => String::new(),
            literal => literal.to_string(),
        };
    }
    m.compression = raw.compression.unwrap_or(false);
    if let Some(ratio) = *raw.circuit_breaker {
        if !(ratio > 0.0 && ratio <= 1.0) {
            bail!(
                "{}: {ratio} is not a share of errors between 0 and 1",
                key("circuit_breaker")
            );
        }
        m.circuit_breaker = ratio;
    }
    if let Some(verify) = raw.verify_webhook {
        if verify.secret.is_empty() {
            bail!("{}.secret: required", key("verify_webhook"));
        }
        m.verify_webhook = Some(pb::WebhookVerification {
            provider: verify.provider.clone(),
            secret: verify.secret.clone(),
        });
    }
    if let Some(filter) = raw.user_agent_filter {
        for (list, name) in [(&filter.allow, "allow"), (&filter.deny, "deny")] {
            for (i, r) in list.iter().enumerate() {
                if let Err(e) = regex::Regex::new(r) {
                    bail!(
                        "{}.{name}[{i}]: {r:?} is not a regex: {e}",
                        key("user_agent_filter")
                    );
                }
            }
        }
        m.user_agent_filter = Some(pb::UserAgentFilter {
            allow: filter.allow.clone(),
            deny: filter.deny.clone(),
        });
    }
    m.websocket_tcp_converter = raw.websocket_tcp_converter.unwrap_or(false);
    if let Some(schemes) = raw.schemes {
        for s in schemes {
            if !matches!(s.as_str(), "http" | "https") {
                bail!("{}: {s:?} is not http or https", key("schemes"));
            }
        }
        if schemes.is_empty() {
            bail!("{}: at least one of http, https", key("schemes"));
        }
        m.schemes = schemes.clone();
    }
    if m == pb::HttpModules::default() {
        return Ok(None);
    }
    if !http {
        bail!(
            "{field}: basic_auth, request_header, response_header, host_header, compression, circuit_breaker, verify_webhook, user_agent_filter and schemes are for HTTP tunnels"
        );
    }
    Ok(Some(HttpModules(m)))
}

/// The `http` command's module flags, ngrok's names.
#[derive(Debug, Default, Args)]
pub struct ModuleFlags {
    /// user:password that may use the endpoint (repeat the flag).
    #[arg(long)]
    pub basic_auth: Vec<String>,
    /// A header added to requests, "name: value" (repeat the flag).
    #[arg(long)]
    pub request_header_add: Vec<String>,
    /// A header removed from requests (repeat the flag).
    #[arg(long)]
    pub request_header_remove: Vec<String>,
    /// A header added to responses, "name: value" (repeat the flag).
    #[arg(long)]
    pub response_header_add: Vec<String>,
    /// A header removed from responses (repeat the flag).
    #[arg(long)]
    pub response_header_remove: Vec<String>,
    /// The Host the upstream sees: rewrite (its own), preserve, or a name.
    #[arg(long)]
    pub host_header: Option<String>,
    /// Compress responses (gzip, deflate, br).
    #[arg(long)]
    pub compression: bool,
    /// Reject requests while this share of answers are 5xx (0..1].
    #[arg(long)]
    pub circuit_breaker: Option<f64>,
    /// Verify webhooks from this provider (github, stripe, slack, …).
    #[arg(long)]
    pub verify_webhook: Option<String>,
    /// The webhook provider's signing secret.
    #[arg(long, env = "POSTERN_VERIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub verify_webhook_secret: Option<String>,
    /// User-Agent regexes that pass (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub ua_filter_allow: Vec<String>,
    /// User-Agent regexes refused (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub ua_filter_deny: Vec<String>,
    /// Bridge WebSocket binary frames to a TCP upstream.
    #[arg(long)]
    pub websocket_tcp_converter: bool,
    /// Serve the endpoint on these schemes: http, https (comma-separated).
    #[arg(long = "scheme", value_delimiter = ',')]
    pub schemes: Vec<String>,
}

impl ModuleFlags {
    /// The tunnel keys for the flags given.
    pub fn tunnel_keys(&self) -> Vec<(&'static str, Value)> {
        let list =
            |v: &[String]| Value::Sequence(v.iter().map(|s| Value::from(s.as_str())).collect());
        let pair = |add: &[String], remove: &[String]| {
            let mut m = Mapping::new();
            if !add.is_empty() {
                m.insert("add".into(), list(add));
            }
            if !remove.is_empty() {
                m.insert("remove".into(), list(remove));
            }
            (!m.is_empty()).then_some(Value::Mapping(m))
        };
        let mut keys = Vec::new();
        if !self.basic_auth.is_empty() {
            keys.push(("basic_auth", list(&self.basic_auth)));
        }
        if let Some(v) = pair(&self.request_header_add, &self.request_header_remove) {
            keys.push(("request_header", v));
        }
        if let Some(v) = pair(&self.response_header_add, &self.response_header_remove) {
            keys.push(("response_header", v));
        }
        if let Some(v) = &self.host_header {
            keys.push(("host_header", Value::from(v.as_str())));
        }
        if self.compression {
            keys.push(("compression", Value::from(true)));
        }
        if let Some(v) = self.circuit_breaker {
            keys.push(("circuit_breaker", Value::from(v)));
        }
        if self.verify_webhook.is_some() || self.verify_webhook_secret.is_some() {
            let mut m = Mapping::new();
            m.insert(
                "provider".into(),
                Value::from(self.verify_webhook.clone().unwrap_or_default()),
            );
            m.insert(
                "secret".into(),
                Value::from(self.verify_webhook_secret.clone().unwrap_or_default()),
            );
            keys.push(("verify_webhook", Value::Mapping(m)));
        }
        if !self.ua_filter_allow.is_empty() || !self.ua_filter_deny.is_empty() {
            let mut m = Mapping::new();
            for (name, regexes) in [
                ("allow", &self.ua_filter_allow),
                ("deny", &self.ua_filter_deny),
            ] {
                if !regexes.is_empty() {
                    m.insert(name.into(), list(regexes));
                }
            }
            keys.push(("user_agent_filter", Value::Mapping(m)));
        }
        if self.websocket_tcp_converter {
            keys.push(("websocket_tcp_converter", Value::from(true)));
        }
        if !self.schemes.is_empty() {
            keys.push(("schemes", list(&self.schemes)));
        }
        keys
    }
}
