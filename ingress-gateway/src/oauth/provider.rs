//! Identity providers. Any OpenID Provider works through discovery (the
//! `openidconnect` crate verifies ID tokens: signature against the JWKS,
//! issuer, audience, expiry, nonce); the named providers are presets of
//! endpoints and scopes. GitHub, Amazon, Facebook and Microsoft are used as
//! plain OAuth 2.0 plus their user APIs (GitHub: `/user` and
//! `/user/emails`).

use std::{borrow::Cow, sync::RwLock};

use http::{Method, Request, StatusCode, header};
use openidconnect::{
    AccessToken, AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, Scope, SubjectIdentifier, UserInfoError,
    core::{
        CoreAuthPrompt, CoreClient, CoreGenderClaim, CoreJsonWebKeySet, CoreProviderMetadata,
        CoreResponseType, CoreTokenResponse,
    },
    url::{Url, form_urlencoded},
};
use postern_net::Secret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::idp_http::{IdpHttp, IdpHttpError};

/// Who the IdP says the user is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// Provider-defined id (`sub`, GitHub's numeric id, …).
    pub id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    /// `None` when the provider does not say.
    pub email_verified: Option<bool>,
}

/// The user's tokens, kept sealed in the session.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(********)")
    }
}

/// A completed login or back-channel refresh.
#[derive(Debug)]
pub struct Login {
    pub user: UserInfo,
    pub tokens: Tokens,
}

/// Why talking to the IdP failed.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// The IdP refused the code or token (`invalid_grant`, 401): the user
    /// has to log in again.
    #[error("the identity provider refused: {0}")]
    Rejected(String),
    /// The IdP could not be reached, timed out, or failed (5xx).
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The answer does not verify or lacks what is needed.
    #[error("the identity provider's answer is invalid: {0}")]
    Invalid(String),
}

/// The edge's app at the provider.
#[derive(Clone, Debug)]
pub struct ClientCreds {
    pub id: String,
    pub secret: Secret,
}

/// What goes into an authorization request.
#[derive(Debug)]
pub struct AuthorizeRequest<'a> {
    pub redirect_uri: &'a str,
    pub scopes: &'a [String],
    pub state: &'a str,
    /// OIDC `nonce`.
    pub nonce: &'a str,
    /// The PKCE verifier; the request carries its S256 challenge.
    pub pkce_verifier: &'a str,
    /// Ask the IdP to make the user enter credentials again.
    pub force_login: bool,
}

/// A new PKCE verifier (its S256 challenge goes in the authorization
/// request, the verifier in the token request).
pub fn pkce_verifier() -> String {
    PkceCodeChallenge::new_random_sha256().1.secret().clone()
}

fn challenge(verifier: &str) -> PkceCodeChallenge {
    PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(verifier.to_string()))
}

/// How a plain OAuth 2.0 provider tells who the user is.
#[derive(Clone, Debug)]
pub(super) enum UserApi {
    /// `GET <base>/user` and `GET <base>/user/emails`.
    GitHub { base: Url },
    /// One JSON document with these fields.
    Json {
        url: Url,
        id: &'static str,
        name: &'static str,
        email: &'static str,
        email_verified: Option<&'static str>,
    },
}

enum Kind {
    Oidc {
        metadata: Box<RwLock<CoreProviderMetadata>>,
    },
    OAuth2(Box<OAuth2Api>),
}

/// A plain OAuth 2.0 provider's endpoints.
struct OAuth2Api {
    auth_url: Url,
    token_url: Url,
    user_api: UserApi,
}

/// An identity provider with its endpoints.
pub struct Provider {
    /// `google`, `github`, …, or `oidc`.
    name: String,
    kind: Kind,
    /// Scopes always asked for.
    base_scopes: &'static [&'static str],
    /// Extra authorization parameters (e.g. Google's `access_type=offline`
    /// so that a refresh token comes back).
    auth_params: &'static [(&'static str, &'static str)],
    /// How to ask for a fresh login, when the IdP supports it.
    force_login: Option<(&'static str, &'static str)>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .finish()
    }
}

/// The named providers ngrok supports.
pub const NAMED_PROVIDERS: &[&str] = &[
    "amazon",
    "facebook",
    "github",
    "gitlab",
    "google",
    "linkedin",
    "microsoft",
    "twitch",
];

const OIDC_SCOPES: &[&str] = &["openid", "email", "profile"];
const TWITCH_CLAIMS: &str = r#"{"id_token":{"email":null,"email_verified":null,"preferred_username":null},"userinfo":{"email":null,"email_verified":null,"preferred_username":null}}"#;

fn url(s: &str) -> Url {
    Url::parse(s).expect("preset URLs are valid")
}

fn idp_error(e: IdpHttpError) -> IdpError {
    IdpError::Unavailable(e.to_string())
}

impl Provider {
    /// A named provider; the OIDC ones are discovered, so this may fail
    /// with [`IdpError::Unavailable`]. `None` for an unknown name.
    pub async fn named(name: &str, http: &IdpHttp) -> Option<Result<Provider, IdpError>> {
        let oidc = |issuer: &'static str| Some(issuer);
        let (issuer, base_scopes, auth_params): (Option<&str>, &'static [&'static str], _) =
            match name {
                "google" => (
                    oidc("https://accounts.google.com"),
                    OIDC_SCOPES,
                    &[("access_type", "offline")][..],
                ),
                "gitlab" => (oidc("https://gitlab.com"), OIDC_SCOPES, &[][..]),
                "linkedin" => (oidc("https://www.linkedin.com/oauth"), OIDC_SCOPES, &[][..]),
                "twitch" => (
                    oidc("https://id.twitch.tv/oauth2"),
                    &["openid", "user:read:email"][..],
                    &[("claims", TWITCH_CLAIMS)][..],
                ),
                _ => (None, &[][..], &[][..]),
            };
        if let Some(issuer) = issuer {
            return Some(Self::discover(issuer, http).await.map(|mut p| {
                p.name = name.to_string();
                p.base_scopes = base_scopes;
                p.auth_params = auth_params;
                p
            }));
        }
        let provider = match name {
            "github" => Self::oauth2(
                "github",
                url("https://github.com/login/oauth/authorize"),
                url("https://github.com/login/oauth/access_token"),
                UserApi::GitHub {
                    base: url("https://api.github.com"),
                },
                &["read:user", "user:email"],
                Some(("prompt", "select_account")),
            ),
            "microsoft" => Self::oauth2(
                "microsoft",
                url("https://login.microsoftonline.com/common/oauth2/v2.0/authorize"),
                url("https://login.microsoftonline.com/common/oauth2/v2.0/token"),
                UserApi::Json {
                    url: url("https://graph.microsoft.com/oidc/userinfo"),
                    id: "sub",
                    name: "name",
                    email: "email",
                    email_verified: None,
                },
                &["openid", "email", "profile", "offline_access"],
                Some(("prompt", "login")),
            ),
            "amazon" => Self::oauth2(
                "amazon",
                url("https://www.amazon.com/ap/oa"),
                url("https://api.amazon.com/auth/o2/token"),
                UserApi::Json {
                    url: url("https://api.amazon.com/user/profile"),
                    id: "user_id",
                    name: "name",
                    email: "email",
                    email_verified: None,
                },
                &["profile"],
                None,
            ),
            "facebook" => Self::oauth2(
                "facebook",
                url("https://www.facebook.com/v19.0/dialog/oauth"),
                url("https://graph.facebook.com/v19.0/oauth/access_token"),
                UserApi::Json {
                    url: url("https://graph.facebook.com/v19.0/me?fields=id,name,email"),
                    id: "id",
                    name: "name",
                    email: "email",
                    email_verified: None,
                },
                &["email", "public_profile"],
                Some(("auth_type", "reauthenticate")),
            ),
            _ => return None,
        };
        Some(Ok(provider))
    }

    pub(super) fn oauth2(
        name: &str,
        auth_url: Url,
        token_url: Url,
        user_api: UserApi,
        base_scopes: &'static [&'static str],
        force_login: Option<(&'static str, &'static str)>,
    ) -> Provider {
        Provider {
            name: name.to_string(),
            kind: Kind::OAuth2(Box::new(OAuth2Api {
                auth_url,
                token_url,
                user_api,
            })),
            base_scopes,
            auth_params: &[],
            force_login,
        }
    }

    /// Any OpenID Provider, from `<issuer>/.well-known/openid-configuration`
    /// (and its JWKS).
    pub async fn discover(issuer: &str, http: &IdpHttp) -> Result<Provider, IdpError> {
        let issuer_url = IssuerUrl::new(issuer.to_string())
            .map_err(|e| IdpError::Invalid(format!("issuer URL {issuer:?}: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer_url, http)
            .await
            .map_err(|e| {
                let mut detail = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    detail.push_str(&format!(": {s}"));
                    source = s.source();
                }
                IdpError::Unavailable(detail)
            })?;
        Ok(Provider {
            name: "oidc".to_string(),
            kind: Kind::Oidc {
                metadata: Box::new(RwLock::new(metadata)),
            },
            base_scopes: &["openid"],
            auth_params: &[],
            force_login: Some(("prompt", "login")),
        })
    }

    /// `google`, `github`, …, or `oidc`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Scopes always requested, before the endpoint's own.
    pub fn base_scopes(&self) -> &'static [&'static str] {
        self.base_scopes
    }

    fn metadata(&self) -> Result<CoreProviderMetadata, IdpError> {
        match &self.kind {
            Kind::Oidc { metadata } => Ok(metadata.read().expect("metadata lock").clone()),
            Kind::OAuth2(_) => Err(IdpError::Invalid("not an OpenID provider".into())),
        }
    }

    /// The URL to send the browser to.
    pub fn authorize_url(
        &self,
        client: &ClientCreds,
        req: &AuthorizeRequest<'_>,
    ) -> Result<String, IdpError> {
        match &self.kind {
            Kind::Oidc { .. } => {
                let metadata = self.metadata()?;
                let redirect = redirect_url(req.redirect_uri)?;
                let oidc = core_client(metadata, client).set_redirect_uri(redirect);
                let (state, nonce) = (req.state.to_string(), req.nonce.to_string());
                let mut auth = oidc
                    .authorize_url(
                        AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                        move || CsrfToken::new(state),
                        move || Nonce::new(nonce),
                    )
                    .set_pkce_challenge(challenge(req.pkce_verifier));
                for scope in req.scopes {
                    auth = auth.add_scope(Scope::new(scope.clone()));
                }
                for (k, v) in self.auth_params {
                    auth = auth.add_extra_param(*k, *v);
                }
                if req.force_login {
                    auth = auth.add_prompt(CoreAuthPrompt::Login);
                }
                let (url, _, _) = auth.url();
                Ok(url.to_string())
            }
            Kind::OAuth2(api) => {
                let mut url = api.auth_url.clone();
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("response_type", "code")
                        .append_pair("client_id", &client.id)
                        .append_pair("redirect_uri", req.redirect_uri)
                        .append_pair("scope", &req.scopes.join(" "))
                        .append_pair("state", req.state)
                        .append_pair("code_challenge", challenge(req.pkce_verifier).as_str())
                        .append_pair("code_challenge_method", "S256");
                    for (k, v) in self.auth_params {
                        q.append_pair(k, v);
                    }
                    if req.force_login
                        && let Some((k, v)) = self.force_login
                    {
                        q.append_pair(k, v);
                    }
                }
                Ok(url.to_string())
            }
        }
    }

    /// Exchanges the authorization code and learns who the user is.
    pub async fn exchange(
        &self,
        http: &IdpHttp,
        client: &ClientCreds,
        code: &str,
        redirect_uri: &str,
        pkce_verifier: &str,
        nonce: &str,
    ) -> Result<Login, IdpError> {
        match &self.kind {
            Kind::Oidc { .. } => {
                let metadata = self.metadata()?;
                let redirect = redirect_url(redirect_uri)?;
                let oidc = core_client(metadata, client);
                let response = oidc
                    .exchange_code(AuthorizationCode::new(code.to_string()))
                    .map_err(|e| IdpError::Invalid(e.to_string()))?
                    .set_redirect_uri(Cow::Owned(redirect))
                    .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_string()))
                    .request_async(http)
                    .await
                    .map_err(token_error)?;
                let nonce = Nonce::new(nonce.to_string());
                let from_token = self
                    .verify_id_token(http, client, &response, Some(&nonce))
                    .await?
                    .ok_or_else(|| IdpError::Invalid("no ID token in the token response".into()))?;
                self.oidc_login(http, client, response, from_token).await
            }
            Kind::OAuth2(api) => {
                let OAuth2Api {
                    token_url,
                    user_api,
                    ..
                } = api.as_ref();
                let tokens = oauth2_token(
                    http,
                    token_url,
                    client,
                    &[
                        ("grant_type", "authorization_code"),
                        ("code", code),
                        ("redirect_uri", redirect_uri),
                        ("code_verifier", pkce_verifier),
                    ],
                )
                .await?;
                let user = user_api.fetch(http, &tokens.access).await?;
                Ok(Login { user, tokens })
            }
        }
    }

    /// The back-channel refresh of continuous authorization: a refresh
    /// token grant when there is a refresh token, then the user's data from
    /// the provider. The user id must stay the same.
    pub async fn refresh(
        &self,
        http: &IdpHttp,
        client: &ClientCreds,
        tokens: &Tokens,
        user_id: &str,
    ) -> Result<Login, IdpError> {
        let login = match &self.kind {
            Kind::Oidc { .. } => {
                let oidc = core_client(self.metadata()?, client);
                match &tokens.refresh {
                    Some(refresh) => {
                        let response = oidc
                            .exchange_refresh_token(&RefreshToken::new(refresh.clone()))
                            .map_err(|e| IdpError::Invalid(e.to_string()))?
                            .request_async(http)
                            .await
                            .map_err(token_error)?;
                        let from_token =
                            self.verify_id_token(http, client, &response, None).await?;
                        let mut login = self
                            .oidc_login(http, client, response, from_token.unwrap_or_default())
                            .await?;
                        if login.tokens.refresh.is_none() {
                            login.tokens.refresh = Some(refresh.clone());
                        }
                        login
                    }
                    None => {
                        let user = oidc_userinfo(&oidc, http, &tokens.access, user_id)
                            .await?
                            .ok_or_else(|| {
                                IdpError::Rejected(
                                    "no refresh token and no userinfo endpoint to check with"
                                        .into(),
                                )
                            })?;
                        Login {
                            user,
                            tokens: tokens.clone(),
                        }
                    }
                }
            }
            Kind::OAuth2(api) => {
                let OAuth2Api {
                    token_url,
                    user_api,
                    ..
                } = api.as_ref();
                let tokens = match &tokens.refresh {
                    Some(refresh) => {
                        let mut fresh = oauth2_token(
                            http,
                            token_url,
                            client,
                            &[("grant_type", "refresh_token"), ("refresh_token", refresh)],
                        )
                        .await?;
                        fresh.refresh.get_or_insert_with(|| refresh.clone());
                        fresh
                    }
                    None => tokens.clone(),
                };
                let user = user_api.fetch(http, &tokens.access).await?;
                Login { user, tokens }
            }
        };
        if login.user.id != user_id {
            return Err(IdpError::Invalid(format!(
                "the provider now names user {:?} instead of {user_id:?}",
                login.user.id
            )));
        }
        Ok(login)
    }

    /// The ID token's claims, verified; the JWKS is fetched again once if
    /// the signing key is unknown (key rotation).
    async fn verify_id_token(
        &self,
        http: &IdpHttp,
        client: &ClientCreds,
        response: &CoreTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<Option<UserInfo>, IdpError> {
        let Some(id_token) = response.extra_fields().id_token() else {
            return Ok(None);
        };
        let Kind::Oidc { metadata } = &self.kind else {
            return Ok(None);
        };
        for attempt in 0..2 {
            let current = metadata.read().expect("metadata lock").clone();
            let jwks_uri = current.jwks_uri().clone();
            let oidc = core_client(current, client);
            let verifier = oidc.id_token_verifier();
            let verified = match nonce {
                Some(nonce) => id_token.claims(&verifier, nonce),
                None => id_token.claims(&verifier, |_: Option<&Nonce>| Ok(())),
            };
            match verified {
                Ok(claims) => {
                    return Ok(Some(standard_user(
                        claims.subject(),
                        claims
                            .name()
                            .and_then(|n| n.get(None))
                            .map(|n| n.to_string()),
                        claims.preferred_username().map(|u| u.to_string()),
                        claims.email().map(|e| e.to_string()),
                        claims.email_verified(),
                    )));
                }
                Err(openidconnect::ClaimsVerificationError::SignatureVerification(
                    openidconnect::SignatureVerificationError::NoMatchingKey,
                )) if attempt == 0 => {
                    let jwks = CoreJsonWebKeySet::fetch_async(&jwks_uri, http)
                        .await
                        .map_err(|e| IdpError::Unavailable(format!("fetching the JWKS: {e}")))?;
                    let mut guard = metadata.write().expect("metadata lock");
                    let updated = guard.clone().set_jwks(jwks);
                    *guard = updated;
                }
                Err(e) => return Err(IdpError::Invalid(format!("ID token: {e}"))),
            }
        }
        Err(IdpError::Invalid(
            "ID token: no matching signing key".into(),
        ))
    }

    /// Tokens from a token response, and the user from the ID token
    /// completed (or replaced) by the userinfo endpoint.
    async fn oidc_login(
        &self,
        http: &IdpHttp,
        client: &ClientCreds,
        response: CoreTokenResponse,
        from_token: UserInfo,
    ) -> Result<Login, IdpError> {
        let tokens = Tokens {
            access: response.access_token().secret().clone(),
            refresh: response.refresh_token().map(|r| r.secret().clone()),
        };
        let oidc = core_client(self.metadata()?, client);
        let expected = (!from_token.id.is_empty()).then_some(from_token.id.as_str());
        let user = match expected {
            Some(id) => match oidc_userinfo(&oidc, http, &tokens.access, id).await? {
                Some(info) => merge_user(from_token, info),
                None => from_token,
            },
            None => oidc_userinfo(&oidc, http, &tokens.access, "")
                .await?
                .ok_or_else(|| IdpError::Invalid("no ID token and no userinfo endpoint".into()))?,
        };
        Ok(Login { user, tokens })
    }
}

type OidcClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

fn redirect_url(uri: &str) -> Result<RedirectUrl, IdpError> {
    RedirectUrl::new(uri.to_string()).map_err(|e| IdpError::Invalid(format!("redirect URI: {e}")))
}

fn core_client(metadata: CoreProviderMetadata, client: &ClientCreds) -> OidcClient {
    CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(client.id.clone()),
        Some(ClientSecret::new(client.secret.expose().to_string())),
    )
}

/// Userinfo, checked to be about `subject` (when not empty); `None` when
/// the provider has no userinfo endpoint.
async fn oidc_userinfo(
    oidc: &OidcClient,
    http: &IdpHttp,
    access: &str,
    subject: &str,
) -> Result<Option<UserInfo>, IdpError> {
    let expected = (!subject.is_empty()).then(|| SubjectIdentifier::new(subject.to_string()));
    let Ok(request) = oidc.user_info(AccessToken::new(access.to_string()), expected) else {
        return Ok(None);
    };
    let claims: openidconnect::UserInfoClaims<
        openidconnect::EmptyAdditionalClaims,
        CoreGenderClaim,
    > = request.request_async(http).await.map_err(|e| match e {
        UserInfoError::Response(status, _, detail)
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
        {
            IdpError::Rejected(format!("userinfo {status}: {detail}"))
        }
        UserInfoError::Response(status, _, detail) => {
            IdpError::Unavailable(format!("userinfo {status}: {detail}"))
        }
        UserInfoError::Request(e) => idp_error(e),
        other => IdpError::Invalid(format!("userinfo: {other}")),
    })?;
    Ok(Some(standard_user(
        claims.subject(),
        claims
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.to_string()),
        claims.preferred_username().map(|u| u.to_string()),
        claims.email().map(|e| e.to_string()),
        claims.email_verified(),
    )))
}

fn standard_user(
    subject: &SubjectIdentifier,
    name: Option<String>,
    preferred_username: Option<String>,
    email: Option<String>,
    email_verified: Option<bool>,
) -> UserInfo {
    UserInfo {
        id: subject.to_string(),
        name: name.or(preferred_username),
        email,
        email_verified,
    }
}

/// Userinfo is fresher than the ID token; the ID token fills its gaps.
fn merge_user(token: UserInfo, info: UserInfo) -> UserInfo {
    let email_from_info = info.email.is_some();
    UserInfo {
        id: token.id,
        name: info.name.or(token.name),
        email: info.email.or(token.email),
        email_verified: if email_from_info {
            info.email_verified
        } else {
            token.email_verified
        },
    }
}

fn token_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<
        RE,
        openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    >,
) -> IdpError {
    match e {
        RequestTokenError::ServerResponse(r) => IdpError::Rejected(r.to_string()),
        RequestTokenError::Request(e) => {
            let mut detail = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                detail.push_str(&format!(": {s}"));
                source = s.source();
            }
            IdpError::Unavailable(detail)
        }
        RequestTokenError::Parse(e, _) => IdpError::Invalid(format!("token response: {e}")),
        RequestTokenError::Other(e) => IdpError::Unavailable(e),
    }
}

/// A token request to a plain OAuth 2.0 provider (client credentials in
/// the body, as GitHub and Facebook expect).
async fn oauth2_token(
    http: &IdpHttp,
    token_url: &Url,
    client: &ClientCreds,
    params: &[(&str, &str)],
) -> Result<Tokens, IdpError> {
    let form = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            form.append_pair(k, v);
        }
        form.append_pair("client_id", &client.id)
            .append_pair("client_secret", client.secret.expose())
            .finish()
    };
    let request = Request::builder()
        .method(Method::POST)
        .uri(token_url.as_str())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(form.into_bytes())
        .map_err(|e| IdpError::Invalid(e.to_string()))?;
    let response = http.send(request).await.map_err(idp_error)?;
    let status = response.status();
    let body: Value = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    if let Some(error) = body.get("error") {
        let error = error
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Err(IdpError::Rejected(error));
    }
    if status.is_server_error() {
        return Err(IdpError::Unavailable(format!(
            "token endpoint answered {status}"
        )));
    }
    if !status.is_success() {
        return Err(IdpError::Rejected(format!(
            "token endpoint answered {status}"
        )));
    }
    let access = body
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or_else(|| IdpError::Invalid("no access_token in the token response".into()))?;
    Ok(Tokens {
        access: access.to_string(),
        refresh: body
            .get("refresh_token")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

async fn get_json(http: &IdpHttp, url: &Url, access: &str) -> Result<Value, IdpError> {
    let request = Request::builder()
        .uri(url.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {access}"))
        .header(header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| IdpError::Invalid(e.to_string()))?;
    let response = http.send(request).await.map_err(idp_error)?;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(IdpError::Rejected(format!("{url} answered {status}")));
    }
    if !status.is_success() {
        return Err(IdpError::Unavailable(format!("{url} answered {status}")));
    }
    serde_json::from_slice(response.body())
        .map_err(|e| IdpError::Invalid(format!("{url}: not JSON: {e}")))
}

fn text(value: &Value, field: &str) -> Option<String> {
    match value.get(field)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl UserApi {
    async fn fetch(&self, http: &IdpHttp, access: &str) -> Result<UserInfo, IdpError> {
        match self {
            UserApi::GitHub { base } => {
                let join = |path: &str| {
                    base.join(path)
                        .map_err(|e| IdpError::Invalid(format!("GitHub API URL: {e}")))
                };
                let user = get_json(http, &join("user")?, access).await?;
                let emails = get_json(http, &join("user/emails")?, access).await?;
                let primary = emails.as_array().and_then(|all| {
                    all.iter()
                        .find(|e| e.get("primary").and_then(Value::as_bool) == Some(true))
                });
                Ok(UserInfo {
                    id: text(&user, "id")
                        .ok_or_else(|| IdpError::Invalid("GitHub /user has no id".into()))?,
                    name: text(&user, "name").or_else(|| text(&user, "login")),
                    email: primary.and_then(|e| text(e, "email")),
                    email_verified: primary.and_then(|e| e.get("verified")?.as_bool()),
                })
            }
            UserApi::Json {
                url,
                id,
                name,
                email,
                email_verified,
            } => {
                let doc = get_json(http, url, access).await?;
                Ok(UserInfo {
                    id: text(&doc, id)
                        .ok_or_else(|| IdpError::Invalid(format!("{url} has no {id}")))?,
                    name: text(&doc, name),
                    email: text(&doc, email),
                    email_verified: email_verified.and_then(|f| doc.get(f)?.as_bool()),
                })
            }
        }
    }
}
