//! `/tls_certificates` (ngrok's TLSCertificate): a certificate chain and
//! its key uploaded, checked (PEM, a DNS name, the key unencrypted and
//! belonging to the leaf, valid today: each refusal names the field with
//! its own `ERR_POSTERN_904x`), kept as a cluster object with the key
//! sealed, and served by every node by SNI for the names it carries (and,
//! named by a reserved domain's `certificate_id`, for the domain's names
//! over any other; it cannot be deleted while named). The key is never
//! shown. The certificates ACME issued for reserved domains
//! are listed too, with ids `cert_acme_<name>`, read-only.

use postern_ingress::CertSource;
use postern_net::{fingerprint, usages};
use postern_proto::{ErrorCode, Failure};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use serde_json::{Value, json};
use x509_parser::prelude::*;

use super::objects::{Resource, TextUpdate};
use crate::{
    ca_store::{now_rfc3339, pem_of},
    cluster::{ClusterNode, ReservedDomain, TlsCertificate, check_certificate, check_text},
};

/// The id under which the ACME certificate of `name` is listed.
pub fn acme_certificate_id(name: &str) -> String {
    format!("cert_acme_{name}")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTlsCertificate {
    /// The chain, leaf first, then intermediates.
    #[serde(default)]
    certificate_pem: String,
    /// PKCS#1, SEC 1 or PKCS#8 PEM, unencrypted; sealed with the cluster
    /// key, never shown.
    #[serde(default)]
    private_key_pem: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
}

impl Resource for TlsCertificate {
    const PATH: &'static str = "tls_certificates";
    const ID_PREFIX: &'static str = "cert_";
    const NAME: &'static str = "TLS certificate";
    type New = NewTlsCertificate;
    type Update = TextUpdate;

    fn create(
        node: &ClusterNode,
        _id: &str,
        new: NewTlsCertificate,
    ) -> Result<(Self, Value), Failure> {
        check_text(&new.description, &new.metadata)?;
        check_certificate(&new.certificate_pem, &new.private_key_pem)?;
        let certificate = TlsCertificate {
            certificate_pem: new.certificate_pem,
            private_key_sealed: node.seal(new.private_key_pem.as_bytes()),
            description: new.description,
            metadata: new.metadata,
            created_at: now_rfc3339(),
        };
        Ok((certificate, Value::Null))
    }

    fn update(mut self, _node: &ClusterNode, update: TextUpdate) -> Result<Self, Failure> {
        update.apply(&mut self.description, &mut self.metadata)?;
        Ok(self)
    }

    fn json(&self, _node: &ClusterNode, id: &str) -> Value {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let shown = Shown {
            id,
            created_at: Some(&self.created_at),
            description: &self.description,
            metadata: &self.metadata,
            certificate_pem: &self.certificate_pem,
        };
        shown.with(&chain, false)
    }

    /// A certificate a reserved domain names stays until detached.
    fn check_delete(node: &ClusterNode, id: &str) -> Result<(), Failure> {
        let naming: Vec<String> = node
            .objects::<ReservedDomain>()
            .into_iter()
            .filter(|(_, reserved)| reserved.certificate_id.as_deref() == Some(id))
            .map(|(rd, reserved)| format!("{rd} ({})", reserved.domain))
            .collect();
        if naming.is_empty() {
            return Ok(());
        }
        Err(Failure::new(
            ErrorCode::CERT_IN_USE,
            format!(
                "TLS certificate {id} is the certificate_id of reserved domain {}; detach it first (DELETE /reserved_domains/{{id}}/certificate, or PATCH another certificate_id)",
                naming.join(", ")
            ),
        ))
    }

    fn read_only(node: &ClusterNode) -> Vec<(String, Value)> {
        let reserved = node.objects::<ReservedDomain>();
        node.certs()
            .certs(CertSource::Acme)
            .into_iter()
            .map(|(name, cert)| {
                let id = acme_certificate_id(&name);
                let for_domain = reserved
                    .iter()
                    .find(|(_, r)| r.domain == name)
                    .map(|(rd, _)| format!(" ({rd})"))
                    .unwrap_or_default();
                let shown = Shown {
                    id: &id,
                    created_at: None,
                    description: &format!(
                        "issued by ACME for the reserved domain {name}{for_domain}"
                    ),
                    metadata: "",
                    certificate_pem: &cert.key.cert.iter().map(pem_of).collect::<String>(),
                }
                .with(&cert.key.cert, true);
                (id, shown)
            })
            .collect()
    }
}

/// The fields of a TLSCertificate not read from the certificate.
struct Shown<'a> {
    id: &'a str,
    /// `None`: the certificate's `not_before`.
    created_at: Option<&'a str>,
    description: &'a str,
    metadata: &'a str,
    certificate_pem: &'a str,
}

impl Shown<'_> {
    /// The whole object, with what [`describe`] reads from `chain`.
    fn with(self, chain: &[CertificateDer<'_>], issued: bool) -> Value {
        let mut shown = describe(chain, issued);
        if let Some(fields) = shown.as_object_mut() {
            let created_at = match self.created_at {
                Some(at) => json!(at),
                None => fields.get("not_before").cloned().unwrap_or(Value::Null),
            };
            fields.extend([
                ("id".into(), json!(self.id)),
                (
                    "uri".into(),
                    json!(format!("/tls_certificates/{}", self.id)),
                ),
                ("created_at".into(), created_at),
                ("description".into(), json!(self.description)),
                ("metadata".into(), json!(self.metadata)),
                ("certificate_pem".into(), json!(self.certificate_pem)),
            ]);
        }
        shown
    }
}

/// What ngrok's TLSCertificate shows of a chain's leaf; `issued_at` is
/// set for certificates the edge obtained itself (`issued`).
fn describe(chain: &[CertificateDer<'_>], issued: bool) -> Value {
    let Some((_, leaf)) = chain
        .first()
        .and_then(|der| X509Certificate::from_der(der.as_ref()).ok())
    else {
        return json!({});
    };
    let first = |values: Vec<&str>| values.first().map(|v| v.to_string()).unwrap_or_default();
    let subject = leaf.subject();
    let text = |attrs: Vec<&AttributeTypeAndValue>| {
        first(attrs.into_iter().filter_map(|a| a.as_str().ok()).collect())
    };
    let (mut dns_names, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push(dns.to_string()),
                GeneralName::IPAddress(raw) => ips.push(ip_text(raw)),
                _ => {}
            }
        }
    }
    let (key_usages, extended_key_usages) = usages(&leaf);
    let time = |t: ASN1Time| {
        let secs = t.timestamp().max(0) as u64;
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
        .to_string()
    };
    let validity = leaf.validity();
    let private_key_type = match leaf.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(_)) => "rsa",
        Ok(x509_parser::public_key::PublicKey::EC(_)) => "ecdsa",
        _ if leaf.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => "ed25519",
        _ => "unknown",
    };
    json!({
        "subject_common_name": text(subject.iter_common_name().collect()),
        "subject_organization": text(subject.iter_organization().collect()),
        "subject_organizational_unit": text(subject.iter_organizational_unit().collect()),
        "subject_locality": text(subject.iter_locality().collect()),
        "subject_province": text(subject.iter_state_or_province().collect()),
        "subject_country": text(subject.iter_country().collect()),
        "subject_alternative_names": {"dns_names": dns_names, "ips": ips},
        "issuer_common_name": text(leaf.issuer().iter_common_name().collect()),
        "serial_number": hex::encode(leaf.raw_serial()),
        "not_before": time(validity.not_before),
        "not_after": time(validity.not_after),
        "issued_at": issued.then(|| time(validity.not_before)),
        "key_usages": key_usages,
        "extended_key_usages": extended_key_usages,
        "private_key_type": private_key_type,
        "fingerprint": fingerprint(chain[0].as_ref()),
    })
}

fn ip_text(raw: &[u8]) -> String {
    match raw.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(raw).expect("4 bytes")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(raw).expect("16 bytes")).to_string(),
        _ => hex::encode(raw),
    }
}
