//! The auth host: `https://<auth_host>/oauth2/callback`, the one callback
//! URL of every endpoint (ngrok's "common callback forwarder"). It needs no
//! endpoint configuration: it swaps the IdP's `state` (once) for a one-time
//! code and sends the browser to the endpoint's own `/auth/callback`, where
//! the endpoint finishes the login. So the IdP may send the browser to any
//! node of any region.

use http::{Method, Request, Response};
use postern_proto::ErrorCode;

use super::{
    OAuthService,
    pages::{error_page, redirect},
    paths::query_param,
    seal,
    sessions::{HANDOFF_TTL, Handoff, LoginState, handoff_key, now_ms, state_key},
};
use crate::http::ProxyBody;

/// The callback path on the auth host.
pub const CALLBACK_PATH: &str = "/oauth2/callback";

/// A new `state` value: when it was made (hex milliseconds, so a late
/// callback can be told apart from a forged one) and 256 random bits.
pub fn new_state() -> String {
    format!("{:x}.{}", now_ms(), seal::random_token(32))
}

fn state_created(state: &str) -> Option<u64> {
    u64::from_str_radix(state.split_once('.')?.0, 16).ok()
}

impl OAuthService {
    /// Answers a request to the auth host; plain HTTP is sent to HTTPS.
    pub async fn serve_auth_host<B>(&self, req: &Request<B>, tls: bool) -> Response<ProxyBody> {
        if !tls {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let target = super::paths::safe_return_path(target).unwrap_or("/");
            return redirect(&format!(
                "{}{target}",
                self.origin(&self.settings.auth_host)
            ));
        }
        if req.uri().path() != CALLBACK_PATH || !matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return error_page(
                ErrorCode::ENDPOINT_OFFLINE,
                "this host only serves the OAuth callback",
                None,
            );
        }
        let query = req.uri().query();
        let Some(state) = query_param(query, "state").filter(|s| !s.is_empty()) else {
            return error_page(ErrorCode::OAUTH_STATE_MISSING, "no state parameter", None);
        };
        let taken = match self.store.take(&state_key(&state)).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "OAuth callback: session store unavailable");
                return error_page(ErrorCode::OAUTH_STORE_UNAVAILABLE, "", None);
            }
        };
        let login_timeout = self.settings.login_timeout.as_millis() as u64;
        let Some(login) = taken.and_then(|b| self.open_json::<LoginState>("state", &b)) else {
            // The time in an unknown state is unauthenticated: only a
            // plausible one (under a day old) earns "too slow".
            let late = state_created(&state).is_some_and(|created| {
                let age = now_ms().saturating_sub(created);
                age > login_timeout && age < 24 * 3600 * 1000
            });
            return if late {
                error_page(ErrorCode::OAUTH_LOGIN_TOO_SLOW, "", None)
            } else {
                error_page(ErrorCode::OAUTH_STATE_INVALID, "", None)
            };
        };
        let retry = format!("{}{}", self.origin(&login.host), login.return_to);
        let retry_link = Some((retry.as_str(), "Log in again"));
        if now_ms().saturating_sub(login.created) > login_timeout {
            return error_page(ErrorCode::OAUTH_LOGIN_TOO_SLOW, "", retry_link);
        }
        if let Some(error) = query_param(query, "error") {
            let description = query_param(query, "error_description").unwrap_or_default();
            let detail: String = format!("{error}: {description}")
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect();
            return error_page(ErrorCode::OAUTH_IDP_ERROR, &detail, retry_link);
        }
        // RFC 9207: an `iss` that names another issuer is a mix-up attack.
        if let (Some(iss), Some(expected)) = (query_param(query, "iss"), &login.issuer)
            && iss.trim_end_matches('/') != expected
        {
            return error_page(
                ErrorCode::OAUTH_IDP_ERROR,
                "the callback names another issuer",
                retry_link,
            );
        }
        let Some(code) = query_param(query, "code").filter(|c| !c.is_empty()) else {
            return error_page(
                ErrorCode::OAUTH_STATE_MISSING,
                "no code parameter",
                retry_link,
            );
        };
        let one_time = seal::random_token(32);
        let host = login.host.clone();
        let handoff = self.seal_json("handoff", &Handoff { state: login, code });
        if let Err(e) = self
            .store
            .set(&handoff_key(&one_time), handoff, HANDOFF_TTL)
            .await
        {
            tracing::warn!(error = %e, "OAuth callback: session store unavailable");
            return error_page(ErrorCode::OAUTH_STORE_UNAVAILABLE, "", None);
        }
        redirect(&format!(
            "{}/auth/callback?code={one_time}",
            self.origin(&host)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_carries_its_time() {
        let s = new_state();
        let created = state_created(&s).unwrap();
        assert!(now_ms() - created < 5_000);
        assert_eq!(state_created("zz.abc"), None);
        assert_eq!(state_created("nodot"), None);
    }
}
