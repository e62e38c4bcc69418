//! `jwt-validation`: every token the config lists (a header, with an
//! optional prefix such as `Bearer `) must be a JWT signed with one of the
//! `allowed_algorithms` by a key of the issuer's JWKS (fetched from
//! `jws.keys.sources.additional_jkus`, kept 15 minutes, fetched again at
//! most once a minute when a token names an unknown `kid`), with an
//! allowed `iss` and `aud`, and within its validity times. Otherwise the
//! visitor gets `401` with `WWW-Authenticate: Bearer error="invalid_token"`
//! (unless `enforce` is false). The claims of the tokens go to
//! `actions.ngrok.jwt_validation.tokens`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;

use super::{Built, config};
use crate::{
    oauth::IdpHttp,
    policy::{
        Flow, Phase, PolicyEnv, RequestAction, RequestCx,
        cel::{Template, from_json, map_value},
    },
};

/// How long a fetched key set is used.
const KEYS_TTL: Duration = Duration::from_secs(15 * 60);
/// How often an unknown `kid` may make the keys be fetched again.
const REFETCH_AT_MOST: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    issuer: AllowList,
    #[serde(default)]
    audience: Option<AllowList>,
    http: HttpConfig,
    jws: JwsConfig,
    #[serde(default = "yes")]
    enforce: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowList {
    allow_list: Vec<Allowed>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Allowed {
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpConfig {
    tokens: Vec<TokenConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenConfig {
    #[serde(rename = "type", default = "jwt")]
    kind: String,
    #[serde(default = "header")]
    method: String,
    name: String,
    #[serde(default)]
    prefix: String,
}

fn jwt() -> String {
    "jwt".into()
}

fn header() -> String {
    "header".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwsConfig {
    allowed_algorithms: Vec<String>,
    keys: KeysConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysConfig {
    sources: SourcesConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesConfig {
    additional_jkus: Vec<String>,
}

struct Token {
    header: http::HeaderName,
    prefix: String,
}

/// The keys of the JWKS URLs, fetched on demand.
struct Keys {
    urls: Vec<Template>,
    http: IdpHttp,
    /// (fetched at, keys); the async lock lets one request fetch while the
    /// others wait for it.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<JwkSet>)>>,
}

impl Keys {
    async fn get(&self, refresh: bool) -> Result<Arc<JwkSet>, String> {
        let mut cache = self.cache.lock().await;
        if let Some((at, keys)) = cache.as_ref() {
            let stale = at.elapsed() > KEYS_TTL;
            let may_refetch = refresh && at.elapsed() > REFETCH_AT_MOST;
            if !stale && !may_refetch {
                return Ok(keys.clone());
            }
        }
        let mut all = JwkSet { keys: Vec::new() };
        for url in &self.urls {
            let url = url
                .fixed()
                .ok_or("JWKS URLs with ${} are not supported by Postern")?;
            let request = http::Request::get(&url)
                .header(http::header::ACCEPT, "application/json")
                .body(Vec::new())
                .map_err(|e| format!("{url}: {e}"))?;
            let response = self.http.send(request).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("{url}: answered {}", response.status()));
            }
            let set: JwkSet = serde_json::from_slice(response.body())
                .map_err(|e| format!("{url}: not a JWK set: {e}"))?;
            all.keys.extend(set.keys);
        }
        let keys = Arc::new(all);
        *cache = Some((Instant::now(), keys.clone()));
        Ok(keys)
    }
}

struct JwtValidation {
    tokens: Vec<Token>,
    validation: Validation,
    keys: Keys,
    enforce: bool,
}

fn algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err("config.jws.allowed_algorithms: none is never allowed".into());
    }
    name.parse::<Algorithm>()
        .map_err(|_| format!("config.jws.allowed_algorithms: unknown algorithm {name:?}"))
}

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    env: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    if cfg.issuer.allow_list.is_empty() {
        return Err("config.issuer.allow_list: at least one issuer".into());
    }
    if cfg.http.tokens.is_empty() {
        return Err("config.http.tokens: at least one token".into());
    }
    let tokens = cfg
        .http
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.method != "header" {
                return Err(format!(
                    "config.http.tokens[{i}].method: {:?}; Postern reads tokens from headers only",
                    t.method
                ));
            }
            if ![
                "jwt",
                "access_token",
                "id_token",
                "at+jwt",
                "it+jwt",
                "plain",
            ]
            .contains(&t.kind.as_str())
            {
                return Err(format!(
                    "config.http.tokens[{i}].type: unknown type {:?}",
                    t.kind
                ));
            }
            Ok(Token {
                header: http::HeaderName::from_bytes(t.name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("config.http.tokens[{i}].name: not a header name"))?,
                prefix: t.prefix.clone(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let algorithms = cfg
        .jws
        .allowed_algorithms
        .iter()
        .map(|a| algorithm(a))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = algorithms.first() else {
        return Err("config.jws.allowed_algorithms: at least one algorithm".into());
    };
    let mut validation = Validation::new(*first);
    validation.algorithms = algorithms.clone();
    validation.set_issuer(
        &cfg.issuer
            .allow_list
            .iter()
            .map(|a| a.value.as_str())
            .collect::<Vec<_>>(),
    );
    match &cfg.audience {
        Some(audience) if !audience.allow_list.is_empty() => {
            validation.set_audience(
                &audience
                    .allow_list
                    .iter()
                    .map(|a| a.value.as_str())
                    .collect::<Vec<_>>(),
            );
        }
        _ => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&["exp", "iss"]);
    if cfg.jws.keys.sources.additional_jkus.is_empty() {
        return Err("config.jws.keys.sources.additional_jkus: at least one JWKS URL".into());
    }
    let urls = cfg
        .jws
        .keys
        .sources
        .additional_jkus
        .iter()
        .map(|u| Template::compile(u, phase))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Built::Request(Box::new(JwtValidation {
        tokens,
        validation,
        keys: Keys {
            urls,
            http: env.http_client.clone(),
            cache: tokio::sync::Mutex::new(None),
        },
        enforce: cfg.enforce,
    })))
}

impl JwtValidation {
    /// The claims of a token, checked.
    async fn check(&self, token: &str) -> Result<serde_json::Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(format!("the algorithm {:?} is not allowed", header.alg));
        }
        let mut keys = self.keys.get(false).await?;
        let find = |keys: &JwkSet| match &header.kid {
            Some(kid) => keys.find(kid).cloned(),
            None => keys.keys.first().cloned(),
        };
        let jwk = match find(&keys) {
            Some(jwk) => jwk,
            None => {
                keys = self.keys.get(true).await?;
                find(&keys).ok_or("no key of the JWKS matches the token's kid")?
            }
        };
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|e| format!("the JWKS key is unusable: {e}"))?;
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| format!("the token is not valid: {e}"))
    }
}

impl RequestAction for JwtValidation {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let mut claims = Vec::new();
            let mut failure = None;
            for token in &self.tokens {
                let value = cx
                    .req
                    .headers()
                    .get(&token.header)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix(token.prefix.as_str()));
                let Some(value) = value else {
                    failure = Some(format!("no token in {}", token.header));
                    break;
                };
                match self.check(value.trim()).await {
                    Ok(c) => claims.push(from_json(&c)),
                    Err(reason) => {
                        failure = Some(reason);
                        break;
                    }
                }
            }
            cx.scratch.actions.insert(
                "jwt_validation",
                map_value([("tokens", cel::Value::List(Arc::new(claims)))]),
            );
            match failure {
                Some(reason) if self.enforce => {
                    tracing::debug!(%reason, "JWT refused");
                    let mut page =
                        crate::http::error_response(&Failure::new(ErrorCode::JWT_INVALID, reason));
                    page.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
                    Ok(Flow::Respond(page))
                }
                _ => Ok(Flow::Next),
            }
        })
    }
}
