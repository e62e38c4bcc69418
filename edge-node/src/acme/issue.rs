//! One ACME order with `instant-acme`: the account (created once, its
//! credentials kept in the data directory), HTTP-01 answered through the
//! gateways' plain-HTTP listeners, TLS-ALPN-01 through their HTTPS
//! listeners (this node's answer is gossiped, and the CA is asked to
//! validate once every node answers it), or DNS-01 through the operator's
//! hook, the key (ECDSA P-256 or RSA 2048) and CSR made here, the chain
//! fetched. No JOSE of our own.

use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use postern_ingress::{AcmeChallenges, IdpHttp};
use tokio_util::task::TaskTracker;

use super::{
    AcmeConfig, AcmeError, Challenge, DnsHook,
    shared::{AcmeAnswer, answered_everywhere},
};
use crate::cluster::{ClusterNode, KeyType};

/// How long the DNS hook may take to publish or withdraw a record.
pub(super) const HOOK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one request to the CA may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the CA may take to validate and to issue.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// `instant-acme`'s HTTP over the edge's own outbound client (hyper and
/// tokio-rustls with ring, a bound on every call, no redirects), so ACME
/// brings no second TLS stack.
struct EdgeHttp(IdpHttp);

impl HttpClient for EdgeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes().to_vec())
                .unwrap_or_else(|never| match never {});
            let response = client
                .send(http::Request::from_parts(parts, body))
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            Ok(BytesResponse::from(
                response.map(|body| Full::new(Bytes::from(body))),
            ))
        })
    }
}

/// The ACME account, from its stored credentials or created now.
pub(super) async fn account(config: &AcmeConfig, dir: &Path) -> Result<Account, AcmeError> {
    let http = || Box::new(EdgeHttp(IdpHttp::new(&config.ca_bundle, REQUEST_TIMEOUT)));
    let digest = ring::digest::digest(&ring::digest::SHA256, config.directory_url.as_bytes());
    let path = dir.join(format!("account-{}.json", &hex::encode(digest)[..16]));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|e| AcmeError::Stored {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        return Ok(Account::builder_with_http(http())
            .from_credentials(credentials)
            .await?);
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let eab = config
        .eab_hmac()
        .map(|(kid, key)| ExternalAccountKey::new(kid, &key));
    let (account, credentials) = Account::builder_with_http(http())
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory_url.clone(),
            eab.as_ref(),
        )
        .await?;
    let json = serde_json::to_string(&credentials).expect("credentials serialise");
    super::store::write_private(&path, json.as_bytes())?;
    tracing::info!(directory = %config.directory_url, account = account.id(), "ACME account created");
    Ok(account)
}

/// A certificate chain and its key, PEM.
pub(super) struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Where an order's challenge answers go: this node's gateway, and the
/// cluster's gossip for the other nodes' gateways.
pub(super) struct Answering<'a> {
    pub challenges: &'a Arc<AcmeChallenges>,
    pub cluster: &'a Arc<ClusterNode>,
    /// Where withdrawals run once the order ends (a drop cannot await).
    pub cleanups: &'a TaskTracker,
}

/// Orders a certificate for `domain`, answering `kind` on every node's
/// gateway; a wildcard, and every name when `kind` is DNS-01, through
/// `dns_hook`.
pub(super) async fn order(
    account: &Account,
    answering: Answering<'_>,
    (kind, dns_hook): (Challenge, Option<&DnsHook>),
    domain: &str,
    key_type: KeyType,
) -> Result<Issued, AcmeError> {
    let challenges = answering.challenges;
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut answers = Answers {
        challenges: challenges.clone(),
        cluster: answering.cluster.clone(),
        cleanups: answering.cleanups.clone(),
        http01: Vec::new(),
        tls_alpn01: Vec::new(),
        gossiped: Vec::new(),
        dns01: Vec::new(),
    };
    let kind = if domain.starts_with("*.") {
        Challenge::Dns01
    } else {
        kind
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(AcmeError::Authorization(format!("{other:?}"))),
        }
        let (challenge_type, name) = match kind {
            Challenge::Http01 => (ChallengeType::Http01, "http-01"),
            Challenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
            Challenge::Dns01 => (ChallengeType::Dns01, "dns-01"),
        };
        let mut challenge = authz
            .challenge(challenge_type)
            .ok_or(AcmeError::NoChallenge(name))?;
        let key_authorization = challenge.key_authorization();
        match kind {
            Challenge::Http01 => {
                challenges.insert_http01(&challenge.token, key_authorization.as_str());
                answers.http01.push(challenge.token.clone());
                answers
                    .share(AcmeAnswer::Http01 {
                        name: domain.to_string(),
                        token: challenge.token.clone(),
                        key_authorization: key_authorization.as_str().to_string(),
                    })
                    .await?;
            }
            Challenge::TlsAlpn01 => {
                let digest = key_authorization.digest();
                challenges
                    .insert_tls_alpn01(domain, digest.as_ref())
                    .map_err(AcmeError::TlsAlpn01)?;
                answers.tls_alpn01.push(domain.to_string());
                answers
                    .share(AcmeAnswer::TlsAlpn01 {
                        name: domain.to_string(),
                        digest: hex::encode(digest.as_ref()),
                    })
                    .await?;
            }
            Challenge::Dns01 => {
                let hook = dns_hook.ok_or(AcmeError::NoDnsHook)?;
                let Identifier::Dns(base) = challenge.identifier().identifier else {
                    return Err(AcmeError::NoChallenge("dns-01 for a DNS name"));
                };
                let record = format!("_acme-challenge.{base}.");
                let value = key_authorization.dns_value();
                run_hook(hook, "present", &record, &value).await?;
                answers.dns01.push((hook.clone(), record, value));
                // Time for the record to reach the DNS servers the CA asks.
                tokio::time::sleep(hook.wait).await;
            }
        }
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&POLL).await?;
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| format!("{status:?}"));
        return Err(AcmeError::NotReady(detail));
    }
    drop(answers);
    let key = new_key(key_type)?;
    let csr = rcgen::CertificateParams::new(vec![domain.to_string()])
        .and_then(|params| params.serialize_request(&key))
        .map_err(|e| AcmeError::Key(e.to_string()))?;
    order.finalize_csr(csr.der().as_ref()).await?;
    let chain_pem = order.poll_certificate(&POLL).await?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// Withdraws the order's answers (HTTP-01 tokens, TLS-ALPN-01 names)
/// from the gateway and from the gossip, and has the DNS hook withdraw its
/// TXT records, however the order ends.
struct Answers {
    challenges: Arc<AcmeChallenges>,
    cluster: Arc<ClusterNode>,
    /// Where the DNS hook's cleanups and the gossip's withdrawals run (a
    /// drop cannot await them).
    cleanups: TaskTracker,
    http01: Vec<String>,
    tls_alpn01: Vec<String>,
    /// The ids of the answers gossiped to the other nodes.
    gossiped: Vec<String>,
    /// The hook, the record's name and its value.
    dns01: Vec<(DnsHook, String, String)>,
}

impl Answers {
    /// Gossips `answer` to the other nodes and waits until each live one
    /// answers it too (or [`super::shared::ANSWER_WAIT`]): the CA may ask
    /// any of them.
    async fn share(&mut self, answer: AcmeAnswer) -> Result<(), AcmeError> {
        let id = answer.id();
        self.cluster
            .publish_local(&id, &answer)
            .await
            .map_err(|f| AcmeError::Gossip {
                what: format!("the challenge answer {id}"),
                reason: f.detail,
            })?;
        self.gossiped.push(id.clone());
        let missing = answered_everywhere(&self.cluster, &id).await;
        if !missing.is_empty() {
            tracing::warn!(
                answer = id,
                ?missing,
                "not every node answers the challenge yet; asking the CA anyway"
            );
        }
        Ok(())
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        for token in &self.http01 {
            self.challenges.remove_http01(token);
        }
        for name in &self.tls_alpn01 {
            self.challenges.remove_tls_alpn01(name);
        }
        let gossiped = std::mem::take(&mut self.gossiped);
        if !gossiped.is_empty() {
            let cluster = self.cluster.clone();
            self.cleanups.spawn(async move {
                for id in gossiped {
                    cluster.withdraw_local::<AcmeAnswer>(&id).await;
                }
            });
        }
        for (hook, record, value) in self.dns01.drain(..) {
            self.cleanups.spawn(async move {
                if let Err(e) = run_hook(&hook, "cleanup", &record, &value).await {
                    tracing::warn!(error = %e, "the DNS-01 record was not withdrawn");
                }
            });
        }
    }
}

/// Runs the DNS hook: `<argv…> <action> <record> <value>`, as lego's
/// `exec` provider does, bounded by [`HOOK_TIMEOUT`].
async fn run_hook(
    hook: &DnsHook,
    action: &str,
    record: &str,
    value: &str,
) -> Result<(), AcmeError> {
    let failed = |reason: String| AcmeError::DnsHook {
        action: action.to_string(),
        record: record.to_string(),
        reason,
    };
    let mut command = tokio::process::Command::new(&hook.argv[0]);
    command
        .args(&hook.argv[1..])
        .args([action, record, value])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(HOOK_TIMEOUT, command.output())
        .await
        .map_err(|_| failed(format!("no exit within {HOOK_TIMEOUT:?}")))?
        .map_err(|e| failed(format!("{} could not run: {e}", hook.argv[0])))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    Err(failed(match last {
        Some(line) => format!("{}: {}", output.status, line.trim()),
        None => output.status.to_string(),
    }))
}

/// A new certificate key: ECDSA P-256 with ring, RSA 2048 with the `rsa`
/// crate (ring cannot make RSA keys; it signs with them).
fn new_key(key_type: KeyType) -> Result<rcgen::KeyPair, AcmeError> {
    let key = |e: &dyn std::fmt::Display| AcmeError::Key(e.to_string());
    match key_type {
        KeyType::Ecdsa => {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| key(&e))
        }
        KeyType::Rsa => {
            use rsa::pkcs8::EncodePrivateKey;
            let private =
                rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| key(&e))?;
            let der = private.to_pkcs8_der().map_err(|e| key(&e))?;
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
                &rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes()),
                &rcgen::PKCS_RSA_SHA256,
            )
            .map_err(|e| key(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_types_make_a_csr() {
        for key_type in [KeyType::Ecdsa, KeyType::Rsa] {
            let key = new_key(key_type).unwrap();
            let csr = rcgen::CertificateParams::new(vec!["app.example.test".into()])
                .unwrap()
                .serialize_request(&key)
                .unwrap();
            assert!(!csr.der().is_empty());
            let expected = match key_type {
                KeyType::Ecdsa => &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyType::Rsa => &rcgen::PKCS_RSA_SHA256,
            };
            assert!(key.is_compatible(expected), "{key_type:?}");
        }
    }
}
