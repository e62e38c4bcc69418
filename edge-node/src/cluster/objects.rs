//! Cluster objects of the admin API besides CAs and credentials, in
//! ngrok's shapes: bot users (who owns credentials), reserved domains
//! (exclusive names) and agent ingresses (the names agents connect to,
//! one per region), and event subscriptions.

use std::path::Path;

use postern_config_sync::Kind;
use postern_events::{ApiSubscription, Subscription};
use postern_ingress::{DomainPattern, ServingCert, certificate_names};
use postern_net::{Pem, Secret, TlsError};
use postern_proto::{ErrorCode, Failure};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};

/// A service account owning credentials (ngrok's bot user). Tokens of an
/// inactive or deleted bot user are refused everywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BotUser {
    pub name: String,
    pub active: bool,
    pub created_at: String,
}

impl Kind for BotUser {
    const KIND: &'static str = "bot_user";
}

/// A name (and everything under it) that only one owner's agents may
/// bind: an exact domain or a `*.` wildcard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReservedDomain {
    pub domain: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// The bot user whose credentials may bind it; `None`: only tokens
    /// without an owner (the config file's, and credentials without one).
    #[serde(default)]
    pub owner_id: Option<String>,
    pub created_at: String,
    /// ngrok's `certificate_management_policy`: the edge orders and renews
    /// the name's certificate from the ACME CA of `[acme]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_management_policy: Option<CertificatePolicy>,
    /// ngrok's `certificate_id`: the uploaded [`TlsCertificate`] every
    /// node serves for the domain's names, over any other certificate
    /// carrying them. Never set with a `certificate_management_policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
}

/// How a reserved domain's certificate is managed (ngrok's shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificatePolicy {
    /// `letsencrypt`, ngrok's only authority: here, the CA of `[acme]`.
    pub authority: String,
    pub private_key_type: KeyType,
}

/// The certificate key an ACME order makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// ECDSA P-256.
    Ecdsa,
    /// RSA 2048.
    Rsa,
}

impl CertificatePolicy {
    /// Checks a policy as the API gives it (ngrok's defaults: authority
    /// `letsencrypt`, key `default_key`: ECDSA for reserved domains, RSA
    /// for agent ingresses); an error names the field.
    pub fn parse(
        authority: Option<&str>,
        private_key_type: Option<&str>,
        default_key: KeyType,
    ) -> Result<CertificatePolicy, Failure> {
        let field = |name: &str| format!("certificate_management_policy.{name}");
        let authority = match authority.unwrap_or("letsencrypt") {
            "letsencrypt" => "letsencrypt".to_string(),
            other => {
                return Err(bad(
                    &field("authority"),
                    format!("{other:?}: the only authority is \"letsencrypt\""),
                ));
            }
        };
        let private_key_type = match private_key_type {
            None => default_key,
            Some("ecdsa") => KeyType::Ecdsa,
            Some("rsa") => KeyType::Rsa,
            Some(other) => {
                return Err(bad(
                    &field("private_key_type"),
                    format!("{other:?}: \"ecdsa\" or \"rsa\""),
                ));
            }
        };
        Ok(CertificatePolicy {
            authority,
            private_key_type,
        })
    }
}

impl Kind for ReservedDomain {
    const KIND: &'static str = "reserved_domain";
}

impl ReservedDomain {
    /// Whether binding `name` falls under this reservation: the name
    /// itself, or anything below it.
    pub fn covers(&self, name: &DomainPattern) -> bool {
        match DomainPattern::parse(&self.domain) {
            Ok(reserved @ DomainPattern::Exact(_)) => {
                let below = DomainPattern::Wildcard(reserved.to_string());
                reserved.covers(name) || below.covers(name)
            }
            Ok(wildcard) => wildcard.covers(name),
            Err(_) => false,
        }
    }

    /// The first of `reservations` that keeps an agent of `owner` from
    /// binding `name`: one covering it that belongs to someone else. Two
    /// overlapping reservations of two owners (written at two nodes within
    /// one gossip round) thus fail closed: neither owner may bind under both.
    pub fn refusing<'a>(
        reservations: &'a [(String, ReservedDomain)],
        name: &DomainPattern,
        owner: Option<&str>,
    ) -> Option<&'a (String, ReservedDomain)> {
        reservations
            .iter()
            .find(|(_, r)| r.covers(name) && r.owner_id.as_deref() != owner)
    }
}

/// A certificate and key uploaded through `/tls_certificates` (ngrok's
/// TLSCertificate): every node serves it by SNI for the names it
/// carries. The key is sealed with the cluster key, so neither the gossip
/// nor the snapshot on disk holds it in the clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TlsCertificate {
    /// The chain, leaf first.
    pub certificate_pem: String,
    pub private_key_sealed: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    pub created_at: String,
}

impl Kind for TlsCertificate {
    const KIND: &'static str = "tls_certificate";
}

impl TlsCertificate {
    /// The DNS names of the leaf.
    pub fn names(&self) -> Vec<DomainPattern> {
        CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|leaf| certificate_names(&leaf))
            .unwrap_or_default()
            .iter()
            .filter_map(|name| DomainPattern::parse(name).ok())
            .collect()
    }

    /// The certificate as this node serves it, its key opened with
    /// `open`, checked as an upload is (a certificate that has expired
    /// since is refused).
    pub fn serving(&self, open: impl Fn(&str) -> Option<String>) -> Result<ServingCert, String> {
        open_certificate(&self.certificate_pem, &self.private_key_sealed, open)
    }
}

/// A gossiped chain and its key sealed with the cluster key, the key
/// opened with `open`, checked as an upload is (one that has expired since
/// is refused).
pub fn open_certificate(
    certificate_pem: &str,
    private_key_sealed: &str,
    open: impl Fn(&str) -> Option<String>,
) -> Result<ServingCert, String> {
    let key =
        open(private_key_sealed).ok_or("its private key was sealed with another cluster key")?;
    check_certificate(certificate_pem, &key).map_err(|f| f.detail)
}

/// An uploaded chain and key checked: PEM, a DNS name to serve, the key
/// unencrypted and belonging to the leaf, the leaf valid today. The error
/// names the field.
pub fn check_certificate(
    certificate_pem: &str,
    private_key_pem: &str,
) -> Result<ServingCert, Failure> {
    if private_key_pem.contains("ENCRYPTED") {
        return Err(Failure::new(
            ErrorCode::TLS_KEY_INVALID,
            "private_key_pem: the key is encrypted; upload it decrypted (openssl pkey -in key.pem -out plain.pem): it is kept sealed with the cluster key",
        ));
    }
    ServingCert::from_pem(
        Pem::new("certificate_pem", certificate_pem.as_bytes()),
        Pem::new("private_key_pem", private_key_pem.as_bytes()),
    )
    .map_err(|e| {
        let code = match &e {
            TlsError::BadKey { .. } => ErrorCode::TLS_KEY_INVALID,
            TlsError::KeyMismatch { .. } => ErrorCode::TLS_KEY_MISMATCH,
            TlsError::NotYetValid { .. } | TlsError::Expired { .. } => {
                ErrorCode::TLS_CERT_NOT_CURRENT
            }
            _ => ErrorCode::TLS_CERT_INVALID,
        };
        Failure::new(code, e.to_string())
    })
}

/// Where agents of one owner connect: `tunnel.<region>.<domain>` for every
/// region of the cluster (ngrok's agent ingress).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentIngress {
    pub domain: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// The bot user whose tokens may connect through it; `None`: any token
    /// of the cluster.
    #[serde(default)]
    pub owner_id: Option<String>,
    pub created_at: String,
    /// ngrok's `certificate_management_policy`: the nodes of each region
    /// order and renew their region's name (`tunnel.<region>.<domain>`)
    /// from the ACME CA of `[acme]`, and serve it to agents instead of a
    /// certificate of the cluster's agent-ingress CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_management_policy: Option<CertificatePolicy>,
}

impl Kind for AgentIngress {
    const KIND: &'static str = "agent_ingress";
}

impl AgentIngress {
    /// The name agents of `region` connect to.
    pub fn region_domain(&self, region: &str) -> String {
        format!("tunnel.{region}.{}", self.domain)
    }
}

/// ngrok's limits on descriptions and metadata.
pub fn check_text(description: &str, metadata: &str) -> Result<(), Failure> {
    if description.len() > 255 {
        return Err(bad("description", "at most 255 bytes"));
    }
    if metadata.len() > 4096 {
        return Err(bad("metadata", "at most 4096 bytes"));
    }
    Ok(())
}

/// A 400 naming the field.
pub fn bad(field: &str, reason: impl std::fmt::Display) -> Failure {
    Failure::new(ErrorCode::API_BAD_REQUEST, format!("{field}: {reason}"))
}

/// A domain as an API body gives it: normalised, wildcards only where
/// allowed.
pub fn parse_domain(raw: &str, wildcard: bool) -> Result<DomainPattern, Failure> {
    if raw.is_empty() {
        return Err(bad("domain", "required"));
    }
    let pattern = DomainPattern::parse(raw)
        .map_err(|e| Failure::new(ErrorCode::INVALID_DOMAIN, format!("domain: {raw:?}: {e}")))?;
    if !wildcard && matches!(pattern, DomainPattern::Wildcard(_)) {
        return Err(Failure::new(
            ErrorCode::INVALID_DOMAIN,
            format!("domain: {raw:?}: a wildcard is not allowed here"),
        ));
    }
    if !pattern.to_string().contains('.') {
        return Err(Failure::new(
            ErrorCode::INVALID_DOMAIN,
            format!("domain: {raw:?}: needs at least two labels"),
        ));
    }
    Ok(pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved(domain: &str) -> ReservedDomain {
        ReservedDomain {
            domain: domain.into(),
            description: String::new(),
            metadata: String::new(),
            owner_id: None,
            created_at: String::new(),
            certificate_management_policy: None,
            certificate_id: None,
        }
    }

    fn name(raw: &str) -> DomainPattern {
        DomainPattern::parse(raw).unwrap()
    }

    #[test]
    fn a_reservation_covers_its_name_and_everything_below() {
        let exact = reserved("foo.example.test");
        for covered in [
            "foo.example.test",
            "bar.foo.example.test",
            "a.b.foo.example.test",
            "*.foo.example.test",
        ] {
            assert!(exact.covers(&name(covered)), "{covered}");
        }
        for free in ["example.test", "xfoo.example.test", "*.example.test"] {
            assert!(!exact.covers(&name(free)), "{free}");
        }
        let wildcard = reserved("*.example.test");
        for covered in ["a.example.test", "a.b.example.test", "*.example.test"] {
            assert!(wildcard.covers(&name(covered)), "{covered}");
        }
        assert!(!wildcard.covers(&name("example.test")));
        assert!(!wildcard.covers(&name("other.test")));
    }

    #[test]
    fn overlapping_reservations_of_two_owners_fail_closed() {
        let owned = |domain: &str, owner: &str| ReservedDomain {
            owner_id: Some(owner.into()),
            ..reserved(domain)
        };
        let both = vec![
            ("rd_1".to_string(), owned("*.example.test", "bot_a")),
            ("rd_2".to_string(), owned("app.example.test", "bot_b")),
        ];
        let refused_by = |raw: &str, owner: Option<&str>| {
            ReservedDomain::refusing(&both, &name(raw), owner).map(|(id, _)| id.as_str())
        };
        assert_eq!(refused_by("app.example.test", Some("bot_a")), Some("rd_2"));
        assert_eq!(refused_by("app.example.test", Some("bot_b")), Some("rd_1"));
        assert_eq!(refused_by("app.example.test", None), Some("rd_1"));
        // Outside the overlap each owner keeps its own names.
        assert_eq!(refused_by("other.example.test", Some("bot_a")), None);
        assert_eq!(
            refused_by("other.example.test", Some("bot_b")),
            Some("rd_1")
        );
        assert_eq!(refused_by("free.test", None), None);
    }

    #[test]
    fn a_policy_defaults_its_key_type_and_names_a_bad_field() {
        for default_key in [KeyType::Ecdsa, KeyType::Rsa] {
            let policy = CertificatePolicy::parse(None, None, default_key).unwrap();
            assert_eq!(policy.authority, "letsencrypt");
            assert_eq!(policy.private_key_type, default_key);
        }
        let given = CertificatePolicy::parse(Some("letsencrypt"), Some("ecdsa"), KeyType::Rsa);
        assert_eq!(given.unwrap().private_key_type, KeyType::Ecdsa);
        let bad = CertificatePolicy::parse(None, Some("dsa"), KeyType::Rsa).unwrap_err();
        assert!(
            bad.detail
                .starts_with("certificate_management_policy.private_key_type"),
            "{}",
            bad.detail
        );
    }

    #[test]
    fn api_domains_are_checked() {
        assert_eq!(
            parse_domain("App.Example.TEST.", false)
                .unwrap()
                .to_string(),
            "app.example.test"
        );
        assert_eq!(
            parse_domain("*.example.test", false).unwrap_err().code,
            ErrorCode::INVALID_DOMAIN
        );
        assert!(parse_domain("*.example.test", true).is_ok());
        assert_eq!(
            parse_domain("a..b", true).unwrap_err().code,
            ErrorCode::INVALID_DOMAIN
        );
        assert_eq!(
            parse_domain("localhost", true).unwrap_err().code,
            ErrorCode::INVALID_DOMAIN
        );
        assert_eq!(
            parse_domain("", true).unwrap_err().code,
            ErrorCode::API_BAD_REQUEST
        );
    }
}

/// Where the files of event subscriptions set through the admin API go,
/// under the data directory: their paths are relative to it, so they
/// cannot touch the node's own files.
pub const EVENT_FILES: &str = "event-files";

/// An event subscription set through the admin API
/// (`/event_subscriptions`): every node sends its own events to it. A
/// Kafka `sasl_password` is kept sealed with the cluster key, so gossip
/// does not carry it in the clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventSubscription {
    pub subscription: ApiSubscription,
    pub created_at: String,
}

impl Kind for EventSubscription {
    const KIND: &'static str = "event_subscription";
}

impl EventSubscription {
    /// The subscription as this node runs it: the gossip key as its id,
    /// its file under [`EVENT_FILES`], its password opened.
    pub fn runnable(
        &self,
        id: &str,
        open: impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Subscription, String> {
        let mut api = self.subscription.clone();
        api.id = id.to_string();
        if let Some(file) = &mut api.destination.file {
            file.path = Path::new(EVENT_FILES).join(&file.path);
        }
        if let Some(kafka) = &mut api.destination.kafka
            && let Some(sealed) = &kafka.sasl_password
        {
            let plain = open(sealed.expose())
                .and_then(|p| String::from_utf8(p).ok())
                .ok_or("its sasl_password was sealed with another cluster key")?;
            kafka.sasl_password = Some(Secret::new(plain));
        }
        api.validate().map_err(|e| e.to_string())
    }
}

/// CAs every node requires for the endpoints on a domain (and the names
/// under a `*.` pattern), whatever their agents ask: the cluster's form of
/// `[[endpoint_policies]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointPolicyRecord {
    pub domain: String,
    pub mutual_tls_cas: Vec<String>,
    /// The operator's Traffic Policy document, sealed with the cluster key
    /// (it may hold OAuth client secrets or basic auth passwords).
    #[serde(default)]
    pub traffic_policy_sealed: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    pub created_at: String,
}

impl Kind for EndpointPolicyRecord {
    const KIND: &'static str = "endpoint_policy";
}
