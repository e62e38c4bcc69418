//! TLS basics both sides use: the one crypto provider, PEM documents with
//! where they came from, and turning a certificate and key into a key a
//! server can present.

use std::{path::PathBuf, sync::Arc};

use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// A certificate or key that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: bad PEM data: {detail}")]
    BadPem { what: String, detail: String },
    #[error("{what}: the private key is unusable: {detail}")]
    BadKey { what: String, detail: String },
    #[error("{what}: the first certificate is not well-formed X.509: {detail}")]
    BadCertificate { what: String, detail: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("{what}: the certificate is not valid before {when}")]
    NotYetValid { what: String, when: String },
    #[error("{what}: the certificate expired on {when}")]
    Expired { what: String, when: String },
    #[error("{what}: the certificate has no DNS names to serve")]
    NoNames { what: String },
    #[error("dev CA: {0}")]
    DevCa(String),
}

/// The process-wide crypto provider (ring). Everything TLS in Postern uses it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM document and where it came from (a file name, a config key), for
/// messages.
#[derive(Debug, Clone, Copy)]
pub struct Pem<'a> {
    pub source: &'a str,
    pub bytes: &'a [u8],
}

impl<'a> Pem<'a> {
    pub fn new(source: &'a str, bytes: &'a [u8]) -> Pem<'a> {
        Pem { source, bytes }
    }
}

/// A serving certificate expiring sooner than this is logged as a warning.
const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Parses a PEM certificate chain and its private key into a key a server
/// can present, checking only what a server must: that both parse, that the
/// key belongs to the first certificate (checked first, naming both
/// sources), and that today is within the certificate's validity dates (a
/// warning when it expires within 30 days). Whether the certificate is
/// trusted is the client's business, so an X.509 v1 certificate without
/// extensions, as `openssl x509 -req` makes it, serves like any other.
pub fn certified_key_from_pem(cert: Pem<'_>, key: Pem<'_>) -> Result<CertifiedKey, TlsError> {
    use x509_parser::prelude::*;
    let certs = CertificateDer::pem_slice_iter(cert.bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what: cert.source.to_string(),
            detail: e.to_string(),
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::NoCertificate {
            what: cert.source.to_string(),
        });
    };
    let bad_key = |detail: String| TlsError::BadKey {
        what: key.source.to_string(),
        detail,
    };
    let private = PrivateKeyDer::from_pem_slice(key.bytes).map_err(|e| bad_key(e.to_string()))?;
    let (_, parsed) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| TlsError::BadCertificate {
            what: cert.source.to_string(),
            detail: e.to_string(),
        })?;
    let signing = crypto_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| bad_key(e.to_string()))?;
    let public = signing
        .public_key()
        .ok_or_else(|| bad_key("its public key cannot be derived".into()))?;
    if public.as_ref() != parsed.public_key().raw {
        return Err(TlsError::KeyMismatch {
            cert: cert.source.to_string(),
            key: key.source.to_string(),
        });
    }
    let validity = parsed.validity();
    let now = ASN1Time::now();
    if now < validity.not_before {
        return Err(TlsError::NotYetValid {
            what: cert.source.to_string(),
            when: validity.not_before.to_string(),
        });
    }
    match validity.time_to_expiration() {
        None => {
            return Err(TlsError::Expired {
                what: cert.source.to_string(),
                when: validity.not_after.to_string(),
            });
        }
        Some(left) if left < EXPIRY_WARNING => tracing::warn!(
            certificate = cert.source,
            not_after = %validity.not_after,
            "the certificate expires within 30 days"
        ),
        Some(_) => {}
    }
    Ok(CertifiedKey::new(certs, signing))
}
