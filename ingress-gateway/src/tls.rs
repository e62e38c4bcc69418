//! Certificates the edge presents: configured certificates (exact or
//! wildcard names, taken from the certificate's DNS SANs), and in dev mode a
//! local CA that issues a certificate for any routed name on first use.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use postern_net::{Pem, TlsError, certified_key_from_pem, crypto_provider};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::CertificateDer;

use crate::router::{DomainPattern, Router, normalize_name};

/// The DNS names (SANs, else the CN) a leaf certificate is valid for.
pub fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    if names.is_empty()
        && let Some(cn) = cert.subject().iter_common_name().next()
        && let Ok(cn) = cn.as_str()
    {
        names.push(cn.to_string());
    }
    names
}

/// A local certificate authority for `--dev`: created once in the data
/// directory, trusted by agents and clients with `--root-cas` / `--cacert`.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl DevCa {
    pub const CERT_FILE: &'static str = "dev-ca.pem";
    pub const KEY_FILE: &'static str = "dev-ca-key.pem";

    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<DevCa, TlsError> {
        let cert_path = dir.join(Self::CERT_FILE);
        let key_path = dir.join(Self::KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::DevCa(e.to_string()))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| TlsError::DevCa(e.to_string()))?;
            return Ok(DevCa { issuer, cert_pem });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| TlsError::DevCa(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Postern dev CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = KeyPair::generate().map_err(|e| TlsError::DevCa(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::DevCa(e.to_string()))?;
        let cert_pem = cert.pem();
        fs::write(&key_path, key.serialize_pem()).map_err(io(&key_path))?;
        fs::write(&cert_path, &cert_pem).map_err(io(&cert_path))?;
        let issuer = Issuer::new(params, key);
        Ok(DevCa { issuer, cert_pem })
    }

    /// A CA whose Ed25519 key is `seed`: every holder of the seed makes the
    /// same key and, Ed25519 signatures being deterministic, the same
    /// certificate byte for byte, without exchanging either. For the
    /// internal CAs of a cluster, derived from the cluster key.
    pub fn derived(common_name: &str, seed: &[u8; 32]) -> Result<DevCa, TlsError> {
        // RFC 8410 PKCS#8 v1 for an Ed25519 private key: this prefix, then
        // the 32-byte seed.
        const PKCS8_PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(seed);
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(der),
            &rcgen::PKCS_ED25519,
        )
        .map_err(|e| TlsError::DevCa(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| TlsError::DevCa(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        params.serial_number = Some(rcgen::SerialNumber::from(1u64));
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::DevCa(e.to_string()))?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `names` (for servers, and for clients where
    /// both ends use it, as nodes do); returns (chain PEM, key PEM).
    pub fn issue_pem(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| TlsError::DevCa(e.to_string()))?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = KeyPair::generate().map_err(|e| TlsError::DevCa(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::DevCa(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issue(&self, name: &str) -> Result<CertifiedKey, TlsError> {
        let (cert, key) = self.issue_pem(&[name.to_string()])?;
        certified_key_from_pem(
            Pem::new(name, cert.as_bytes()),
            Pem::new(name, key.as_bytes()),
        )
    }
}

/// A certificate to serve, with its key and the DNS names it carries.
#[derive(Clone, Debug)]
pub struct ServingCert {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<DomainPattern>,
}

impl ServingCert {
    /// Parses and checks a certificate and its key as
    /// [`certified_key_from_pem`] does; one without DNS names is refused.
    pub fn from_pem(cert: Pem<'_>, key: Pem<'_>) -> Result<ServingCert, TlsError> {
        let key = Arc::new(certified_key_from_pem(cert, key)?);
        let names: Vec<DomainPattern> = certificate_names(&key.cert[0])
            .iter()
            .filter_map(|n| DomainPattern::parse(n).ok())
            .collect();
        if names.is_empty() {
            return Err(TlsError::NoNames {
                what: cert.source.to_string(),
            });
        }
        Ok(ServingCert { key, names })
    }
}

/// Whether a certificate carrying `names` is valid for every name of
/// `domain` by the usual rule (RFC 6125): an exact name is covered by the
/// same name or by `*.` over its parent (one label, not more); a wildcard
/// only by the same wildcard.
pub fn names_cover(names: &[DomainPattern], domain: &DomainPattern) -> bool {
    names.iter().any(|name| {
        name == domain
            || matches!((name, domain), (DomainPattern::Wildcard(suffix), DomainPattern::Exact(exact))
                if exact.split_once('.').is_some_and(|(_, parent)| parent == suffix))
    })
}

/// Where a served certificate comes from. When certificates of two
/// sources carry the same name, the later source here is served: an
/// uploaded certificate over an ACME one over a file of the config. A
/// certificate of `Named` is looked up first, for the names it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertSource {
    /// `[[tls.certificates]]`, read at start-up and on SIGHUP.
    Config,
    /// Issued by the ACME CA of `[acme]`.
    Acme,
    /// Uploaded through `/tls_certificates`.
    Uploaded,
    /// An uploaded certificate a reserved domain names (`certificate_id`),
    /// with the reserved domain as its only name: served for the domain's
    /// names over any other source's, more specific ones included.
    Named,
}

#[derive(Default)]
struct Served {
    /// Every certificate by source and key (a file, a name, an id).
    certs: BTreeMap<(CertSource, String), ServingCert>,
    /// Built from `certs` of [`CertSource::Named`]: the certificate for
    /// each reserved domain naming one.
    named: Router<Arc<CertifiedKey>>,
    /// Built from the other `certs`: the certificate for each name.
    router: Router<Arc<CertifiedKey>>,
}

impl Served {
    fn rebuild(&mut self) {
        let (mut named, mut router) = (Router::default(), Router::default());
        for ((source, _), cert) in &self.certs {
            let router = match source {
                CertSource::Named => &mut named,
                _ => &mut router,
            };
            for name in &cert.names {
                router.remove(name);
                let _ = router.insert(name, cert.key.clone());
            }
        }
        (self.named, self.router) = (named, router);
    }

    /// The certificate for a normalised name: a reserved domain's named
    /// one, else the most specific one carrying it.
    fn lookup(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        self.named.lookup(name).or_else(|| self.router.lookup(name))
    }
}

/// Picks the certificate for a TLS handshake by SNI.
pub struct CertStore {
    served: RwLock<Served>,
    dev_ca: Option<DevCa>,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field(
                "served",
                &self.served.read().map(|s| s.certs.len()).unwrap_or(0),
            )
            .field("dev_ca", &self.dev_ca.is_some())
            .finish()
    }
}

impl CertStore {
    pub fn new(dev_ca: Option<DevCa>) -> CertStore {
        CertStore {
            served: RwLock::default(),
            dev_ca,
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// Serves `cert` as `source`'s `key` (replacing what it served) for
    /// every DNS name it carries; new handshakes get it at once.
    pub fn set(&self, source: CertSource, key: &str, cert: &ServingCert) {
        let mut served = self.served.write().expect("cert store lock");
        served.certs.insert((source, key.to_string()), cert.clone());
        served.rebuild();
    }

    /// Makes `source`'s certificates exactly `certs`, by key.
    pub fn replace(&self, source: CertSource, certs: Vec<(String, ServingCert)>) {
        let mut served = self.served.write().expect("cert store lock");
        served.certs.retain(|(s, _), _| *s != source);
        served
            .certs
            .extend(certs.into_iter().map(|(key, cert)| ((source, key), cert)));
        served.rebuild();
    }

    /// `source`'s certificates, by key.
    pub fn certs(&self, source: CertSource) -> Vec<(String, ServingCert)> {
        let served = self.served.read().expect("cert store lock");
        served
            .certs
            .iter()
            .filter(|((s, _), _)| *s == source)
            .map(|((_, key), cert)| (key.clone(), cert.clone()))
            .collect()
    }

    /// The certificate `source` serves as `key`, if any.
    pub fn get(&self, source: CertSource, key: &str) -> Option<Arc<CertifiedKey>> {
        let served = self.served.read().expect("cert store lock");
        served
            .certs
            .get(&(source, key.to_string()))
            .map(|cert| cert.key.clone())
    }

    /// Whether a certificate of any source covers a normalised name (the
    /// dev CA's aside).
    pub fn serves(&self, name: &str) -> bool {
        let served = self.served.read().expect("cert store lock");
        served.lookup(name).is_some()
    }

    /// The certificate for a normalised name, issuing one in dev mode.
    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = self.served.read().expect("cert store lock").lookup(name) {
            return Some(key.clone());
        }
        let ca = self.dev_ca.as_ref()?;
        let mut issued = self.issued.lock().expect("cert store lock");
        if let Some(key) = issued.get(name) {
            return Some(key.clone());
        }
        match ca.issue(name) {
            Ok(key) => {
                let key = Arc::new(key);
                issued.insert(name.to_string(), key.clone());
                Some(key)
            }
            Err(e) => {
                tracing::error!(name, error = %e, "dev CA could not issue a certificate");
                None
            }
        }
    }

    pub fn dev_ca(&self) -> Option<&DevCa> {
        self.dev_ca.as_ref()
    }
}

/// Resolves by the handshake's SNI through a [`CertStore`].
#[derive(Debug)]
pub struct StoreResolver(pub Arc<CertStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = normalize_name(hello.server_name()?).ok()?;
        self.0.lookup(&name)
    }
}

/// A server config presenting certificates from `resolver`, offering
/// `alpn`, and checking client certificates with `client_auth` if given.
pub fn build_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    client_auth: Option<Arc<dyn ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let builder = match client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A server config that picks certificates from `store` by SNI.
pub fn server_config(store: Arc<CertStore>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    build_server_config(Arc::new(StoreResolver(store)), None, alpn)
}

/// A server config that always presents one certificate.
pub fn single_cert_config(key: Arc<CertifiedKey>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    build_server_config(
        Arc::new(rustls::sign::SingleCertAndKey::from(key)),
        None,
        alpn,
    )
}

/// Presents the certificate for one fixed name, whatever the handshake
/// asks: for clients that send no SNI.
#[derive(Debug)]
pub struct FixedNameResolver {
    pub store: Arc<CertStore>,
    pub name: String,
}

impl ResolvesServerCert for FixedNameResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.lookup(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn dev_ca_persists_and_issues() {
        let dir = std::env::temp_dir().join(format!("postern-devca-{}", rand::random::<u64>()));
        let ca = DevCa::load_or_create(&dir).unwrap();
        let again = DevCa::load_or_create(&dir).unwrap();
        assert_eq!(
            ca.cert_pem(),
            again.cert_pem(),
            "the CA is reused, not regenerated"
        );
        let store = CertStore::new(Some(again));
        let key = store.lookup("app.example.test").unwrap();
        assert_eq!(
            certificate_names(&key.cert[0]),
            vec!["app.example.test".to_string()]
        );
        assert!(
            Arc::ptr_eq(&key, &store.lookup("app.example.test").unwrap()),
            "cached"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn derived_ca_is_the_same_everywhere_and_verifies_its_leaves() {
        let seed = [7u8; 32];
        let a = DevCa::derived("Postern test CA", &seed).unwrap();
        let b = DevCa::derived("Postern test CA", &seed).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem(), "byte for byte");
        let other = DevCa::derived("Postern test CA", &[8u8; 32]).unwrap();
        assert_ne!(a.cert_pem(), other.cert_pem());
        // A leaf issued by one copy chains to the other copy's certificate.
        let (leaf, _) = b.issue_pem(&["node.example.test".into()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca_der =
            rustls::pki_types::CertificateDer::from_pem_slice(a.cert_pem().as_bytes()).unwrap();
        roots.add(ca_der).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crypto_provider(),
        )
        .build()
        .unwrap();
        let leaf = rustls::pki_types::CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("node.example.test").unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the leaf chains to the derived CA");
    }

    #[test]
    fn certificate_names_cover_by_the_usual_rule() {
        let names = |raw: &[&str]| -> Vec<DomainPattern> {
            raw.iter()
                .map(|n| DomainPattern::parse(n).unwrap())
                .collect()
        };
        let domain = |raw| DomainPattern::parse(raw).unwrap();
        let wildcard = names(&["*.example.test"]);
        assert!(names_cover(&wildcard, &domain("app.example.test")));
        assert!(names_cover(&wildcard, &domain("*.example.test")));
        assert!(
            !names_cover(&wildcard, &domain("a.b.example.test")),
            "one label only"
        );
        assert!(!names_cover(&wildcard, &domain("example.test")));
        assert!(!names_cover(&wildcard, &domain("*.a.example.test")));
        let exact = names(&["app.example.test", "www.example.test"]);
        assert!(names_cover(&exact, &domain("www.example.test")));
        assert!(
            !names_cover(&exact, &domain("*.example.test")),
            "a wildcard needs a wildcard"
        );
    }

    #[test]
    fn a_named_certificate_wins_for_its_domain() {
        let ca = DevCa::derived("Postern test CA", &[9u8; 32]).unwrap();
        let serving = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let (cert, key) = ca.issue_pem(&names).unwrap();
            ServingCert::from_pem(
                Pem::new("cert", cert.as_bytes()),
                Pem::new("key", key.as_bytes()),
            )
            .unwrap()
        };
        let store = CertStore::new(None);
        let exact = serving(&["app.example.test"]);
        let wildcard = serving(&["*.example.test"]);
        store.set(CertSource::Uploaded, "exact", &exact);
        store.set(CertSource::Config, "wildcard", &wildcard);
        let served = |name| store.lookup(name).unwrap();
        assert!(
            Arc::ptr_eq(&served("app.example.test"), &exact.key),
            "most specific"
        );
        // A reserved domain `*.example.test` names the wildcard one: it
        // wins under the domain, more specific names included.
        let named = ServingCert {
            names: vec![DomainPattern::Wildcard("example.test".into())],
            ..wildcard.clone()
        };
        store.set(CertSource::Named, "rd_1", &named);
        assert!(Arc::ptr_eq(&served("app.example.test"), &wildcard.key));
        assert!(store.serves("other.example.test"));
        store.replace(CertSource::Named, Vec::new());
        assert!(
            Arc::ptr_eq(&served("app.example.test"), &exact.key),
            "detached"
        );
    }

    #[test]
    fn configured_wildcard_certificates() {
        let dir = std::env::temp_dir().join(format!("postern-devca-{}", rand::random::<u64>()));
        let ca = DevCa::load_or_create(&dir).unwrap();
        let (cert, key) = ca.issue_pem(&["*.c1.example.test".into()]).unwrap();
        let store = CertStore::new(None);
        let serving = ServingCert::from_pem(
            Pem::new("wildcard", cert.as_bytes()),
            Pem::new("wildcard key", key.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            serving.names,
            vec![DomainPattern::Wildcard("c1.example.test".into())]
        );
        store.set(CertSource::Config, "wildcard.pem", &serving);
        assert!(store.lookup("app.c1.example.test").is_some());
        assert!(
            store.lookup("app.example.test").is_none(),
            "no dev CA: nothing issued"
        );
        let err =
            ServingCert::from_pem(Pem::new("bad", b"not pem"), Pem::new("key", key.as_bytes()))
                .unwrap_err();
        assert!(err.to_string().contains("bad: no PEM certificate"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
