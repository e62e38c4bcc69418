//! Mutual TLS: CA bundles (only real CAs), which CAs an endpoint trusts,
//! and the client-certificate verifiers built on them (the edge's, by SNI,
//! and the agent's for `terminate_at: agent`).
//!
//! webpki does not check that a trust anchor is a CA (`cA=true`), so every
//! bundle is checked here before it is trusted, whoever supplied it.
//!
//! X.509 v1 client certificates — what the `openssl x509 -req` in ngrok's
//! site-to-site guide produces — are refused by webpki outright. Postern
//! accepts a v1 *leaf* when it verifies it itself: signed directly by a
//! configured CA (signature checked with that CA's key), the issuer name is
//! that CA's subject, and it is within its validity dates. A v1 certificate
//! is never a CA or an intermediate.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{
        CertificateDer, SubjectPublicKeyInfoDer, UnixTime, pem::PemObject, pem::SectionKind,
    },
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer, x509::X509Version};

use crate::tls::crypto_provider;

/// Most CAs one endpoint may trust (ngrok's edge limit).
pub const MAX_CAS: usize = 10;

/// A certificate accepted as a CA.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCert {
    pub der: CertificateDer<'static>,
    /// Lower-case hex SHA-256 of the DER.
    pub fingerprint: String,
    pub subject: String,
    pub subject_common_name: Option<String>,
    pub issuer: String,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub key_usages: Vec<String>,
    pub extended_key_usages: Vec<String>,
}

impl fmt::Debug for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaCert({self})")
    }
}

impl fmt::Display for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} (SHA-256 {})", self.subject, self.fingerprint)
    }
}

/// Why a CA bundle was refused. Each message names the certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error("no PEM certificate data")]
    NoPemData,
    #[error("PEM block {index} is a {kind}, not a CERTIFICATE")]
    NotACertificate { index: usize, kind: String },
    #[error("bad PEM: {0}")]
    BadPem(String),
    #[error("certificate {index} cannot be parsed: {detail}")]
    Unparsable { index: usize, detail: String },
    #[error(
        "certificate {subject:?} (SHA-256 {fingerprint}) is not a CA: its basic constraints do not say cA=true (RFC 5280 4.2.1.9)"
    )]
    NotACa {
        subject: String,
        fingerprint: String,
    },
    #[error("{count} certificate authorities; at most {MAX_CAS} are allowed")]
    TooMany { count: usize },
}

/// Lower-case hex SHA-256 of a certificate's DER: how Postern names a
/// certificate in messages, headers and events.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a PEM bundle of CAs: every block a certificate, every
/// certificate a CA, at most [`MAX_CAS`].
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<CaCert>, CaError> {
    let mut cas = Vec::new();
    for (index, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).enumerate() {
        let (kind, der) = section.map_err(|e| CaError::BadPem(e.to_string()))?;
        if kind != SectionKind::Certificate {
            return Err(CaError::NotACertificate {
                index: index + 1,
                kind: format!("{kind:?}"),
            });
        }
        cas.push(ca_cert(index + 1, CertificateDer::from(der))?);
    }
    if cas.is_empty() {
        return Err(CaError::NoPemData);
    }
    if cas.len() > MAX_CAS {
        return Err(CaError::TooMany { count: cas.len() });
    }
    Ok(cas)
}

/// One certificate checked to be a CA.
pub fn ca_cert(index: usize, der: CertificateDer<'static>) -> Result<CaCert, CaError> {
    let fingerprint = fingerprint(&der);
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| CaError::Unparsable {
        index,
        detail: e.to_string(),
    })?;
    let subject = cert.subject().to_string();
    let is_ca = cert.version() == X509Version::V3
        && cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(CaError::NotACa {
            subject,
            fingerprint,
        });
    }
    let (key_usages, extended_key_usages) = usages(&cert);
    let subject_common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let issuer = cert.issuer().to_string();
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    Ok(CaCert {
        der,
        fingerprint,
        subject,
        subject_common_name,
        issuer,
        not_before,
        not_after,
        key_usages,
        extended_key_usages,
    })
}

/// A certificate's key usages and extended key usages, by ngrok's names
/// (`digital_signature`, `server_auth`, …); empty when it has none.
pub fn usages(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let key_usages = match cert.key_usage() {
        Ok(Some(ku)) => key_usage_names(ku.value),
        _ => Vec::new(),
    };
    let extended_key_usages = match cert.extended_key_usage() {
        Ok(Some(eku)) => {
            let e = &eku.value;
            let mut names = Vec::new();
            for (on, name) in [
                (e.server_auth, "server_auth"),
                (e.client_auth, "client_auth"),
                (e.code_signing, "code_signing"),
                (e.email_protection, "email_protection"),
                (e.time_stamping, "time_stamping"),
                (e.ocsp_signing, "ocsp_signing"),
                (e.any, "any"),
            ] {
                if on {
                    names.push(name.to_string());
                }
            }
            names
        }
        _ => Vec::new(),
    };
    (key_usages, extended_key_usages)
}

fn key_usage_names(ku: &x509_parser::extensions::KeyUsage) -> Vec<String> {
    let mut names = Vec::new();
    for (on, name) in [
        (ku.digital_signature(), "digital_signature"),
        (ku.non_repudiation(), "content_commitment"),
        (ku.key_encipherment(), "key_encipherment"),
        (ku.data_encipherment(), "data_encipherment"),
        (ku.key_agreement(), "key_agreement"),
        (ku.key_cert_sign(), "cert_sign"),
        (ku.crl_sign(), "crl_sign"),
        (ku.encipher_only(), "encipher_only"),
        (ku.decipher_only(), "decipher_only"),
    ] {
        if on {
            names.push(name.to_string());
        }
    }
    names
}

/// Looks CAs up by id in a store (the edge's certificate-authority store).
pub trait CaResolver: Send + Sync + 'static {
    fn get(&self, id: &str) -> Option<CaCert>;
    /// Changes whenever the store changes, so verifiers can rebuild.
    fn version(&self) -> u64;
}

/// Which CAs an endpoint trusts: certificates given inline (an agent's PEM
/// bundle) and ids in a store, looked up at each handshake so a deleted or
/// replaced CA takes effect at once.
pub struct MtlsPolicy {
    inline: Vec<CaCert>,
    ids: Vec<String>,
    resolver: Option<Arc<dyn CaResolver>>,
    built: Mutex<Option<Built>>,
}

#[derive(Clone)]
struct Built {
    version: u64,
    roots: Vec<CaCert>,
    webpki: Option<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for MtlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsPolicy")
            .field("inline", &self.inline)
            .field("ids", &self.ids)
            .finish()
    }
}

impl MtlsPolicy {
    pub fn new(
        inline: Vec<CaCert>,
        ids: Vec<String>,
        resolver: Option<Arc<dyn CaResolver>>,
    ) -> MtlsPolicy {
        MtlsPolicy {
            inline,
            ids,
            resolver,
            built: Mutex::new(None),
        }
    }

    fn current(&self) -> Built {
        let version = self.resolver.as_ref().map_or(0, |r| r.version());
        let mut built = self.built.lock().expect("mtls policy lock");
        if let Some(b) = built.as_ref()
            && b.version == version
        {
            return b.clone();
        }
        let mut roots = self.inline.clone();
        if let Some(resolver) = &self.resolver {
            roots.extend(self.ids.iter().filter_map(|id| resolver.get(id)));
        }
        let mut store = RootCertStore::empty();
        for ca in &roots {
            if let Err(e) = store.add(ca.der.clone()) {
                tracing::warn!(ca = %ca, error = %e, "CA not usable as a trust anchor");
            }
        }
        let webpki = if store.is_empty() {
            None
        } else {
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), crypto_provider())
                .build()
                .ok()
        };
        let fresh = Built {
            version,
            roots,
            webpki,
        };
        *built = Some(fresh.clone());
        fresh
    }

    /// Verifies a client chain (leaf first) against the current CAs.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        let built = self.current();
        let (_, leaf) = X509Certificate::from_der(end_entity.as_ref())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if built
            .roots
            .iter()
            .any(|ca| ca.der.as_ref() == end_entity.as_ref())
        {
            // A trusted CA presented as the client's own certificate.
            return Err(Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        if leaf.version() == X509Version::V1 {
            return verify_v1_leaf(&leaf, &built.roots, now);
        }
        let webpki = built
            .webpki
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        webpki
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
    }
}

fn verify_v1_leaf(
    leaf: &X509Certificate<'_>,
    roots: &[CaCert],
    now: UnixTime,
) -> Result<(), Error> {
    let now = now.as_secs() as i64;
    let validity = leaf.validity();
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    for ca in roots {
        let Ok((_, ca_cert)) = X509Certificate::from_der(ca.der.as_ref()) else {
            continue;
        };
        if ca_cert.subject() != leaf.issuer() {
            continue;
        }
        if leaf.verify_signature(Some(ca_cert.public_key())).is_ok() {
            return Ok(());
        }
    }
    Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
}

/// Requires a client certificate that [`MtlsPolicy`] accepts.
#[derive(Debug)]
pub struct RequireClientCert(pub Arc<MtlsPolicy>);

impl ClientCertVerifier for RequireClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Asks for a client certificate without requiring or judging it: for
/// handshakes without SNI, where the endpoint (and its CAs) is only known
/// from the Host header, so the decision is made at the HTTP layer.
#[derive(Debug)]
pub struct RequestClientCert;

impl ClientCertVerifier for RequestClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Handshake signature checks shared by both client-certificate verifiers.
mod signatures {
    use super::*;

    pub fn tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crypto_provider().signature_verification_algorithms,
        )
    }

    /// TLS 1.3, including v1 leaves: webpki cannot parse a v1 certificate,
    /// so its signature is checked with its public key directly (its chain
    /// is checked by the verifier, or at the HTTP layer).
    pub fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = crypto_provider().signature_verification_algorithms;
        if let Ok((_, leaf)) = X509Certificate::from_der(cert.as_ref())
            && leaf.version() == X509Version::V1
        {
            let spki = SubjectPublicKeyInfoDer::from(leaf.public_key().raw);
            return rustls::crypto::verify_tls13_signature_with_raw_key(
                message,
                &spki,
                dss,
                &algorithms,
            );
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
    }

    pub fn schemes() -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    #[test]
    fn bundles_accept_only_real_cas() {
        let (a, issuer) = ca("CA A");
        let (b, _) = ca("CA B");
        let bundle = parse_ca_bundle(format!("{a}{b}").as_bytes()).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[0].subject_common_name.as_deref(), Some("CA A"));
        assert_eq!(bundle[0].fingerprint.len(), 64);

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["leaf.test".into()]).unwrap();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a leaf");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let err = parse_ca_bundle(format!("{a}{}", leaf.pem()).as_bytes()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CN=a leaf") && text.contains("SHA-256") && text.contains("not a CA"),
            "{text}"
        );

        assert_eq!(
            parse_ca_bundle(b"nothing here").unwrap_err(),
            CaError::NoPemData
        );
        let key = format!("{a}{}", leaf_key.serialize_pem());
        assert!(matches!(
            parse_ca_bundle(key.as_bytes()).unwrap_err(),
            CaError::NotACertificate { index: 2, .. }
        ));
        let eleven: String = (0..11).map(|i| ca(&format!("CA {i}")).0).collect();
        assert_eq!(
            parse_ca_bundle(eleven.as_bytes()).unwrap_err(),
            CaError::TooMany { count: 11 }
        );
    }
}
