//! ngrok's OAuth and OpenID Connect modules at the edge.
//!
//! One node-wide [`OAuthService`] owns the session store (Redis, shared by
//! every node of every region, or memory on a dev node), the key that seals
//! secrets in it, the back-channel HTTP client and the auth host, whose
//! `https://<auth_host>/oauth2/callback` is the one callback URL every
//! endpoint registers at its IdP. Each endpoint with OAuth gets an
//! [`OAuthEndpoint`] (provider, client, allow-lists, timeouts) that
//! [`OAuthEndpoint::gate`]s its requests.
//!
//! A login: the endpoint redirects to the IdP with `state`, `nonce` and
//! PKCE, keeping the state record (return path, PKCE verifier, …) sealed in
//! the store and binding the attempt to the browser with a nonce cookie;
//! the IdP sends the browser to the auth host, which swaps the state for a
//! one-time code and hands the browser to the endpoint's own
//! `/auth/callback?code=…`; there the endpoint checks the nonce cookie,
//! redeems the IdP's code, applies the allow-lists and sets the session
//! cookie. Any node may serve any step.
//!
//! Store failures fail closed: an OAuth endpoint answers 503 with
//! `Retry-After` and forwards nothing.

mod callback;
mod flow;
mod idp_http;
mod pages;
mod paths;
mod provider;
mod redis;
mod seal;
mod sessions;
mod store;

use std::{sync::Arc, time::Duration};

use postern_net::Secret;
use postern_proto::{ErrorCode, Failure, pb};

pub use flow::Gate;
pub use idp_http::IdpHttp;
pub use provider::{NAMED_PROVIDERS, Provider};
pub use redis::{RedisOptions, RedisStore, RedisTarget, redact_url};
pub use seal::SessionKey;
pub use sessions::{SessionQuery, SessionView};
pub use store::{MemoryStore, SessionStore, StoreError, StoreFuture};

use provider::ClientCreds;

/// Node-wide settings.
#[derive(Clone, Debug)]
pub struct OAuthSettings {
    /// The host of the one callback URL, normalised (`auth.<domain>`).
    pub auth_host: String,
    /// HTTPS port in the URLs the edge builds (omitted when 443).
    pub https_port: u16,
    /// Shortest auth check interval honoured; shorter non-zero intervals
    /// are raised to it (ngrok: 3 minutes).
    pub auth_check_floor: Duration,
    /// How long a login may take from redirect to callback (ngrok: 15
    /// minutes, `ERR_NGROK_3119`); also the life of the state record.
    pub login_timeout: Duration,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        OAuthSettings {
            auth_host: "auth.localhost".into(),
            https_port: 443,
            auth_check_floor: Duration::from_secs(180),
            login_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// The OAuth machinery of one node.
pub struct OAuthService {
    settings: OAuthSettings,
    store: Arc<dyn SessionStore>,
    key: SessionKey,
    http: IdpHttp,
}

impl std::fmt::Debug for OAuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthService")
            .field("auth_host", &self.settings.auth_host)
            .field("store", &self.store.kind())
            .finish()
    }
}

impl OAuthService {
    pub fn new(
        settings: OAuthSettings,
        store: Arc<dyn SessionStore>,
        key: SessionKey,
        http: IdpHttp,
    ) -> Arc<OAuthService> {
        Arc::new(OAuthService {
            settings,
            store,
            key,
            http,
        })
    }

    pub fn settings(&self) -> &OAuthSettings {
        &self.settings
    }

    /// The client for calls to identity providers (its trusted roots).
    pub fn http(&self) -> &IdpHttp {
        &self.http
    }

    /// Whether requests for `host` (normalised) go to the callback handler.
    pub fn is_auth_host(&self, host: &str) -> bool {
        host == self.settings.auth_host
    }

    /// `https://<host>[:port]`.
    fn origin(&self, host: &str) -> String {
        match self.settings.https_port {
            443 => format!("https://{host}"),
            port => format!("https://{host}:{port}"),
        }
    }

    /// The callback URL to register at every IdP.
    pub fn callback_url(&self) -> String {
        format!("{}/oauth2/callback", self.origin(&self.settings.auth_host))
    }

    /// Validates an agent's OAuth/OIDC options and prepares the endpoint;
    /// discovers OpenID providers (so it talks to the IdP).
    pub async fn endpoint(
        self: &Arc<Self>,
        options: &pb::OAuthOptions,
    ) -> Result<OAuthEndpoint, Failure> {
        let invalid = |detail: String| Failure::new(ErrorCode::OAUTH_INVALID_CONFIG, detail);
        let provider_name = options.provider.trim().to_ascii_lowercase();
        let issuer = options.issuer_url.trim();
        let oidc = provider_name == "oidc" || (provider_name.is_empty() && !issuer.is_empty());
        if provider_name.is_empty() && issuer.is_empty() {
            return Err(invalid(
                "oauth.provider: name a provider (google, github, …) or give an OIDC issuer_url"
                    .into(),
            ));
        }
        if !oidc && !issuer.is_empty() {
            return Err(invalid(format!(
                "oauth.issuer_url: only for OpenID Connect, not with provider {provider_name:?}"
            )));
        }
        if !oidc && !NAMED_PROVIDERS.contains(&provider_name.as_str()) {
            return Err(invalid(format!(
                "oauth.provider: {provider_name:?} is not one of {}",
                NAMED_PROVIDERS.join(", ")
            )));
        }
        let what = if oidc { "oidc" } else { "oauth" };
        if options.client_id.trim().is_empty() || options.client_secret.is_empty() {
            return Err(Failure::new(
                ErrorCode::OAUTH_CLIENT_REQUIRED,
                format!(
                    "{what}.client_id and {what}.client_secret: register an app at the provider with \
                     the callback URL {} and give its credentials",
                    self.callback_url()
                ),
            ));
        }
        let mut allow_emails = Vec::new();
        for email in &options.allow_emails {
            let email = email.trim().to_ascii_lowercase();
            if email.matches('@').count() != 1 || email.starts_with('@') || email.ends_with('@') {
                return Err(invalid(format!(
                    "{what}.allow_emails: {email:?} is not an email address"
                )));
            }
            allow_emails.push(email);
        }
        let mut allow_domains = Vec::new();
        for domain in &options.allow_domains {
            let domain = domain.trim().to_ascii_lowercase();
            if domain.is_empty()
                || domain.contains('@')
                || !domain.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "{what}.allow_domains: {domain:?} is not a domain"
                )));
            }
            allow_domains.push(domain);
        }
        for scope in &options.scopes {
            // RFC 6749 scope-token.
            if scope.is_empty()
                || !scope
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) && b != b'\\')
            {
                return Err(invalid(format!(
                    "{what}.scopes: {scope:?} is not a valid scope"
                )));
            }
        }
        let cookie_prefix = match options.cookie_prefix.as_str() {
            "" => "ngrok.".to_string(),
            prefix if paths::valid_cookie_prefix(prefix) => prefix.to_string(),
            prefix => {
                return Err(invalid(format!(
                    "{what}.cookie_prefix: {prefix:?} may only hold cookie-name characters"
                )));
            }
        };
        if oidc && issuer.is_empty() {
            return Err(invalid("oidc.issuer_url: required".into()));
        }
        let provider = if oidc {
            Provider::discover(issuer, &self.http).await.map_err(|e| {
                Failure::new(ErrorCode::OIDC_DISCOVERY_FAILED, format!("{issuer}: {e}"))
            })?
        } else {
            match Provider::named(&provider_name, &self.http).await {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    return Err(Failure::new(
                        ErrorCode::OIDC_DISCOVERY_FAILED,
                        format!("{provider_name}: {e}"),
                    ));
                }
                None => unreachable!("checked against NAMED_PROVIDERS"),
            }
        };
        let checked = Checked {
            oidc,
            allow_emails,
            allow_domains,
            cookie_prefix,
        };
        Ok(self.endpoint_with(options, provider, checked))
    }

    /// The endpoint for validated options and a ready provider.
    fn endpoint_with(
        self: &Arc<Self>,
        options: &pb::OAuthOptions,
        provider: Provider,
        checked: Checked,
    ) -> OAuthEndpoint {
        let Checked {
            oidc,
            allow_emails,
            allow_domains,
            cookie_prefix,
        } = checked;
        let issuer = options.issuer_url.trim();
        let mut scopes: Vec<String> = Vec::new();
        let base: &[&str] = if oidc && options.scopes.is_empty() {
            &["openid", "email", "profile"]
        } else {
            provider.base_scopes()
        };
        for scope in base
            .iter()
            .map(|s| s.to_string())
            .chain(options.scopes.iter().cloned())
        {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        let auth_check_interval = match secs(options.auth_check_interval_secs) {
            d if d.is_zero() => d,
            d => d.max(self.settings.auth_check_floor),
        };
        let client = ClientCreds {
            id: options.client_id.trim().to_string(),
            secret: Secret::new(options.client_secret.clone()),
        };
        let mut sorted_emails = allow_emails.clone();
        sorted_emails.sort();
        let mut sorted_domains = allow_domains.clone();
        sorted_domains.sort();
        let fingerprint = seal::key_hash(&format!(
            "{}|{issuer}|{}|{}|{}",
            provider.name(),
            client.id,
            sorted_emails.join(","),
            sorted_domains.join(",")
        ));
        OAuthEndpoint {
            service: self.clone(),
            provider,
            client,
            issuer: oidc.then(|| issuer.trim_end_matches('/').to_string()),
            scopes,
            allow_emails,
            allow_domains,
            auth_check_interval,
            inactivity_timeout: secs(options.inactivity_timeout_secs),
            maximum_duration: secs(options.maximum_duration_secs),
            options_passthrough: options.options_passthrough,
            cookie_prefix,
            fingerprint,
        }
    }
}

/// What validation of the options yields besides the provider.
struct Checked {
    oidc: bool,
    allow_emails: Vec<String>,
    allow_domains: Vec<String>,
    cookie_prefix: String,
}

/// OAuth on one endpoint.
pub struct OAuthEndpoint {
    service: Arc<OAuthService>,
    provider: Provider,
    client: ClientCreds,
    /// The OIDC issuer, checked against the callback's `iss` (RFC 9207).
    issuer: Option<String>,
    scopes: Vec<String>,
    /// Lower case.
    allow_emails: Vec<String>,
    allow_domains: Vec<String>,
    /// Zero: only at login.
    auth_check_interval: Duration,
    inactivity_timeout: Duration,
    maximum_duration: Duration,
    options_passthrough: bool,
    cookie_prefix: String,
    /// Changes when the provider, client or allow-lists change; sessions
    /// made under another configuration are checked again.
    fingerprint: String,
}

impl std::fmt::Debug for OAuthEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthEndpoint")
            .field("provider", &self.provider.name())
            .field("client_id", &self.client.id)
            .field("client_secret", &self.client.secret)
            .field("scopes", &self.scopes)
            .field("allow_emails", &self.allow_emails)
            .field("allow_domains", &self.allow_domains)
            .field("auth_check_interval", &self.auth_check_interval)
            .finish()
    }
}

impl OAuthEndpoint {
    /// The provider's name (`google`, …, `oidc`).
    pub fn provider(&self) -> &str {
        self.provider.name()
    }

    pub fn client_id(&self) -> &str {
        &self.client.id
    }

    /// The auth check interval in force (after the floor).
    pub fn auth_check_interval(&self) -> Duration {
        self.auth_check_interval
    }
}

#[cfg(test)]
mod tests;
