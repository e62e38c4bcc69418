//! OAuth/OIDC at this node: the `[oauth]` table of the edge config (in two
//! stages), building the node's [`OAuthService`] (session store, sealing
//! key, IdP client), and checking the OAuth part of a bind.

use std::{path::PathBuf, sync::Arc, time::Duration};

use postern_ingress::{
    DomainPattern, EndpointSpec, IdpHttp, MemoryStore, OAuthEndpoint, OAuthService, OAuthSettings,
    Protocol, RedisOptions, RedisStore, RedisTarget, SessionKey, SessionStore, normalize_name,
};
use postern_net::Secret;
use postern_proto::{ErrorCode, Failure, pb};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;

use crate::{
    config::duration,
    error::{ConfigError, StartError, invalid},
};

/// `[oauth]` as written. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// Host of the one OAuth callback URL, `https://<auth_host>/oauth2/callback`,
    /// which every identity provider app must list as its redirect URL. It
    /// must resolve to the edge (any node of any region). Default
    /// `auth.<domain>`.
    pub auth_host: Option<String>,
    /// Secret (at least 32 characters) whose SHA-256 is the AES-256-GCM key
    /// that seals tokens, PKCE verifiers and IdP codes in the session
    /// store. Every node sharing the store needs the same. Required with
    /// Redis; without Redis a random key is made at start.
    pub session_key: Option<Secret>,
    /// Redis holding login state and sessions, shared by every node:
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS.
    /// Without it (and without `redis_cluster`) sessions live in this
    /// node's memory only: per node, lost on restart (dev mode).
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster instead, same URL forms.
    #[serde(default)]
    pub redis_cluster: Vec<String>,
    /// PEM file of CAs for `rediss://`. Default: the system's roots.
    pub redis_ca: Option<PathBuf>,
    /// Bound on every Redis command, connecting included; past it an OAuth
    /// endpoint answers 503 (`ERR_POSTERN_3150`). Default `"300ms"`.
    pub redis_timeout: Option<String>,
    /// Prefix of every Redis key. Default `"postern:oauth:"`.
    pub redis_key_prefix: Option<String>,
    /// Shortest auth check interval honoured: a non-zero
    /// `auth_check_interval` below it is raised to it. Default `"3m"`
    /// (ngrok's); tests lower it.
    pub auth_check_floor: Option<String>,
    /// How long a login may take from the redirect to the IdP until the
    /// callback (`ERR_POSTERN_3119` past it). Default `"15m"` (ngrok's).
    pub login_timeout: Option<String>,
    /// Bound on each call to an identity provider (discovery, token,
    /// userinfo). Default `"5s"`.
    pub idp_timeout: Option<String>,
    /// PEM file of extra CAs trusted for identity providers (beside the
    /// Mozilla roots), for private IdPs.
    pub idp_root_cas: Option<PathBuf>,
}

/// Where sessions live.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// This node's memory: sessions are per node.
    Memory,
    Redis(RedisOptions),
}

/// Validated `[oauth]`.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    pub auth_host: String,
    pub session_key: Option<Secret>,
    pub store: StoreConfig,
    pub auth_check_floor: Duration,
    pub login_timeout: Duration,
    pub idp_timeout: Duration,
    pub idp_root_cas: Vec<CertificateDer<'static>>,
}

fn redis_url(field: &str, url: &str) -> Result<String, ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid!(
            "{field}: {:?} must start with redis:// or rediss://",
            postern_ingress::redact_url(url)
        ));
    }
    Ok(url.to_string())
}

fn read_pem_certs(
    field: &str,
    path: &PathBuf,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::field(format!("{field}: reading {}", path.display()), e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid!("{field}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(invalid!(
            "{field}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

impl RawOAuth {
    pub fn validate(self, domain: &str) -> Result<OAuthConfig, ConfigError> {
        let auth_host = match &self.auth_host {
            Some(host) => normalize_name(host)
                .map_err(|e| ConfigError::field(format!("oauth.auth_host: {host:?}"), e))?,
            None => format!("auth.{domain}"),
        };
        let timeout = duration(
            "oauth.redis_timeout",
            &self.redis_timeout,
            Duration::from_millis(300),
        )?;
        if timeout.is_zero() {
            return Err(invalid!("oauth.redis_timeout: must not be zero"));
        }
        let target = match (&self.redis_url, self.redis_cluster.as_slice()) {
            (Some(_), [_, ..]) => {
                return Err(invalid!(
                    "oauth.redis_url and oauth.redis_cluster: give one of them"
                ));
            }
            (Some(url), []) => Some(RedisTarget::Single(redis_url("oauth.redis_url", url)?)),
            (None, []) => None,
            (None, urls) => Some(RedisTarget::Cluster(
                urls.iter()
                    .enumerate()
                    .map(|(i, u)| redis_url(&format!("oauth.redis_cluster[{i}]"), u))
                    .collect::<Result<_, _>>()?,
            )),
        };
        let session_key = match self.session_key {
            Some(key) if key.expose().len() < 32 => {
                return Err(invalid!(
                    "oauth.session_key: must be at least 32 characters"
                ));
            }
            Some(key) => Some(key),
            None if target.is_some() => {
                return Err(invalid!(
                    "oauth.session_key: required with Redis (every node sharing it must seal with the same key)"
                ));
            }
            None => None,
        };
        let store = match target {
            None => {
                if self.redis_ca.is_some() {
                    return Err(invalid!(
                        "oauth.redis_ca: only with oauth.redis_url or oauth.redis_cluster"
                    ));
                }
                StoreConfig::Memory
            }
            Some(target) => StoreConfig::Redis(RedisOptions {
                target,
                ca_pem: self
                    .redis_ca
                    .as_ref()
                    .map(|p| {
                        std::fs::read(p).map_err(|e| {
                            ConfigError::field(
                                format!("oauth.redis_ca: reading {}", p.display()),
                                e,
                            )
                        })
                    })
                    .transpose()?,
                timeout,
                key_prefix: self
                    .redis_key_prefix
                    .unwrap_or_else(|| "postern:oauth:".into()),
            }),
        };
        let login_timeout = duration(
            "oauth.login_timeout",
            &self.login_timeout,
            Duration::from_secs(15 * 60),
        )?;
        if login_timeout < Duration::from_secs(1) {
            return Err(invalid!("oauth.login_timeout: must be at least 1s"));
        }
        let idp_timeout = duration(
            "oauth.idp_timeout",
            &self.idp_timeout,
            Duration::from_secs(5),
        )?;
        if idp_timeout.is_zero() {
            return Err(invalid!("oauth.idp_timeout: must not be zero"));
        }
        Ok(OAuthConfig {
            auth_host,
            session_key,
            store,
            auth_check_floor: duration(
                "oauth.auth_check_floor",
                &self.auth_check_floor,
                Duration::from_secs(180),
            )?,
            login_timeout,
            idp_timeout,
            idp_root_cas: match &self.idp_root_cas {
                Some(path) => read_pem_certs("oauth.idp_root_cas", path)?,
                None => Vec::new(),
            },
        })
    }
}

/// The Redis named in `[oauth]`, if any: it holds OAuth sessions and, with
/// `rate_limit.store = "redis"`, rate-limit counts. Needs a Tokio runtime
/// (it connects lazily in the background).
pub fn redis(config: &OAuthConfig) -> Result<Option<Arc<RedisStore>>, StartError> {
    match &config.store {
        StoreConfig::Memory => Ok(None),
        StoreConfig::Redis(options) => {
            let field = match options.target {
                RedisTarget::Single(_) => "oauth.redis_url",
                RedisTarget::Cluster(_) => "oauth.redis_cluster",
            };
            let store = RedisStore::new(options.clone())
                .map_err(|source| StartError::Redis { field, source })?;
            Ok(Some(Arc::new(store)))
        }
    }
}

/// The node's OAuth service, its sessions in `redis` (from [`redis`]) or
/// else in this node's memory.
pub fn service(
    config: &OAuthConfig,
    redis: Option<Arc<RedisStore>>,
    https_port: u16,
) -> Arc<OAuthService> {
    let store: Arc<dyn SessionStore> = match redis {
        None => {
            tracing::info!(
                "OAuth sessions are kept in this node's memory (no oauth.redis_url): per node, lost on restart"
            );
            Arc::new(MemoryStore::new())
        }
        Some(redis) => redis,
    };
    let key = match &config.session_key {
        Some(secret) => SessionKey::from_secret(secret),
        None => SessionKey::random(),
    };
    let settings = OAuthSettings {
        auth_host: config.auth_host.clone(),
        https_port,
        auth_check_floor: config.auth_check_floor,
        login_timeout: config.login_timeout,
    };
    let http = IdpHttp::new(&config.idp_root_cas, config.idp_timeout);
    let service = OAuthService::new(settings, store, key, http);
    tracing::info!(callback = %service.callback_url(), "OAuth callback URL");
    service
}

/// The OAuth part of a bind: the auth host cannot be bound; OAuth needs an
/// HTTP endpoint; the options are checked and the provider discovered.
pub async fn bind(
    service: &Arc<OAuthService>,
    spec: &EndpointSpec,
    req: &pb::BindRequest,
) -> Result<Option<Arc<OAuthEndpoint>>, Failure> {
    if let Some(DomainPattern::Exact(name)) = &spec.domain
        && service.is_auth_host(name)
    {
        return Err(Failure::new(
            ErrorCode::INVALID_DOMAIN,
            format!("{name} is this edge's OAuth callback host"),
        ));
    }
    let Some(options) = &req.oauth else {
        return Ok(None);
    };
    if spec.protocol != Protocol::Http {
        return Err(Failure::new(
            ErrorCode::OAUTH_INVALID_CONFIG,
            "OAuth and OIDC protect HTTP endpoints only",
        ));
    }
    service.endpoint(options).await.map(|e| Some(Arc::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> anyhow::Result<OAuthConfig> {
        let raw: RawOAuth = toml::from_str(toml_text)?;
        Ok(raw.validate("example.test")?)
    }

    #[test]
    fn defaults_are_memory_and_auth_host_under_the_domain() {
        let c = parse("").unwrap();
        assert_eq!(c.auth_host, "auth.example.test");
        assert!(matches!(c.store, StoreConfig::Memory));
        assert_eq!(c.login_timeout, Duration::from_secs(900));
        assert_eq!(c.auth_check_floor, Duration::from_secs(180));
    }

    #[test]
    fn redis_needs_a_session_key_and_hides_passwords() {
        let key = "k".repeat(32);
        let c = parse(&format!(
            "redis_url = \"redis://app:pw@cache:6379\"\nsession_key = \"{key}\"\nredis_timeout = \"250ms\""
        ))
        .unwrap();
        let StoreConfig::Redis(options) = &c.store else {
            panic!("redis expected")
        };
        assert_eq!(options.timeout, Duration::from_millis(250));
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw@") && !shown.contains(&key), "{shown}");
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("redis_url = \"redis://x:1\"", "oauth.session_key"),
            ("session_key = \"short\"", "oauth.session_key"),
            (
                "redis_url = \"http://x:1\"\nsession_key = \"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\"",
                "oauth.redis_url",
            ),
            (
                "redis_cluster = [\"redis://a:1\", \"tcp://b:2\"]\nsession_key = \"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\"",
                "oauth.redis_cluster[1]",
            ),
            ("redis_timeout = \"soon\"", "oauth.redis_timeout"),
            ("auth_host = \"bad host\"", "oauth.auth_host"),
            ("login_timeout = \"0s\"", "oauth.login_timeout"),
            ("bogus = 1", "bogus"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(field), "{field:?} not in: {err}");
        }
    }
}
