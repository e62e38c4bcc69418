//! `verify-webhook` (and the `verify_webhook` module): checks a webhook's
//! signature the way its sender makes it, over the exact bytes received,
//! comparing in constant time, and refuses signed timestamps outside the
//! provider's window (300 s where the provider signs one). The body is
//! read whole (at most 10 MiB) and then sent on unchanged. A request that
//! fails gets `403 ERR_POSTERN_3204` unless `enforce` is false; the
//! verdict goes to the event's `webhook_verification.decision` and to
//! `actions.ngrok.verify_webhook.verified`.
//!
//! Providers: `github`, `gitlab`, `shopify`, `slack`, `stripe`, `svix` (also
//! Standard Webhooks, `webhook-*` headers), `twilio`, `sendgrid`, and
//! Postern's `hmac`: a hex HMAC-SHA256 of the body in `X-Signature`
//! (optionally `sha256=`-prefixed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use postern_events::Decision;
use postern_proto::{ErrorCode, Failure};
use ring::hmac;
use serde::Deserialize;

use super::{Built, config};
use crate::{
    http::VisitorBody,
    policy::{
        Flow, Phase, PolicyEnv, RequestAction, RequestCx,
        cel::map_value,
        facts::{ReqView, percent_decode},
    },
};

/// Largest body read for verification.
const MAX_BODY: usize = 10 * 1024 * 1024;
/// How far a signed timestamp may be from now.
const TOLERANCE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    Github,
    Gitlab,
    Shopify,
    Slack,
    Stripe,
    Svix,
    Twilio,
    Sendgrid,
    Hmac,
}

const PROVIDERS: &[(&str, Provider)] = &[
    ("github", Provider::Github),
    ("gitlab", Provider::Gitlab),
    ("shopify", Provider::Shopify),
    ("slack", Provider::Slack),
    ("stripe", Provider::Stripe),
    ("svix", Provider::Svix),
    ("twilio", Provider::Twilio),
    ("sendgrid", Provider::Sendgrid),
    ("hmac", Provider::Hmac),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    provider: String,
    secret: String,
    #[serde(default = "yes")]
    enforce: bool,
}

fn yes() -> bool {
    true
}

pub(crate) struct VerifyWebhook {
    provider: Provider,
    key: Vec<u8>,
    enforce: bool,
}

impl VerifyWebhook {
    pub(crate) fn new(
        provider: &str,
        secret: &str,
        enforce: bool,
    ) -> Result<VerifyWebhook, String> {
        let Some((_, provider)) = PROVIDERS.iter().find(|(name, _)| *name == provider) else {
            let names: Vec<&str> = PROVIDERS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "config.provider: {provider:?} is not a provider Postern verifies; it verifies {}",
                names.join(", ")
            ));
        };
        if secret.is_empty() {
            return Err("config.secret: required".into());
        }
        let key = match provider {
            // `whsec_<base64>`: the key is the decoded part.
            Provider::Svix => {
                let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| {
                        "config.secret: a Svix secret is whsec_ followed by base64".to_string()
                    })?
            }
            // The verification key: base64 DER of the public key.
            Provider::Sendgrid => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(secret.trim())
                    .map_err(|_| {
                        "config.secret: SendGrid's verification key is base64".to_string()
                    })?;
                ec_point(&der).ok_or_else(|| {
                    "config.secret: SendGrid's verification key is not a P-256 public key"
                        .to_string()
                })?
            }
            _ => secret.as_bytes().to_vec(),
        };
        Ok(VerifyWebhook {
            provider: *provider,
            key,
            enforce,
        })
    }

    /// Checks a request's signature; `url` is the public URL the sender
    /// called, `now` seconds since the epoch.
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        url: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), String> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("no {name} header"))
        };
        match self.provider {
            Provider::Github => {
                let sig = header("x-hub-signature-256")?;
                let hex_sig = sig
                    .strip_prefix("sha256=")
                    .ok_or("x-hub-signature-256 is not sha256=…")?;
                self.hmac_hex(hmac::HMAC_SHA256, body, hex_sig)
            }
            Provider::Gitlab => {
                let token = header("x-gitlab-token")?;
                same(token.as_bytes(), &self.key)
                    .then_some(())
                    .ok_or("the token does not match".into())
            }
            Provider::Shopify => {
                let sig = header("x-shopify-hmac-sha256")?;
                self.hmac_base64(hmac::HMAC_SHA256, body, sig)
            }
            Provider::Hmac => {
                let sig = header("x-signature")?;
                self.hmac_hex(
                    hmac::HMAC_SHA256,
                    body,
                    sig.strip_prefix("sha256=").unwrap_or(sig),
                )
            }
            Provider::Slack => {
                let ts = header("x-slack-request-timestamp")?;
                fresh(ts, now)?;
                let sig = header("x-slack-signature")?;
                let hex_sig = sig
                    .strip_prefix("v0=")
                    .ok_or("x-slack-signature is not v0=…")?;
                let signed = [b"v0:", ts.as_bytes(), b":", body].concat();
                self.hmac_hex(hmac::HMAC_SHA256, &signed, hex_sig)
            }
            Provider::Stripe => {
                let sig = header("stripe-signature")?;
                let mut ts = None;
                let mut candidates = Vec::new();
                for part in sig.split(',') {
                    match part.trim().split_once('=') {
                        Some(("t", t)) => ts = Some(t),
                        Some(("v1", v)) => candidates.push(v),
                        _ => {}
                    }
                }
                let ts = ts.ok_or("stripe-signature has no t=")?;
                fresh(ts, now)?;
                let signed = [ts.as_bytes(), b".", body].concat();
                candidates
                    .iter()
                    .any(|c| self.hmac_hex(hmac::HMAC_SHA256, &signed, c).is_ok())
                    .then_some(())
                    .ok_or("no v1 signature matches".into())
            }
            Provider::Svix => {
                let (id, ts, sigs) = match header("svix-id") {
                    Ok(id) => (id, header("svix-timestamp")?, header("svix-signature")?),
                    Err(_) => (
                        header("webhook-id")?,
                        header("webhook-timestamp")?,
                        header("webhook-signature")?,
                    ),
                };
                fresh(ts, now)?;
                let signed = [id.as_bytes(), b".", ts.as_bytes(), b".", body].concat();
                sigs.split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .any(|s| self.hmac_base64(hmac::HMAC_SHA256, &signed, s).is_ok())
                    .then_some(())
                    .ok_or("no v1 signature matches".into())
            }
            Provider::Twilio => {
                let sig = header("x-twilio-signature")?;
                let form = headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
                let mut signed = url.as_bytes().to_vec();
                if form {
                    let text =
                        std::str::from_utf8(body).map_err(|_| "the form body is not UTF-8")?;
                    let mut params: Vec<(String, String)> = text
                        .split('&')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap_or((p, ""));
                            (percent_decode(k), percent_decode(v))
                        })
                        .collect();
                    params.sort();
                    for (k, v) in params {
                        signed.extend_from_slice(k.as_bytes());
                        signed.extend_from_slice(v.as_bytes());
                    }
                } else if let Some(expected) = url
                    .split_once('?')
                    .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("bodySHA256=")))
                {
                    let digest = ring::digest::digest(&ring::digest::SHA256, body);
                    if !same(
                        hex::encode(digest.as_ref()).as_bytes(),
                        expected.to_ascii_lowercase().as_bytes(),
                    ) {
                        return Err("bodySHA256 does not match the body".into());
                    }
                }
                self.hmac_base64(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &signed, sig)
            }
            Provider::Sendgrid => {
                let ts = header("x-twilio-email-event-webhook-timestamp")?;
                fresh(ts, now)?;
                let sig = header("x-twilio-email-event-webhook-signature")?;
                let sig = base64::engine::general_purpose::STANDARD
                    .decode(sig)
                    .map_err(|_| "the signature is not base64")?;
                let signed = [ts.as_bytes(), body].concat();
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_ASN1,
                    &self.key,
                )
                .verify(&signed, &sig)
                .map_err(|_| "the signature does not verify".into())
            }
        }
    }

    fn hmac_hex(
        &self,
        algorithm: hmac::Algorithm,
        signed: &[u8],
        given: &str,
    ) -> Result<(), String> {
        let given = hex::decode(given.trim()).map_err(|_| "the signature is not hex")?;
        self.check(algorithm, signed, &given)
    }

    fn hmac_base64(
        &self,
        algorithm: hmac::Algorithm,
        signed: &[u8],
        given: &str,
    ) -> Result<(), String> {
        let given = base64::engine::general_purpose::STANDARD
            .decode(given.trim())
            .map_err(|_| "the signature is not base64")?;
        self.check(algorithm, signed, &given)
    }

    fn check(&self, algorithm: hmac::Algorithm, signed: &[u8], given: &[u8]) -> Result<(), String> {
        hmac::verify(&hmac::Key::new(algorithm, &self.key), signed, given)
            .map_err(|_| "the signature does not match".into())
    }
}

/// Constant-time equality of two byte strings (their lengths may leak).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A signed Unix timestamp within the window of `now`.
fn fresh(ts: &str, now: u64) -> Result<(), String> {
    let ts: u64 = ts
        .trim()
        .parse()
        .map_err(|_| format!("the timestamp {ts:?} is not a number"))?;
    if ts.abs_diff(now) > TOLERANCE.as_secs() {
        return Err(format!(
            "the signed timestamp is {} s away from now",
            ts.abs_diff(now)
        ));
    }
    Ok(())
}

/// The uncompressed point of a P-256 SubjectPublicKeyInfo.
fn ec_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der).ok()?;
    let point = spki.subject_public_key.data.to_vec();
    (point.len() == 65 && point[0] == 4).then_some(point)
}

pub(super) fn build(value: &serde_json::Value, _: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    Ok(Built::Request(Box::new(VerifyWebhook::new(
        &cfg.provider,
        &cfg.secret,
        cfg.enforce,
    )?)))
}

impl RequestAction for VerifyWebhook {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let body = std::mem::replace(cx.req.body_mut(), VisitorBody::Read(Full::default()));
            let result = match Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => {
                    let bytes: Bytes = collected.to_bytes();
                    let url = ReqView::of(cx.req, cx.scheme, cx.host).url();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let verified = self.verify(cx.req.headers(), &url, &bytes, now);
                    *cx.req.body_mut() = VisitorBody::Read(Full::new(bytes));
                    verified
                }
                Err(e) => Err(format!("the body could not be read whole: {e}")),
            };
            let verified = result.is_ok();
            cx.scratch.actions.insert(
                "verify_webhook",
                map_value([("verified", cel::Value::Bool(verified))]),
            );
            let decision = if verified || !self.enforce {
                Decision::Allow
            } else {
                Decision::Block
            };
            cx.record.webhook_verification(decision);
            Ok(match result {
                Err(reason) if self.enforce => {
                    tracing::debug!(%reason, "webhook not verified");
                    Flow::Respond(crate::http::error_response(&Failure::new(
                        ErrorCode::WEBHOOK_UNVERIFIED,
                        reason,
                    )))
                }
                _ => Flow::Next,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    // The examples in each provider's own documentation.

    #[test]
    fn github_docs_example() {
        let v = VerifyWebhook::new("github", "It's a Secret to Everybody", true).unwrap();
        let h = headers(&[(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )]);
        assert_eq!(v.verify(&h, "", b"Hello, World!", 0), Ok(()));
        assert!(v.verify(&h, "", b"Hello, World?", 0).is_err());
    }

    #[test]
    fn svix_docs_example() {
        let v = VerifyWebhook::new("svix", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let h = headers(&[
            ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("svix-timestamp", "1614265330"),
            (
                "svix-signature",
                "v1,bm9ub3RhcmVhbHNpZ25hdHVyZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ]);
        assert_eq!(v.verify(&h, "", body, 1614265330), Ok(()));
        let stale = v.verify(&h, "", body, 1614265330 + 301).unwrap_err();
        assert!(stale.contains("301 s away"), "{stale}");
    }

    #[test]
    fn slack_docs_example() {
        let v = VerifyWebhook::new("slack", "8f742231b10e8888abcd99yyyzzz85a5", true).unwrap();
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let h = headers(&[
            ("x-slack-request-timestamp", "1531420618"),
            (
                "x-slack-signature",
                "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
        ]);
        assert_eq!(v.verify(&h, "", body.as_bytes(), 1531420618), Ok(()));
    }

    #[test]
    fn twilio_docs_example() {
        let v = VerifyWebhook::new("twilio", "12345", true).unwrap();
        let h = headers(&[
            ("x-twilio-signature", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        let body = "CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212";
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(v.verify(&h, url, body.as_bytes(), 0), Ok(()));
        assert!(
            v.verify(
                &h,
                "https://mycompany.com/other.php?foo=1&bar=2",
                body.as_bytes(),
                0
            )
            .is_err()
        );
    }

    #[test]
    fn unknown_providers_and_missing_secrets_are_refused() {
        assert!(
            VerifyWebhook::new("sns", "x", true)
                .err()
                .unwrap()
                .contains("not a provider")
        );
        assert!(
            VerifyWebhook::new("github", "", true)
                .err()
                .unwrap()
                .contains("secret")
        );
        assert!(
            VerifyWebhook::new("svix", "whsec_???", true)
                .err()
                .unwrap()
                .contains("base64")
        );
    }
}
