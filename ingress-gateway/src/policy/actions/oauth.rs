//! `oauth` and `openid-connect`: log visitors in at the edge with a named
//! provider or any OpenID Provider, as the `oauth`/`oidc` modules do (same
//! sessions in the edge's store, same `/ngrok/*` paths, same headers). The
//! signed-in user is `actions.ngrok.oauth.identity.{id,name,email}`, for
//! rules after it to allow or refuse (ngrok's actions have no allow lists).
//! The provider is set up on the first request (for OpenID Connect that
//! is discovery); a config the provider cannot serve answers that request
//! and the next ones with the OAuth error until it can.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use postern_proto::{ErrorCode, Failure, pb};
use serde::Deserialize;

use super::{Built, config, duration};
use crate::{
    oauth::{Gate, NAMED_PROVIDERS, OAuthEndpoint, OAuthService},
    policy::{Flow, Phase, PolicyEnv, RequestAction, RequestCx, cel::map_value},
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    issuer_url: Option<String>,
    client_id: String,
    client_secret: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    max_session_duration: Option<String>,
    #[serde(default, alias = "idle_session_duration")]
    idle_session_timeout: Option<String>,
    #[serde(default)]
    userinfo_refresh_interval: Option<String>,
    #[serde(default)]
    allow_cors_preflight: bool,
    #[serde(default)]
    auth_id: Option<String>,
    #[serde(default)]
    authz_url_params: Option<serde_json::Value>,
    #[serde(default)]
    auth_cookie_domain: Option<String>,
}

struct OAuthAction {
    options: pb::OAuthOptions,
    service: Arc<OAuthService>,
    endpoint: tokio::sync::OnceCell<Arc<OAuthEndpoint>>,
}

fn seconds(key: &str, text: Option<&str>) -> Result<u32, String> {
    let d = duration(key, text, std::time::Duration::ZERO)?;
    u32::try_from(d.as_secs()).map_err(|_| format!("config.{key}: too long"))
}

fn options(cfg: Config, oidc: bool) -> Result<pb::OAuthOptions, String> {
    for (key, set) in [
        ("auth_id", cfg.auth_id.is_some()),
        ("authz_url_params", cfg.authz_url_params.is_some()),
        ("auth_cookie_domain", cfg.auth_cookie_domain.is_some()),
    ] {
        if set {
            return Err(format!("config.{key}: not supported by Postern"));
        }
    }
    let provider = if oidc {
        if cfg.provider.is_some() {
            return Err("config.provider: openid-connect takes issuer_url, not provider".into());
        }
        if cfg.issuer_url.as_deref().is_none_or(str::is_empty) {
            return Err("config.issuer_url: required".into());
        }
        "oidc".to_string()
    } else {
        if cfg.issuer_url.is_some() {
            return Err("config.issuer_url: only for openid-connect".into());
        }
        let provider = cfg
            .provider
            .clone()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !NAMED_PROVIDERS.contains(&provider.as_str()) {
            return Err(format!(
                "config.provider: {provider:?} is not one of {}",
                NAMED_PROVIDERS.join(", ")
            ));
        }
        provider
    };
    if cfg.client_id.trim().is_empty() || cfg.client_secret.is_empty() {
        return Err("config.client_id and config.client_secret: the app registered at the provider (Postern has no managed apps)".into());
    }
    Ok(pb::OAuthOptions {
        provider,
        issuer_url: cfg.issuer_url.clone().unwrap_or_default(),
        client_id: cfg.client_id,
        client_secret: cfg.client_secret,
        scopes: cfg.scopes,
        auth_check_interval_secs: seconds(
            "userinfo_refresh_interval",
            cfg.userinfo_refresh_interval.as_deref(),
        )?,
        inactivity_timeout_secs: seconds(
            "idle_session_timeout",
            cfg.idle_session_timeout.as_deref(),
        )?,
        maximum_duration_secs: seconds(
            "max_session_duration",
            cfg.max_session_duration.as_deref(),
        )?,
        options_passthrough: cfg.allow_cors_preflight,
        ..Default::default()
    })
}

fn build(value: &serde_json::Value, env: &PolicyEnv, oidc: bool) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    let Some(service) = env.oauth.clone() else {
        return Err("this edge has no OAuth set up ([oauth] in its config)".into());
    };
    Ok(Built::Request(Box::new(OAuthAction {
        options: options(cfg, oidc)?,
        service,
        endpoint: tokio::sync::OnceCell::new(),
    })))
}

pub(super) fn oauth(value: &serde_json::Value, _: Phase, env: &PolicyEnv) -> Result<Built, String> {
    build(value, env, false)
}

pub(super) fn openid_connect(
    value: &serde_json::Value,
    _: Phase,
    env: &PolicyEnv,
) -> Result<Built, String> {
    build(value, env, true)
}

impl RequestAction for OAuthAction {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let endpoint = self
                .endpoint
                .get_or_try_init(|| async {
                    self.service.endpoint(&self.options).await.map(Arc::new)
                })
                .await;
            let endpoint = match endpoint {
                Ok(endpoint) => endpoint.clone(),
                Err(failure) => {
                    tracing::warn!(error = %failure, "the traffic policy's OAuth provider is not usable");
                    let failure =
                        Failure::new(ErrorCode::OAUTH_IDP_UNAVAILABLE, failure.to_string());
                    return Ok(Flow::Respond(crate::http::error_response(&failure)));
                }
            };
            let tls = cx.conn.tls.is_some();
            match endpoint.gate(cx.req, tls, cx.host, cx.record).await {
                Gate::Respond(response) => Ok(Flow::Respond(response)),
                Gate::Forward(headers) => {
                    let get = |name: &str| {
                        headers
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, v)| cel::Value::from(v.as_str()))
                            .unwrap_or(cel::Value::Null)
                    };
                    cx.scratch.actions.insert(
                        "oauth",
                        map_value([(
                            "identity",
                            map_value([
                                ("id", get("ngrok-auth-user-id")),
                                ("name", get("ngrok-auth-user-name")),
                                ("email", get("ngrok-auth-user-email")),
                            ]),
                        )]),
                    );
                    crate::policy::modules::insert_headers(cx, headers);
                    Ok(Flow::Next)
                }
            }
        })
    }
}
