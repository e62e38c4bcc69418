//! Test certificates: CAs, intermediates and client certificates (good and
//! deliberately bad), written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority (root or intermediate).
pub struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own key, to present the CA as a client certificate.
    pub key_pem: String,
}

/// A certificate and key as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<name>.pem` (certificate, then `chain`) and `<name>-key.pem`.
    pub fn write(&self, dir: &Path, name: &str, chain: &[&str]) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        let mut pem = self.cert_pem.clone();
        for extra in chain {
            pem.push_str(extra);
        }
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl TestCa {
    pub fn root(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TestCa {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate valid from `days_from_now.0` to `.1` days
    /// from now, with DNS and email SANs.
    pub fn client(
        &self,
        cn: &str,
        sans: &[&str],
        emails: &[&str],
        days_from_now: (i64, i64),
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for email in emails {
            params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
                email.to_string().try_into().unwrap(),
            ));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0a, 0x1b, 0x2c, 0x3d]));
        let now = time_now();
        params.not_before = now + time_days(days_from_now.0);
        params.not_after = now + time_days(days_from_now.1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `names`.
    pub fn server(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn time_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

/// Seed 001's "Generate test certificates" script, run unchanged from
/// `tests/data/seed-001/gen-certs.sh` in `dir` with its placeholder
/// substituted (as the seed tells the reader to) by `wildcard`, on a
/// pseudo-terminal that types `pass_phrase` at each of OpenSSL's prompts.
/// Leaves the script's nine files in `dir`; the certificates it signs are
/// X.509 v1 with the CA's own subject.
pub async fn seed_001_certificates(dir: &Path, wildcard: &str, pass_phrase: &str) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/seed-001");
    let script = std::fs::read_to_string(data.join("gen-certs.sh")).unwrap();
    let script_path = dir.join("gen-certs.sh");
    std::fs::write(
        &script_path,
        script.replace("{YOUR_WILDCARD_DOMAIN}", wildcard),
    )
    .unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(data.join("answer-pass-phrases.py"))
        .arg(pass_phrase)
        .arg("sh")
        .arg(&script_path)
        .current_dir(dir)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "seed 001's script failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for file in [
        "ca-crt.pem",
        "ca-key.pem",
        "server-crt.pem",
        "server-key.pem",
        "client-crt.pem",
        "client-key.pem",
    ] {
        assert!(
            dir.join(file).exists(),
            "seed 001's script made no {file}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// An edge config of the Kubernetes manifests as its pod reads it: the
/// files its Secrets mount (the TLS certificate and key, the cluster key)
/// are written to `dir`, and the config names them there.
pub fn with_mounted_secrets(toml: &str, dir: &Path) -> String {
    std::fs::write(dir.join("key"), "0123456789abcdef0123456789abcdef").unwrap();
    let tls = rcgen::generate_simple_self_signed(vec!["*.example.com".to_string()]).unwrap();
    std::fs::write(dir.join("tls.crt"), tls.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), tls.signing_key.serialize_pem()).unwrap();
    toml.replace(
        "/etc/postern/cluster/key",
        &dir.join("key").display().to_string(),
    )
    .replace("/etc/postern/tls/", &format!("{}/", dir.display()))
}
