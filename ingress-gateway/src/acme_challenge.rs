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
/// TLS-ALPN-01 validation certificates by name.
#[derive(Debug, Default)]
pub struct AcmeChallenges {
    tokens: RwLock<HashMap<String, String>>,
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
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
    /// token.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        self.tokens
            .read()
            .expect("challenge lock")
            .get(token)
            .cloned()
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

    /// The validation certificate for a normalised name, if one is pending.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.certs
            .read()
            .expect("challenge lock")
            .get(name)
            .cloned()
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
}
