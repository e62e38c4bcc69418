//! `basic-auth` (and the `--basic-auth` module): RFC 7617 credentials from
//! a list of `user:password` pairs (at most 10; passwords 8–128
//! characters, as ngrok requires). Passwords are kept only as SHA-256
//! digests and compared in constant time. A visitor without valid
//! credentials gets `401` with `WWW-Authenticate` (unless `enforce` is
//! false); the upstream sees the `Authorization` header unchanged.

use base64::Engine;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use postern_events::Decision;
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;

use super::{Built, at_most, config};
use crate::policy::{Flow, Phase, PolicyEnv, RequestAction, RequestCx, cel::map_value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    credentials: Vec<String>,
    #[serde(default = "ngrok")]
    realm: String,
    #[serde(default = "yes")]
    enforce: bool,
}

fn ngrok() -> String {
    "ngrok".into()
}

fn yes() -> bool {
    true
}

type Digest = [u8; 32];

fn digest(password: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, password);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn same(a: &Digest, b: &Digest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) struct BasicAuth {
    users: Vec<(String, Digest)>,
    challenge: HeaderValue,
    enforce: bool,
}

/// Checks one `user:password` pair as ngrok does; the error names the
/// entry by position, never its password.
pub(crate) fn credential(i: usize, pair: &str) -> Result<(String, Digest), String> {
    let Some((user, password)) = pair.split_once(':') else {
        return Err(format!("credentials[{i}]: not of the form user:password"));
    };
    if user.is_empty() || user.chars().count() > 128 {
        return Err(format!(
            "credentials[{i}]: the user name must be 1 to 128 characters"
        ));
    }
    let length = password.chars().count();
    if !(8..=128).contains(&length) {
        return Err(format!(
            "credentials[{i}]: the password of {user:?} must be 8 to 128 characters, not {length}"
        ));
    }
    if pair.chars().any(char::is_control) {
        return Err(format!(
            "credentials[{i}]: control characters are not allowed (RFC 7617 2.1)"
        ));
    }
    Ok((user.to_string(), digest(password.as_bytes())))
}

impl BasicAuth {
    pub(crate) fn new(pairs: &[String], realm: &str, enforce: bool) -> Result<BasicAuth, String> {
        if pairs.is_empty() {
            return Err("credentials: at least one user:password".into());
        }
        at_most("credentials", pairs, 10)?;
        let users = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| credential(i, p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("config.{e}"))?;
        Self::with_digests(users, realm, enforce)
    }

    /// The `--basic-auth` module: the agent sent each password's SHA-256
    /// (hex), checked for length before it hashed it.
    pub(crate) fn from_module(credentials: &[(String, String)]) -> Result<BasicAuth, String> {
        at_most("basic_auth", credentials, 10)?;
        let users = credentials
            .iter()
            .enumerate()
            .map(|(i, (user, hex_digest))| {
                let bytes = hex::decode(hex_digest)
                    .ok()
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| {
                        format!("basic_auth[{i}]: the password digest is not SHA-256 hex")
                    })?;
                if user.is_empty() || user.chars().count() > 128 || user.contains(':') {
                    return Err(format!(
                        "basic_auth[{i}]: the user name must be 1 to 128 characters without ':'"
                    ));
                }
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&bytes);
                Ok((user.clone(), digest))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Self::with_digests(users, "ngrok", true)
    }

    fn with_digests(
        users: Vec<(String, Digest)>,
        realm: &str,
        enforce: bool,
    ) -> Result<BasicAuth, String> {
        if realm.is_empty() || realm.len() > 128 || !realm.is_ascii() || realm.contains('"') {
            return Err("config.realm: 1 to 128 ASCII characters without quotes".into());
        }
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .map_err(|_| "config.realm: not valid in a header".to_string())?;
        Ok(BasicAuth {
            users,
            challenge,
            enforce,
        })
    }

    /// The user whose credentials the request presents, if they are valid;
    /// and whether any were presented.
    fn check(&self, header: Option<&HeaderValue>) -> (bool, Option<String>) {
        let Some(encoded) = header.and_then(|v| v.to_str().ok()).and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        }) else {
            return (false, None);
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return (true, None);
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.split_once(':'))
        else {
            return (true, None);
        };
        let presented = digest(password.as_bytes());
        // Every entry is compared, so the time taken does not say which
        // user exists.
        let mut found = None;
        for (name, expected) in &self.users {
            if same(expected, &presented) && name == user {
                found = Some(name.clone());
            }
        }
        (true, found)
    }
}

pub(super) fn build(value: &serde_json::Value, _: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    Ok(Built::Request(Box::new(BasicAuth::new(
        &cfg.credentials,
        &cfg.realm,
        cfg.enforce,
    )?)))
}

impl RequestAction for BasicAuth {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let (presented, user) = self.check(cx.req.headers().get(http::header::AUTHORIZATION));
        let authorized = user.is_some();
        cx.scratch.actions.insert(
            "basic_auth",
            map_value([(
                "credentials",
                map_value([
                    ("presented", cel::Value::Bool(presented)),
                    ("authorized", cel::Value::Bool(authorized)),
                    (
                        "username",
                        cel::Value::from(user.clone().unwrap_or_default()),
                    ),
                ]),
            )]),
        );
        let decision = if authorized || !self.enforce {
            Decision::Allow
        } else {
            Decision::Block
        };
        cx.record.basic_auth(decision, user.as_deref());
        let flow = match decision {
            Decision::Allow => Flow::Next,
            Decision::Block => {
                let mut page = crate::http::error_response(&Failure::new(
                    ErrorCode::BASIC_AUTH_REQUIRED,
                    "no valid credentials",
                ));
                page.headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, self.challenge.clone());
                Flow::Respond(page)
            }
        };
        Box::pin(async move { Ok(flow) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    #[test]
    fn credentials_are_checked_like_ngrok() {
        let auth = BasicAuth::new(&["alice:correct horse".into()], "ngrok", true).unwrap();
        assert_eq!(
            auth.check(Some(&header("alice", "correct horse")))
                .1
                .as_deref(),
            Some("alice")
        );
        assert_eq!(
            auth.check(Some(&header("alice", "wrong password"))),
            (true, None)
        );
        assert_eq!(
            auth.check(Some(&header("bob", "correct horse"))),
            (true, None)
        );
        assert_eq!(auth.check(None), (false, None));
        let short = BasicAuth::new(&["a:short".into()], "ngrok", true)
            .err()
            .unwrap();
        assert!(short.contains("8 to 128 characters, not 5"), "{short}");
        assert!(
            !short.contains("short\""),
            "the password is never shown: {short}"
        );
        assert!(
            BasicAuth::new(&["nocolon".into()], "ngrok", true)
                .err()
                .is_some()
        );
        let eleven: Vec<String> = (0..11).map(|i| format!("u{i}:password{i}")).collect();
        assert!(
            BasicAuth::new(&eleven, "ngrok", true)
                .err()
                .unwrap()
                .contains("at most 10")
        );
    }
}
