//! TLS for the agent: the client config toward the edge and toward TLS
//! upstreams, and the server config for `terminate_at: agent`.

use std::sync::{Arc, OnceLock};

use postern_net::{
    MtlsPolicy, Pem, RequireClientCert, Secret, TlsError, certified_key_from_pem, crypto_provider,
    parse_ca_bundle,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{
    config::{RootCas, UpstreamTls},
    error::TlsSetupError,
};

/// The system's trust store as OpenSSL finds it, or the files
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` name when set; read once.
pub fn host_roots() -> Result<RootCertStore, TlsSetupError> {
    static HOST: OnceLock<Result<RootCertStore, String>> = OnceLock::new();
    HOST.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _unusable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "the store is empty".to_string(), ToString::to_string);
            return Err(format!(
                "root_cas: host: no usable certificate in the system's trust store or SSL_CERT_FILE/SSL_CERT_DIR ({why})"
            ));
        }
        Ok(roots)
    })
    .clone()
    .map_err(TlsSetupError::HostRoots)
}

fn roots(root_cas: &RootCas) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match root_cas {
        RootCas::Host => return host_roots(),
        RootCas::Trusted => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        RootCas::Pem(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|source| TlsSetupError::Pem {
                    context: "root_cas: bad PEM",
                    source,
                })?;
                roots.add(cert).map_err(|source| TlsSetupError::Refused {
                    context: "root_cas",
                    source,
                })?;
            }
            if roots.is_empty() {
                return Err(TlsSetupError::NoCertificate(
                    "root_cas: the file holds no certificate",
                ));
            }
        }
    }
    Ok(roots)
}

fn client_config(root_cas: &RootCas) -> Result<ClientConfig, TlsSetupError> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(root_cas)?)
        .with_no_client_auth())
}

/// The client config for the edge's agent listener (HTTP/2 over TLS).
pub fn edge_client_config(root_cas: &RootCas) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut config = client_config(root_cas)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for an HTTPS server the Mozilla roots vouch for
/// (`postern api` to an admin API behind TLS).
pub fn https_client_config() -> Result<Arc<ClientConfig>, TlsSetupError> {
    Ok(Arc::new(client_config(&RootCas::Host)?))
}

fn chain_and_key(
    crt_pem: &[u8],
    key: &Secret,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(crt_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsSetupError::Pem {
            context: "crt: bad PEM",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(
            "crt: no certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key.expose().as_bytes()).map_err(|source| {
        TlsSetupError::Pem {
            context: "key: no private key in the file",
            source,
        }
    })?;
    Ok((certs, key))
}

/// The client config for a TLS upstream: its CA (or the system roots, or
/// nothing with `verify: false`), and our client certificate if it wants one.
pub fn upstream_client_config(
    verify: bool,
    upstream: &UpstreamTls,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?;
    let builder = if !verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(crypto_provider())))
    } else {
        let roots = match &upstream.ca_pem {
            Some(pem) => {
                roots(&RootCas::Pem(pem.clone())).map_err(|e| e.within("upstream_tls ca"))?
            }
            None => roots(&RootCas::Host)?,
        };
        builder.with_root_certificates(roots)
    };
    let config = match &upstream.crt_key {
        Some((crt, key)) => {
            let (certs, key) = chain_and_key(crt, key).map_err(|e| e.within("upstream_tls"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| TlsSetupError::Refused {
                    context: "upstream_tls crt/key",
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The server config for `terminate_at: agent`, requiring client
/// certificates from `mutual_tls_cas` when given.
pub fn agent_server_config(
    crt_pem: &[u8],
    key: &Secret,
    mutual_tls_cas: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certified = serving_key(("crt", crt_pem), ("key", key))?;
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?;
    let builder = match mutual_tls_cas {
        Some(pem) => {
            let cas = parse_ca_bundle(pem).map_err(TlsSetupError::ClientCas)?;
            let policy = Arc::new(MtlsPolicy::new(cas, Vec::new(), None));
            builder.with_client_cert_verifier(Arc::new(RequireClientCert(policy)))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_cert_resolver(Arc::new(
        rustls::sign::SingleCertAndKey::from(Arc::new(certified)),
    ))))
}

/// The certificate and key a tunnel presents (`terminate_at: agent`, or
/// sent to the edge), each with the name of where it came from, checked as a
/// server checks its own: see [`certified_key_from_pem`].
/// X.509 v1 certificates, as seed 001's script makes them, are served.
pub fn serving_key(
    (crt_name, crt_pem): (&str, &[u8]),
    (key_name, key): (&str, &Secret),
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    certified_key_from_pem(
        Pem::new(crt_name, crt_pem),
        Pem::new(key_name, key.expose().as_bytes()),
    )
}

/// Accepts any upstream certificate (`upstream_tls_verify: false`).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
