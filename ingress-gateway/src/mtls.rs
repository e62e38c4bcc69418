//! The identity of a verified client certificate, as the upstream's
//! `ngrok-mtls-*` headers and the events show it. The CA bundles and the
//! verifiers are `postern-net`'s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

/// The verified client certificate, as upstream headers and events see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    pub subject_cn: Option<String>,
    pub san_dns: Vec<String>,
    pub emails: Vec<String>,
    /// Upper-case hex without separators (`"1A2B3C"`).
    pub serial: String,
    pub issuer: String,
    pub sha256_fingerprint: String,
    /// Seconds since the epoch.
    pub not_after: i64,
}

impl ClientIdentity {
    /// Reads the leaf a handshake presented (already verified).
    pub fn of(leaf: &CertificateDer<'_>) -> Option<ClientIdentity> {
        let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        let mut identity = ClientIdentity {
            subject_cn: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string),
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect::<String>(),
            issuer: cert.issuer().to_string(),
            sha256_fingerprint: postern_net::fingerprint(leaf.as_ref()),
            not_after: cert.validity().not_after.timestamp(),
            ..Default::default()
        };
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(dns) => identity.san_dns.push(dns.to_string()),
                        GeneralName::RFC822Name(email) => identity.emails.push(email.to_string()),
                        _ => {}
                    }
                }
            }
        }
        // Strip leading zero bytes of the DER integer encoding.
        let trimmed = identity.serial.trim_start_matches("00");
        identity.serial = if trimmed.is_empty() {
            "00".into()
        } else {
            trimmed.to_string()
        };
        Some(identity)
    }

    /// `not_after` as a `SystemTime`.
    pub fn not_after_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.not_after.max(0) as u64)
    }

    /// The `ngrok-mtls-*` headers for the upstream, all four always (empty
    /// when the certificate has no such field). Several SANs are joined with
    /// `", "`; values are made safe for a header (bytes outside printable
    /// ASCII are percent-encoded) and cut at 1024 bytes.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "ngrok-mtls-subject-cn",
                header_safe(self.subject_cn.as_deref().unwrap_or("")),
            ),
            (
                "ngrok-mtls-subject-alt-name-dns",
                header_safe(&self.san_dns.join(", ")),
            ),
            (
                "ngrok-mtls-email-addresses",
                header_safe(&self.emails.join(", ")),
            ),
            ("ngrok-mtls-serial-number", self.serial.clone()),
        ]
    }
}

/// Percent-encodes what a header cannot carry, and bounds the size.
fn header_safe(value: &str) -> String {
    const MAX: usize = 1024;
    let mut out = String::with_capacity(value.len().min(MAX));
    for byte in value.bytes() {
        if out.len() >= MAX {
            break;
        }
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_safe() {
        assert_eq!(header_safe("plain CN"), "plain CN");
        assert_eq!(
            header_safe("evil\r\nX-Injected: 1"),
            "evil%0D%0AX-Injected: 1"
        );
        assert_eq!(header_safe("100%"), "100%25");
        assert_eq!(header_safe("ü"), "%C3%BC");
        assert!(header_safe(&"x".repeat(5000)).len() <= 1024);
    }
}
