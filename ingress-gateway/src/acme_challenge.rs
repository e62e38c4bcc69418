//! ACME challenge answers, while the edge orders a certificate:
//!
//! - HTTP-01 (RFC 8555 §8.3): the CA fetches
//!   `http://<name>/.well-known/acme-challenge/<token>` from the plain-HTTP
//!   listener and must get the key authorization back;
//! - TLS-ALPN-01 (RFC 8737): the CA opens TLS to `<name>:443` offering
//!   only the `acme-tls/1` protocol and must be shown a self-signed
//!   certificate for the name carrying the key authorization's SHA-256.
//!
//! The edge's ACME client puts answers here; the gateway gives them before
//! any routing, so a name with no endpoint bound can still be validated.
//! In a cluster the CA may reach any node, so the answers of an order
//! another node runs are kept here too ([`AcmeChallenges::replace_remote`]),
//! apart from this node's own.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use postern_net::{Pem, certified_key_from_pem};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::sign::CertifiedKey;

/// The path prefix HTTP-01 requests use.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Pending challenges: HTTP-01 tokens with their key authorizations, and
/// TLS-ALPN-01 validation certificates by name; this node's orders' and
/// other nodes'.
#[derive(Debug, Default)]
pub struct AcmeChallenges {
    tokens: RwLock<HashMap<String, String>>,
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    remote: RwLock<Remote>,
}

/// The answers of orders other nodes of the cluster run.
#[derive(Debug, Default)]
struct Remote {
    tokens: HashMap<String, String>,
    /// By name: the key authorization's digest and the certificate made
    /// from it (made again only when the digest changes).
    certs: HashMap<String, (Vec<u8>, Arc<CertifiedKey>)>,
}

impl AcmeChallenges {
    /// Answers HTTP-01 `token` with `key_authorization` until
    /// [`Self::remove_http01`].
    pub fn insert_http01(&self, token: &str, key_authorization: &str) {
        self.tokens
            .write()
            .expect("challenge lock")
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove_http01(&self, token: &str) {
        self.tokens.write().expect("challenge lock").remove(token);
    }

    /// The key authorization for a request path, if it asks for a pending
    /// token (this node's or another's).
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        let own = self
            .tokens
            .read()
            .expect("challenge lock")
            .get(token)
            .cloned();
        own.or_else(|| {
            let remote = self.remote.read().expect("challenge lock");
            remote.tokens.get(token).cloned()
        })
    }

    /// Shows `name`'s TLS-ALPN-01 validation certificate, made from the
    /// key authorization's SHA-256 `digest`, to `acme-tls/1` handshakes
    /// until [`Self::remove_tls_alpn01`].
    pub fn insert_tls_alpn01(&self, name: &str, digest: &[u8]) -> Result<(), String> {
        let key = Arc::new(validation_certificate(name, digest)?);
        self.certs
            .write()
            .expect("challenge lock")
            .insert(name.to_string(), key);
        Ok(())
    }

    pub fn remove_tls_alpn01(&self, name: &str) {
        self.certs.write().expect("challenge lock").remove(name);
    }

    /// The validation certificate for a normalised name, if one is
    /// pending (this node's or another's).
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let own = self
            .certs
            .read()
            .expect("challenge lock")
            .get(name)
            .cloned();
        own.or_else(|| {
            let remote = self.remote.read().expect("challenge lock");
            remote.certs.get(name).map(|(_, key)| key.clone())
        })
    }

    /// Makes the answers of other nodes' orders exactly these: HTTP-01
    /// `(token, key authorization)` pairs and TLS-ALPN-01 `(name, digest)`
    /// pairs. Returns the TLS-ALPN-01 names whose certificate could not be
    /// made, with why; the rest are answered.
    pub fn replace_remote(
        &self,
        http01: Vec<(String, String)>,
        tls_alpn01: Vec<(String, Vec<u8>)>,
    ) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        let mut remote = self.remote.write().expect("challenge lock");
        let mut certs = HashMap::new();
        for (name, digest) in tls_alpn01 {
            let kept = remote
                .certs
                .remove(&name)
                .filter(|(made_from, _)| *made_from == digest);
            let key = match kept {
                Some((_, key)) => key,
                None => match validation_certificate(&name, &digest) {
                    Ok(key) => Arc::new(key),
                    Err(e) => {
                        failed.push((name, e));
                        continue;
                    }
                },
            };
            certs.insert(name, (digest, key));
        }
        remote.certs = certs;
        remote.tokens = http01.into_iter().collect();
        failed
    }
}

/// RFC 8737 §3: a self-signed certificate whose only name is `name`, with
/// the critical `acmeIdentifier` extension holding `digest`.
fn validation_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let failed = |e: rcgen::Error| format!("the TLS-ALPN-01 certificate: {e}");
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(failed)?;
    params
        .custom_extensions
        .push(CustomExtension::new_acme_identifier(digest));
    let key = KeyPair::generate().map_err(failed)?;
    let cert = params.self_signed(&key).map_err(failed)?;
    certified_key_from_pem(
        Pem::new("the TLS-ALPN-01 certificate", cert.pem().as_bytes()),
        Pem::new("its key", key.serialize_pem().as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_pending_tokens_under_the_prefix() {
        let challenges = AcmeChallenges::default();
        challenges.insert_http01("tok1", "tok1.thumb");
        assert_eq!(
            challenges
                .answer("/.well-known/acme-challenge/tok1")
                .as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(challenges.answer("/.well-known/acme-challenge/tok2"), None);
        assert_eq!(challenges.answer("/tok1"), None);
        challenges.remove_http01("tok1");
        assert_eq!(challenges.answer("/.well-known/acme-challenge/tok1"), None);
    }

    #[test]
    fn tls_alpn01_certificate_names_the_host_and_carries_the_digest() {
        use x509_parser::prelude::*;
        let challenges = AcmeChallenges::default();
        let digest = [7u8; 32];
        challenges
            .insert_tls_alpn01("app.example.test", &digest)
            .unwrap();
        let key = challenges.tls_alpn01("app.example.test").unwrap();
        assert!(challenges.tls_alpn01("other.example.test").is_none());
        let (_, cert) = X509Certificate::from_der(key.cert[0].as_ref()).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31: critical, an OCTET
        // STRING of the digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
        assert_eq!(
            crate::certificate_names(&key.cert[0]),
            vec!["app.example.test".to_string()]
        );
        challenges.remove_tls_alpn01("app.example.test");
        assert!(challenges.tls_alpn01("app.example.test").is_none());
    }

    #[test]
    fn other_nodes_answers_are_replaced_whole_and_kept_apart() {
        let challenges = AcmeChallenges::default();
        challenges.insert_http01("own", "own.thumb");
        let failed = challenges.replace_remote(
            vec![("theirs".into(), "theirs.thumb".into())],
            vec![("alpn.example.test".into(), vec![1u8; 32])],
        );
        assert!(failed.is_empty(), "{failed:?}");
        let path = |t: &str| format!("{HTTP01_PREFIX}{t}");
        assert_eq!(
            challenges.answer(&path("own")).as_deref(),
            Some("own.thumb")
        );
        assert_eq!(
            challenges.answer(&path("theirs")).as_deref(),
            Some("theirs.thumb")
        );
        let first = challenges.tls_alpn01("alpn.example.test").unwrap();
        // The same digest again keeps the certificate made for it.
        challenges.replace_remote(
            Vec::new(),
            vec![("alpn.example.test".into(), vec![1u8; 32])],
        );
        let again = challenges.tls_alpn01("alpn.example.test").unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(challenges.answer(&path("theirs")), None);
        // Replacing the remote answers leaves this node's own alone.
        challenges.replace_remote(Vec::new(), Vec::new());
        assert!(challenges.tls_alpn01("alpn.example.test").is_none());
        assert_eq!(
            challenges.answer(&path("own")).as_deref(),
            Some("own.thumb")
        );
    }
}
