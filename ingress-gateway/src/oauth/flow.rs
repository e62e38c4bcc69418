//! The module's work on each request to an OAuth endpoint: the special
//! paths, the session check with its timeouts and continuous
//! authorization, starting and finishing logins, and what the upstream is
//! told about the user.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use postern_events::{Decision, OAuthUser};
use postern_proto::ErrorCode;

use super::{
    OAuthEndpoint,
    pages::{error_page, logged_out, redirect, with_cookies},
    paths::{
        AuthPath, auth_path, cookie_values, query_param, safe_return_path, set_cookie,
        strip_cookies,
    },
    provider::{AuthorizeRequest, IdpError, Tokens, UserInfo, pkce_verifier},
    seal::{self, key_hash},
    sessions::{
        CHECK_LOCK, Handoff, LoginState, SESSION_CAP, SessionRecord, check_lock, handoff_key,
        now_ms, state_key,
    },
    store::StoreError,
};
use crate::{http::ProxyBody, outcome::HttpRecord};

/// What the module decided about a request.
pub enum Gate {
    /// The module answers the visitor itself.
    Respond(Response<ProxyBody>),
    /// Forward it, adding these identity headers (client-sent `ngrok-*`
    /// headers are stripped first by the proxy).
    Forward(Vec<(&'static str, String)>),
}

/// Largest identity header value (names, emails); tokens may be longer.
const MAX_HEADER: usize = 1024;
const MAX_TOKEN_HEADER: usize = 16 * 1024;
/// Session cookies looked at per request (a sibling domain may plant more).
const MAX_SESSION_COOKIES: usize = 4;
/// Past this many pending nonce cookies, starting a login clears them.
const MAX_NONCE_COOKIES: usize = 4;

/// Percent-encodes what a header cannot carry (and `%`); `None` past `max`.
fn header_safe(value: &str, max: usize) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    (out.len() <= max).then_some(out)
}

/// An email address fit to authorise with and to pass upstream: exactly
/// one `@` with text on both sides, printable, and not marked unverified.
fn usable_email(user: &UserInfo) -> Option<&str> {
    let email = user.email.as_deref()?;
    let (local, domain) = email.split_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && email.bytes().all(|b| b.is_ascii_graphic())
        && user.email_verified != Some(false);
    ok.then_some(email)
}

/// Why a request has no usable session.
enum NoSession {
    /// No session cookie.
    Absent,
    /// A cookie that names no live session here (expired, revoked,
    /// tampered, another endpoint's).
    Stale,
}

impl OAuthEndpoint {
    fn session_cookie(&self) -> String {
        format!("{}session", self.cookie_prefix)
    }

    fn nonce_cookie(&self, attempt: &str) -> String {
        format!("{}nonce.{attempt}", self.cookie_prefix)
    }

    fn clear_session_cookie(&self) -> HeaderValue {
        set_cookie(&self.session_cookie(), "", Some(0))
    }

    /// Decides what happens to a request; `host` is the normalised Host and
    /// `tls` whether it came over HTTPS.
    pub async fn gate<B>(
        &self,
        req: &mut Request<B>,
        tls: bool,
        host: &str,
        record: &mut HttpRecord,
    ) -> Gate {
        record.oauth_mut().app_client_id = Some(self.client.id.clone());
        if !tls {
            // The session cookie is Secure: OAuth endpoints are HTTPS only.
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let target = safe_return_path(path).unwrap_or("/");
            return Gate::Respond(redirect(&format!("{}{target}", self.service.origin(host))));
        }
        match auth_path(req.uri().path()) {
            None => {}
            Some(AuthPath::Reserved) => {
                return Gate::Respond(error_page(
                    ErrorCode::OAUTH_RESERVED_PATH,
                    "only /auth/authn, /auth/logout and /auth/callback exist",
                    None,
                ));
            }
            Some(AuthPath::Authn) => {
                let target = query_param(req.uri().query(), "redirect_path");
                let return_to = target.as_deref().and_then(safe_return_path).unwrap_or("/");
                return Gate::Respond(self.start_login(req.headers(), host, return_to, true).await);
            }
            Some(AuthPath::Logout) => return Gate::Respond(self.logout(req, host).await),
            Some(AuthPath::Callback) => {
                return Gate::Respond(self.finish_login(req, host, record).await);
            }
        }
        if req.method() == Method::OPTIONS && self.options_passthrough {
            strip_cookies(req.headers_mut(), &self.cookie_prefix);
            return Gate::Forward(Vec::new());
        }
        let session = match self.current_session(req.headers(), host).await {
            Ok(session) => session,
            Err(e) => return Gate::Respond(self.store_down(&e)),
        };
        let mut session = match session {
            Ok(session) => session,
            Err(why) => {
                // A fetch/XHR or subresource cannot follow a login redirect
                // to another origin; tell it to reload instead.
                let navigation = req
                    .headers()
                    .get("sec-fetch-mode")
                    .is_none_or(|m| m.as_bytes().eq_ignore_ascii_case(b"navigate"));
                if !navigation {
                    let mut response = error_page(
                        ErrorCode::OAUTH_LOGIN_REQUIRED,
                        "this request cannot follow a login redirect",
                        None,
                    );
                    if let NoSession::Stale = why {
                        response = with_cookies(response, [self.clear_session_cookie()]);
                    }
                    return Gate::Respond(response);
                }
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let return_to = safe_return_path(path).unwrap_or("/");
                return Gate::Respond(
                    self.start_login(req.headers(), host, return_to, false)
                        .await,
                );
            }
        };
        let now = now_ms();
        let check_due = session.config != self.fingerprint
            || (!self.auth_check_interval.is_zero()
                && now.saturating_sub(session.last_check)
                    >= self.auth_check_interval.as_millis() as u64);
        if check_due {
            match self
                .recheck(&mut session, host, req.headers(), record)
                .await
            {
                Ok(()) => {}
                Err(response) => return Gate::Respond(response),
            }
        } else if now.saturating_sub(session.last_seen) >= self.touch_step().as_millis() as u64 {
            session.last_seen = now;
            match self
                .service
                .update_session(&session, self.session_ttl(&session, now))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Revoked while this request was in flight.
                    return Gate::Respond(self.start_login(req.headers(), host, "/", false).await);
                }
                Err(e) => return Gate::Respond(self.store_down(&e)),
            }
        }
        let oauth = record.oauth_mut();
        oauth.decision = Some(Decision::Allow);
        oauth.user = Some(OAuthUser {
            id: Some(session.user_id.clone()),
            name: session.user_name.clone(),
        });
        strip_cookies(req.headers_mut(), &self.cookie_prefix);
        let tokens = self.tokens(&session).unwrap_or_default();
        Gate::Forward(identity_headers(&session, &tokens))
    }

    fn store_down(&self, e: &StoreError) -> Response<ProxyBody> {
        tracing::warn!(error = %e, "OAuth: session store unavailable; answering 503");
        error_page(ErrorCode::OAUTH_STORE_UNAVAILABLE, "", None)
    }

    /// How stale `last_seen` may get before it is written again: a tenth
    /// of the inactivity timeout (at least 100 ms), else a minute.
    fn touch_step(&self) -> Duration {
        if self.inactivity_timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            (self.inactivity_timeout / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(60))
        }
    }

    /// When the session must end, from now.
    fn session_ttl(&self, session: &SessionRecord, now: u64) -> Duration {
        let mut deadline = now + SESSION_CAP.as_millis() as u64;
        if !self.maximum_duration.is_zero() {
            deadline = deadline.min(session.created + self.maximum_duration.as_millis() as u64);
        }
        if !self.inactivity_timeout.is_zero() {
            deadline = deadline.min(session.last_seen + self.inactivity_timeout.as_millis() as u64);
        }
        Duration::from_millis(deadline.saturating_sub(now).max(1))
    }

    fn expired(&self, session: &SessionRecord, now: u64) -> bool {
        let max = self.maximum_duration.as_millis() as u64;
        let idle = self.inactivity_timeout.as_millis() as u64;
        (max > 0 && now >= session.created + max) || (idle > 0 && now >= session.last_seen + idle)
    }

    fn tokens(&self, session: &SessionRecord) -> Option<Tokens> {
        let plain = self.service.open_str("tokens", &session.tokens).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// The live session the request's cookie names on this endpoint.
    async fn current_session(
        &self,
        headers: &HeaderMap,
        host: &str,
    ) -> Result<Result<SessionRecord, NoSession>, StoreError> {
        let name = self.session_cookie();
        let values = cookie_values(headers, &name, MAX_SESSION_COOKIES);
        if values.is_empty() {
            return Ok(Err(NoSession::Absent));
        }
        let now = now_ms();
        for value in values {
            if value.len() > 128 {
                continue;
            }
            let Some(session) = self.service.load_session(&key_hash(value)).await? else {
                continue;
            };
            let ours = session.host == host
                && session.provider == self.provider.name()
                && session.client_id == self.client.id;
            if !ours {
                continue;
            }
            if self.expired(&session, now) {
                tracing::debug!(
                    code = %ErrorCode::OAUTH_LOGIN_REQUIRED.id(),
                    session = %session.id,
                    "OAuth session expired"
                );
                self.service.delete_session(&session).await?;
                continue;
            }
            return Ok(Ok(session));
        }
        Ok(Err(NoSession::Stale))
    }

    /// Checks the user again with the provider (continuous authorization).
    /// On success the session is updated; otherwise the response to send.
    async fn recheck(
        &self,
        session: &mut SessionRecord,
        host: &str,
        headers: &HeaderMap,
        record: &mut HttpRecord,
    ) -> Result<(), Response<ProxyBody>> {
        let lock = check_lock(&session.id);
        match self
            .service
            .store
            .set_if_absent(&lock, b"1".to_vec(), CHECK_LOCK)
            .await
        {
            Ok(true) => {}
            // Another request is checking this user right now.
            Ok(false) => return Ok(()),
            Err(e) => return Err(self.store_down(&e)),
        }
        let result = self.recheck_locked(session, host, headers, record).await;
        if let Err(e) = self.service.store.delete(&lock).await {
            tracing::debug!(error = %e, "OAuth: could not release a check lock");
        }
        result
    }

    async fn recheck_locked(
        &self,
        session: &mut SessionRecord,
        host: &str,
        headers: &HeaderMap,
        record: &mut HttpRecord,
    ) -> Result<(), Response<ProxyBody>> {
        let Some(tokens) = self.tokens(session) else {
            let _ = self.service.delete_session(session).await;
            return Err(self.start_login(headers, host, "/", false).await);
        };
        let login = match self
            .provider
            .refresh(&self.service.http, &self.client, &tokens, &session.user_id)
            .await
        {
            Ok(login) => login,
            Err(IdpError::Unavailable(detail)) => {
                // Fail closed, but keep the session: the IdP may be back soon.
                tracing::warn!(%detail, "OAuth: identity provider unavailable for an auth check");
                return Err(error_page(ErrorCode::OAUTH_IDP_UNAVAILABLE, "", None));
            }
            Err(e) => {
                tracing::info!(user = %session.user_id, error = %e, "OAuth: the provider refused the session; logging out");
                if let Err(e) = self.service.delete_session(session).await {
                    return Err(self.store_down(&e));
                }
                let login = self.start_login(headers, host, "/", false).await;
                return Err(login);
            }
        };
        match self.authorize(&login.user) {
            Ok(email) => {
                let now = now_ms();
                session.user_name = login.user.name.clone();
                session.email = email.map(str::to_string);
                session.tokens = self.seal_tokens(&login.tokens);
                session.last_check = now;
                session.last_seen = now;
                session.config = self.fingerprint.clone();
                match self
                    .service
                    .update_session(session, self.session_ttl(session, now))
                    .await
                {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(self.start_login(headers, host, "/", false).await),
                    Err(e) => Err(self.store_down(&e)),
                }
            }
            Err((code, detail)) => {
                tracing::info!(user = %session.user_id, %detail, "OAuth: the user lost access; logging out");
                if let Err(e) = self.service.delete_session(session).await {
                    return Err(self.store_down(&e));
                }
                let oauth = record.oauth_mut();
                oauth.decision = Some(Decision::Block);
                oauth.user = Some(OAuthUser {
                    id: Some(session.user_id.clone()),
                    name: login.user.name.clone(),
                });
                Err(with_cookies(
                    error_page(code, &detail, Some(("/auth/authn", "Log in again"))),
                    [self.clear_session_cookie()],
                ))
            }
        }
    }

    fn seal_tokens(&self, tokens: &Tokens) -> String {
        let json = serde_json::to_vec(tokens).expect("tokens serialise");
        self.service.seal_str("tokens", &json)
    }

    /// The allow-lists' verdict: the usable email (if any) when allowed,
    /// else the code and why.
    fn authorize<'u>(&self, user: &'u UserInfo) -> Result<Option<&'u str>, (ErrorCode, String)> {
        let email = usable_email(user);
        if self.allow_emails.is_empty() && self.allow_domains.is_empty() {
            return Ok(email);
        }
        let Some(email) = email else {
            return Err(match &user.email {
                None => (
                    ErrorCode::OAUTH_NO_EMAIL,
                    "the provider gave no email address".into(),
                ),
                Some(e) => (
                    ErrorCode::OAUTH_USER_NOT_ALLOWED,
                    format!("{e:?} is not a verified, well-formed email address"),
                ),
            });
        };
        let lower = email.to_ascii_lowercase();
        let domain = lower.rsplit_once('@').map_or("", |(_, d)| d);
        if self.allow_emails.contains(&lower) || self.allow_domains.iter().any(|d| d == domain) {
            Ok(Some(email))
        } else {
            Err((
                ErrorCode::OAUTH_USER_NOT_ALLOWED,
                format!("{email} is not allowed on this site"),
            ))
        }
    }

    /// Redirects to the IdP, remembering where to come back to.
    async fn start_login(
        &self,
        headers: &HeaderMap,
        host: &str,
        return_to: &str,
        force: bool,
    ) -> Response<ProxyBody> {
        let service = &self.service;
        let state = super::callback::new_state();
        let attempt = seal::random_hex(8);
        let binding = seal::random_token(32);
        let login = LoginState {
            host: host.to_string(),
            provider: self.provider.name().to_string(),
            client_id: self.client.id.clone(),
            issuer: self.issuer.clone(),
            return_to: return_to.to_string(),
            attempt: attempt.clone(),
            binding: key_hash(&binding),
            pkce_verifier: pkce_verifier(),
            nonce: seal::random_token(32),
            redirect_uri: service.callback_url(),
            created: now_ms(),
        };
        let url = self.provider.authorize_url(
            &self.client,
            &AuthorizeRequest {
                redirect_uri: &login.redirect_uri,
                scopes: &self.scopes,
                state: &state,
                nonce: &login.nonce,
                pkce_verifier: &login.pkce_verifier,
                force_login: force,
            },
        );
        let url = match url {
            Ok(url) => url,
            Err(e) => {
                tracing::error!(error = %e, "OAuth: cannot build the authorization URL");
                return error_page(ErrorCode::INTERNAL, "", None);
            }
        };
        let timeout = service.settings.login_timeout;
        let sealed = service.seal_json("state", &login);
        if let Err(e) = service.store.set(&state_key(&state), sealed, timeout).await {
            return self.store_down(&e);
        }
        let mut cookies = vec![set_cookie(
            &self.nonce_cookie(&attempt),
            &binding,
            Some(timeout.as_secs().max(1)),
        )];
        let nonce_prefix = format!("{}nonce.", self.cookie_prefix);
        let pending: Vec<String> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|p| p.split_once('=').map(|(n, _)| n.trim().to_string()))
            .filter(|n| n.starts_with(&nonce_prefix))
            .collect();
        if pending.len() >= MAX_NONCE_COOKIES {
            cookies.extend(pending.iter().map(|n| set_cookie(n, "", Some(0))));
        }
        // A new login never keeps an old session (session fixation).
        let presented = cookie_values(headers, &self.session_cookie(), MAX_SESSION_COOKIES);
        if !presented.is_empty() {
            if force {
                for value in presented {
                    match service.load_session(&key_hash(value)).await {
                        Ok(Some(old)) if old.host == host => {
                            if let Err(e) = service.delete_session(&old).await {
                                return self.store_down(&e);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => return self.store_down(&e),
                    }
                }
            }
            cookies.push(self.clear_session_cookie());
        }
        with_cookies(redirect(&url), cookies)
    }

    /// `/auth/logout[?redirect_path=/x]`: the session is deleted in the
    /// store, so it is dead on every node at once, and the cookie cleared.
    async fn logout<B>(&self, req: &Request<B>, host: &str) -> Response<ProxyBody> {
        for value in cookie_values(req.headers(), &self.session_cookie(), MAX_SESSION_COOKIES) {
            match self.service.load_session(&key_hash(value)).await {
                Ok(Some(session)) if session.host == host => {
                    if let Err(e) = self.service.delete_session(&session).await {
                        return self.store_down(&e);
                    }
                    tracing::info!(user = %session.user_id, session = %session.id, "OAuth: logged out");
                }
                Ok(_) => {}
                Err(e) => return self.store_down(&e),
            }
        }
        let response = match query_param(req.uri().query(), "redirect_path") {
            Some(target) => redirect(safe_return_path(&target).unwrap_or("/")),
            None => logged_out(),
        };
        with_cookies(response, [self.clear_session_cookie()])
    }

    /// `/auth/callback?code=…`: the one-time code from the auth host.
    async fn finish_login<B>(
        &self,
        req: &Request<B>,
        host: &str,
        record: &mut HttpRecord,
    ) -> Response<ProxyBody> {
        let service = &self.service;
        let Some(code) = query_param(req.uri().query(), "code").filter(|c| !c.is_empty()) else {
            return error_page(ErrorCode::OAUTH_STATE_MISSING, "no code parameter", None);
        };
        let taken = match service.store.take(&handoff_key(&code)).await {
            Ok(taken) => taken,
            Err(e) => return self.store_down(&e),
        };
        let relogin = Some(("/auth/authn", "Log in again"));
        let Some(Handoff { state, code }) = taken.and_then(|b| service.open_json("handoff", &b))
        else {
            return error_page(ErrorCode::OAUTH_STATE_INVALID, "", relogin);
        };
        if state.host != host
            || state.client_id != self.client.id
            || state.provider != self.provider.name()
        {
            return error_page(ErrorCode::OAUTH_STATE_WRONG_HOST, "", relogin);
        }
        let retry = Some((state.return_to.as_str(), "Log in again"));
        if now_ms().saturating_sub(state.created)
            > service.settings.login_timeout.as_millis() as u64
        {
            return error_page(ErrorCode::OAUTH_LOGIN_TOO_SLOW, "", retry);
        }
        let nonce_cookie = self.nonce_cookie(&state.attempt);
        let bound = cookie_values(req.headers(), &nonce_cookie, 1)
            .first()
            .is_some_and(|v| seal::same(&key_hash(v), &state.binding));
        if !bound {
            return error_page(ErrorCode::OAUTH_NONCE_MISSING, "", retry);
        }
        let clear_nonce = set_cookie(&nonce_cookie, "", Some(0));
        let login = self
            .provider
            .exchange(
                &service.http,
                &self.client,
                &code,
                &state.redirect_uri,
                &state.pkce_verifier,
                &state.nonce,
            )
            .await;
        let login = match login {
            Ok(login) => login,
            Err(IdpError::Unavailable(detail)) => {
                tracing::warn!(%detail, "OAuth: identity provider unavailable at login");
                return with_cookies(
                    error_page(ErrorCode::OAUTH_IDP_UNAVAILABLE, "", retry),
                    [clear_nonce],
                );
            }
            Err(e) => {
                tracing::info!(error = %e, "OAuth: login refused");
                return with_cookies(
                    error_page(ErrorCode::OAUTH_IDP_ERROR, &e.to_string(), retry),
                    [clear_nonce],
                );
            }
        };
        let oauth = record.oauth_mut();
        oauth.user = Some(OAuthUser {
            id: Some(login.user.id.clone()),
            name: login.user.name.clone(),
        });
        let email = match self.authorize(&login.user) {
            Ok(email) => email,
            Err((code, detail)) => {
                oauth.decision = Some(Decision::Block);
                tracing::info!(user = %login.user.id, %detail, "OAuth: user not allowed");
                let mut cookies = vec![clear_nonce];
                if !cookie_values(req.headers(), &self.session_cookie(), 1).is_empty() {
                    cookies.push(self.clear_session_cookie());
                }
                return with_cookies(
                    error_page(code, &detail, Some(("/auth/authn", "Log in again"))),
                    cookies,
                );
            }
        };
        oauth.decision = Some(Decision::Allow);
        // Session fixation: whatever session cookie the browser had is
        // replaced by a fresh id, and its session ended.
        for value in cookie_values(req.headers(), &self.session_cookie(), MAX_SESSION_COOKIES) {
            if let Ok(Some(old)) = service.load_session(&key_hash(value)).await
                && old.host == host
            {
                let _ = service.delete_session(&old).await;
            }
        }
        let cookie = seal::random_token(32);
        let now = now_ms();
        let session = SessionRecord {
            id: key_hash(&cookie),
            host: host.to_string(),
            provider: self.provider.name().to_string(),
            client_id: self.client.id.clone(),
            config: self.fingerprint.clone(),
            user_id: login.user.id.clone(),
            user_name: login.user.name.clone(),
            email: email.map(str::to_string),
            tokens: self.seal_tokens(&login.tokens),
            created: now,
            last_seen: now,
            last_check: now,
        };
        if let Err(e) = service
            .create_session(&session, self.session_ttl(&session, now))
            .await
        {
            return self.store_down(&e);
        }
        tracing::info!(user = %session.user_id, session = %session.id, host, "OAuth: logged in");
        let max_age =
            (!self.maximum_duration.is_zero()).then(|| self.maximum_duration.as_secs().max(1));
        let target = safe_return_path(&state.return_to).unwrap_or("/");
        with_cookies(
            redirect(target),
            [
                set_cookie(&self.session_cookie(), &cookie, max_age),
                clear_nonce,
            ],
        )
    }
}

/// The `ngrok-auth-*` headers for the upstream.
fn identity_headers(session: &SessionRecord, tokens: &Tokens) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    let mut add = |name: &'static str, value: Option<&str>, max: usize| {
        if let Some(value) = value.and_then(|v| header_safe(v, max)) {
            headers.push((name, value));
        }
    };
    add("ngrok-auth-user-id", Some(&session.user_id), MAX_HEADER);
    add(
        "ngrok-auth-user-name",
        session.user_name.as_deref(),
        MAX_HEADER,
    );
    add(
        "ngrok-auth-user-email",
        session.email.as_deref(),
        MAX_HEADER,
    );
    add(
        "ngrok-auth-oauth-access-token",
        (!tokens.access.is_empty()).then_some(tokens.access.as_str()),
        MAX_TOKEN_HEADER,
    );
    add(
        "ngrok-auth-oauth-refresh-token",
        tokens.refresh.as_deref(),
        MAX_TOKEN_HEADER,
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_must_be_well_formed_and_verified() {
        let user = |email: &str, verified: Option<bool>| UserInfo {
            id: "u".into(),
            email: Some(email.into()),
            email_verified: verified,
            ..Default::default()
        };
        assert_eq!(
            usable_email(&user("a@corp.com", Some(true))),
            Some("a@corp.com")
        );
        assert_eq!(usable_email(&user("a@corp.com", None)), Some("a@corp.com"));
        for bad in [
            "a@corp.com@evil.com",
            "a@evil.com@corp.com",
            "@corp.com",
            "a@",
            "a corp@x.com",
            "nobody",
        ] {
            assert_eq!(usable_email(&user(bad, Some(true))), None, "{bad}");
        }
        assert_eq!(usable_email(&user("a@corp.com", Some(false))), None);
    }

    #[test]
    fn header_values_are_made_safe() {
        assert_eq!(header_safe("José 100%", 64).unwrap(), "Jos%C3%A9 100%25");
        assert_eq!(header_safe("a\r\nb", 64).unwrap(), "a%0D%0Ab");
        assert_eq!(header_safe(&"x".repeat(10), 5), None);
    }
}
