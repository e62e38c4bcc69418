//! A tunnel's `oauth:` / `oidc:` keys (ngrok's OAuth and OpenID Connect
//! modules) and what the agent sends to the edge for them. The agent checks
//! the shape (types, durations, which tunnels may have them); the edge
//! checks the rest (provider names, client credentials, allow-lists, the
//! IdP's discovery document), so every agent gets the same rules and the
//! same error codes.

use postern_net::Secret;
use postern_proto::pb;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use crate::error::{ConfigError, bail, invalid};

/// `oauth:` on an HTTP tunnel.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// `google`, `github`, `gitlab`, `microsoft`, `linkedin`, `twitch`,
    /// `amazon` or `facebook`.
    pub provider: Option<String>,
    /// The app's client id at the provider (required: there are no
    /// managed apps).
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// Extra scopes to ask for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// ngrok's older name for `scopes`.
    #[serde(default)]
    pub oauth_scopes: Vec<String>,
    /// Only these addresses may log in (exact, case-insensitive).
    #[serde(default)]
    pub allow_emails: Vec<String>,
    /// Only addresses at these domains (exact: list each subdomain).
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// Check the user with the provider again after this long (`"5m"`, or
    /// seconds). Default 0: only at login. The edge may raise short values.
    pub auth_check_interval: Option<Value>,
    /// Log out users idle this long. Default 0: never.
    pub inactivity_timeout: Option<Value>,
    /// Log out users this long after login. Default 0: never.
    pub maximum_duration: Option<Value>,
    /// Let `OPTIONS` requests (CORS preflights) through without login.
    #[serde(default)]
    pub options_passthrough: bool,
    /// Prefix of the module's cookie names. Default `ngrok.`.
    pub cookie_prefix: Option<String>,
}

/// `oidc:` on an HTTP tunnel: any OpenID Provider.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    /// The issuer; `<issuer_url>/.well-known/openid-configuration` must
    /// serve its discovery document.
    pub issuer_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// Scopes to ask for (`openid` is always added); default `openid email
    /// profile`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Only these addresses may log in (exact, case-insensitive).
    #[serde(default)]
    pub allow_emails: Vec<String>,
    /// Only addresses at these domains (exact: list each subdomain).
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// Check the user with the provider again after this long (`"5m"`, or
    /// seconds). Default 0: only at login. The edge may raise short values.
    pub auth_check_interval: Option<Value>,
    /// Log out users idle this long. Default 0: never.
    pub inactivity_timeout: Option<Value>,
    /// Log out users this long after login. Default 0: never.
    pub maximum_duration: Option<Value>,
    /// Let `OPTIONS` requests (CORS preflights) through without login.
    #[serde(default)]
    pub options_passthrough: bool,
    /// Prefix of the module's cookie names. Default `ngrok.`.
    pub cookie_prefix: Option<String>,
}

/// The keys `oauth:` and `oidc:` share, borrowed from either.
struct Common<'a> {
    allow_emails: &'a [String],
    allow_domains: &'a [String],
    auth_check_interval: &'a Option<Value>,
    inactivity_timeout: &'a Option<Value>,
    maximum_duration: &'a Option<Value>,
    options_passthrough: bool,
    cookie_prefix: &'a Option<String>,
}

macro_rules! common {
    ($raw:expr) => {
        Common {
            allow_emails: &$raw.allow_emails,
            allow_domains: &$raw.allow_domains,
            auth_check_interval: &$raw.auth_check_interval,
            inactivity_timeout: &$raw.inactivity_timeout,
            maximum_duration: &$raw.maximum_duration,
            options_passthrough: $raw.options_passthrough,
            cookie_prefix: &$raw.cookie_prefix,
        }
    };
}

/// What the edge gets, with the secret kept out of `Debug`.
#[derive(Clone, Debug, Default)]
pub struct OAuthSpec {
    pub provider: String,
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
    pub allow_emails: Vec<String>,
    pub allow_domains: Vec<String>,
    pub auth_check_interval_secs: u32,
    pub inactivity_timeout_secs: u32,
    pub maximum_duration_secs: u32,
    pub options_passthrough: bool,
    pub cookie_prefix: String,
}

impl OAuthSpec {
    pub fn to_pb(&self) -> pb::OAuthOptions {
        pb::OAuthOptions {
            provider: self.provider.clone(),
            issuer_url: self.issuer_url.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.expose().to_string(),
            scopes: self.scopes.clone(),
            allow_emails: self.allow_emails.clone(),
            allow_domains: self.allow_domains.clone(),
            auth_check_interval_secs: self.auth_check_interval_secs,
            inactivity_timeout_secs: self.inactivity_timeout_secs,
            maximum_duration_secs: self.maximum_duration_secs,
            options_passthrough: self.options_passthrough,
            cookie_prefix: self.cookie_prefix.clone(),
        }
    }
}

/// ngrok's `--oauth*` flags, plus `--oidc*` (Postern: the OIDC module from
/// the command line, with its own allow-lists).
#[derive(Debug, Default, clap::Args)]
pub struct AuthFlags {
    /// Log visitors in with this OAuth provider (google, github, gitlab,
    /// microsoft, linkedin, twitch, amazon, facebook).
    #[arg(long)]
    pub oauth: Option<String>,
    /// Your OAuth app's client id (required: there are no managed apps).
    #[arg(long)]
    pub oauth_client_id: Option<String>,
    /// Your OAuth app's client secret.
    #[arg(long, env = "POSTERN_OAUTH_CLIENT_SECRET", hide_env_values = true)]
    pub oauth_client_secret: Option<String>,
    /// An extra scope to ask for (repeat the flag).
    #[arg(long)]
    pub oauth_scope: Vec<String>,
    /// Allow only this email address (repeat the flag).
    #[arg(long)]
    pub oauth_allow_email: Vec<String>,
    /// Allow only addresses at this domain, exactly (repeat the flag).
    #[arg(long)]
    pub oauth_allow_domain: Vec<String>,
    /// Log visitors in with this OpenID Provider (its issuer URL).
    #[arg(long)]
    pub oidc: Option<String>,
    /// Your OIDC app's client id.
    #[arg(long)]
    pub oidc_client_id: Option<String>,
    /// Your OIDC app's client secret.
    #[arg(long, env = "POSTERN_OIDC_CLIENT_SECRET", hide_env_values = true)]
    pub oidc_client_secret: Option<String>,
    /// A scope to ask for (repeat the flag); default openid email profile.
    #[arg(long)]
    pub oidc_scope: Vec<String>,
    /// Allow only this email address (repeat the flag).
    #[arg(long)]
    pub oidc_allow_email: Vec<String>,
    /// Allow only addresses at this domain, exactly (repeat the flag).
    #[arg(long)]
    pub oidc_allow_domain: Vec<String>,
}

impl AuthFlags {
    /// The tunnel's `oauth` / `oidc` keys for the flags given.
    pub fn tunnel_keys(&self) -> Vec<(&'static str, Value)> {
        fn map(entries: Vec<(&str, Option<Value>)>) -> Option<Value> {
            let mut m = Mapping::new();
            for (k, v) in entries {
                if let Some(v) = v {
                    m.insert(Value::from(k), v);
                }
            }
            (!m.is_empty()).then_some(Value::Mapping(m))
        }
        let text = |s: &Option<String>| s.clone().map(Value::from);
        let list = |v: &[String]| {
            (!v.is_empty())
                .then(|| Value::Sequence(v.iter().map(|s| Value::from(s.as_str())).collect()))
        };
        let oauth = map(vec![
            ("provider", text(&self.oauth)),
            ("client_id", text(&self.oauth_client_id)),
            ("client_secret", text(&self.oauth_client_secret)),
            ("scopes", list(&self.oauth_scope)),
            ("allow_emails", list(&self.oauth_allow_email)),
            ("allow_domains", list(&self.oauth_allow_domain)),
        ]);
        let oidc = map(vec![
            ("issuer_url", text(&self.oidc)),
            ("client_id", text(&self.oidc_client_id)),
            ("client_secret", text(&self.oidc_client_secret)),
            ("scopes", list(&self.oidc_scope)),
            ("allow_emails", list(&self.oidc_allow_email)),
            ("allow_domains", list(&self.oidc_allow_domain)),
        ]);
        [("oauth", oauth), ("oidc", oidc)]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect()
    }
}

/// A duration in whole seconds: `"30s"`, `"5m"`, or a number of seconds.
fn seconds(field: &str, value: &Option<Value>) -> Result<u32, ConfigError> {
    let Some(value) = value else {
        return Ok(0);
    };
    let duration = match value {
        Value::Number(n) => n
            .as_u64()
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| invalid!("{field}: {n} is not a number of seconds"))?,
        Value::String(s) => humantime::parse_duration(s).map_err(|e| {
            ConfigError::field(format!("{field}: {s:?} is not a duration like \"30s\""), e)
        })?,
        other => bail!("{field}: {other:?} is not a duration like \"30s\""),
    };
    if duration.subsec_nanos() != 0 {
        bail!("{field}: {duration:?} is not a whole number of seconds");
    }
    u32::try_from(duration.as_secs())
        .map_err(|e| ConfigError::field(format!("{field}: too long"), e))
}

impl Common<'_> {
    fn apply(&self, field: &str, spec: &mut OAuthSpec) -> Result<(), ConfigError> {
        spec.allow_emails = self.allow_emails.to_vec();
        spec.allow_domains = self.allow_domains.to_vec();
        spec.auth_check_interval_secs = seconds(
            &format!("{field}.auth_check_interval"),
            self.auth_check_interval,
        )?;
        spec.inactivity_timeout_secs = seconds(
            &format!("{field}.inactivity_timeout"),
            self.inactivity_timeout,
        )?;
        spec.maximum_duration_secs =
            seconds(&format!("{field}.maximum_duration"), self.maximum_duration)?;
        spec.options_passthrough = self.options_passthrough;
        spec.cookie_prefix = self.cookie_prefix.clone().unwrap_or_default();
        Ok(())
    }
}

/// The tunnel's OAuth or OIDC settings; `tunnel` is `tunnels.<name>`.
pub fn spec(
    tunnel: &str,
    http: bool,
    oauth: Option<&RawOAuth>,
    oidc: Option<&RawOidc>,
) -> Result<Option<OAuthSpec>, ConfigError> {
    let (key, spec) = match (oauth, oidc) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => bail!(
            "{tunnel}.oidc: a tunnel takes oauth or oidc, not both (one auth module per endpoint)"
        ),
        (Some(raw), None) => {
            let field = format!("{tunnel}.oauth");
            let provider = raw
                .provider
                .clone()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| invalid!("{field}.provider: missing (google, github, …)"))?;
            let mut spec = OAuthSpec {
                provider,
                client_id: raw.client_id.clone().unwrap_or_default(),
                client_secret: Secret::new(raw.client_secret.clone().unwrap_or_default()),
                scopes: raw
                    .scopes
                    .iter()
                    .chain(&raw.oauth_scopes)
                    .cloned()
                    .collect(),
                ..Default::default()
            };
            common!(raw).apply(&field, &mut spec)?;
            ("oauth", spec)
        }
        (None, Some(raw)) => {
            let field = format!("{tunnel}.oidc");
            let issuer_url = raw
                .issuer_url
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| invalid!("{field}.issuer_url: missing"))?;
            let mut spec = OAuthSpec {
                provider: "oidc".into(),
                issuer_url,
                client_id: raw.client_id.clone().unwrap_or_default(),
                client_secret: Secret::new(raw.client_secret.clone().unwrap_or_default()),
                scopes: raw.scopes.clone(),
                ..Default::default()
            };
            common!(raw).apply(&field, &mut spec)?;
            ("oidc", spec)
        }
    };
    if !http {
        bail!("{tunnel}.{key}: only http tunnels take {key}");
    }
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn oauth_keys_with_ngrok_spellings() {
        let raw: RawOAuth = parse(
            "provider: google\nclient_id: id\nclient_secret: s3cret\noauth_scopes: [a]\nscopes: [b]\n\
             allow_emails: [x@acme.org]\nallow_domains: [acme.org]\nauth_check_interval: 5m\n\
             inactivity_timeout: 90\nmaximum_duration: 1h\noptions_passthrough: true\ncookie_prefix: app.\n",
        );
        let spec = spec("tunnels.w", true, Some(&raw), None).unwrap().unwrap();
        assert_eq!(spec.scopes, ["b", "a"]);
        assert_eq!(spec.auth_check_interval_secs, 300);
        assert_eq!(spec.inactivity_timeout_secs, 90);
        assert_eq!(spec.maximum_duration_secs, 3600);
        assert!(spec.options_passthrough);
        assert!(!format!("{spec:?}").contains("s3cret"));
        let pb = spec.to_pb();
        assert_eq!(pb.client_secret, "s3cret");
        assert_eq!(pb.cookie_prefix, "app.");
    }

    #[test]
    fn flags_make_the_yaml_keys() {
        let flags = AuthFlags {
            oauth: Some("google".into()),
            oauth_client_id: Some("id".into()),
            oauth_allow_email: vec!["a@x.org".into(), "b@x.org".into()],
            ..Default::default()
        };
        let keys = flags.tunnel_keys();
        assert_eq!(keys.len(), 1);
        let raw: RawOAuth = serde_yaml_ng::from_value(keys[0].1.clone()).unwrap();
        assert_eq!(raw.provider.as_deref(), Some("google"));
        assert_eq!(raw.allow_emails, ["a@x.org", "b@x.org"]);
        assert!(AuthFlags::default().tunnel_keys().is_empty());
    }

    #[test]
    fn oidc_and_errors_name_the_field() {
        let raw: RawOidc =
            parse("issuer_url: https://idp.example\nclient_id: c\nclient_secret: s\n");
        let s = spec("tunnels.w", true, None, Some(&raw)).unwrap().unwrap();
        assert_eq!(
            (s.provider.as_str(), s.issuer_url.as_str()),
            ("oidc", "https://idp.example")
        );
        let cases: Vec<(ConfigError, &str)> = vec![
            (
                spec("tunnels.w", false, None, Some(&raw)).unwrap_err(),
                "tunnels.w.oidc",
            ),
            (
                spec("tunnels.w", true, Some(&RawOAuth::default()), Some(&raw)).unwrap_err(),
                "tunnels.w.oidc",
            ),
            (
                spec("tunnels.w", true, Some(&RawOAuth::default()), None).unwrap_err(),
                "tunnels.w.oauth.provider",
            ),
            (
                spec(
                    "tunnels.w",
                    true,
                    Some(&parse("provider: x\nmaximum_duration: 1500ms\n")),
                    None,
                )
                .unwrap_err(),
                "tunnels.w.oauth.maximum_duration",
            ),
            (
                spec(
                    "tunnels.w",
                    true,
                    Some(&parse("provider: x\ninactivity_timeout: soon\n")),
                    None,
                )
                .unwrap_err(),
                "tunnels.w.oauth.inactivity_timeout",
            ),
        ];
        for (err, field) in cases {
            assert!(
                format!("{err:#}").contains(field),
                "{field:?} not in {err:#}"
            );
        }
    }
}
