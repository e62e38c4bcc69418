//! Pebble, Let's Encrypt's test ACME server (Debian's `pebble` package),
//! with `pebble-challtestsrv` as its DNS server: every name resolves to
//! 127.0.0.1, so Pebble's HTTP-01 validation reaches the test edge, and
//! TXT records set through its management API answer DNS-01.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls::pki_types::pem::PemObject;
use tokio::process::Command;

use crate::{Spawned, TempDir, TestCa, curl, eventually, free_port};

/// Pebble (not yet started, or stopped) and its DNS server (running).
pub struct Pebble {
    pub dir: TempDir,
    /// Pebble's ACME directory, for `[acme] directory_url`.
    pub directory_url: String,
    /// The CA of Pebble's own HTTPS certificate, for `[acme] ca_bundle`.
    pub https_ca: PathBuf,
    /// pebble-challtestsrv's management API (`/set-txt`, `/clear-txt`),
    /// for a DNS-01 hook.
    pub challtest: SocketAddr,
    listen: SocketAddr,
    management: SocketAddr,
    dns: SocketAddr,
    process: Option<Spawned>,
    _challtestsrv: Spawned,
}

impl Pebble {
    /// Starts pebble-challtestsrv as the DNS server answering 127.0.0.1
    /// for every name, and picks Pebble's ports and certificate.
    pub async fn prepare() -> Pebble {
        let dir = TempDir::new("pebble");
        let mut ports = std::collections::HashSet::new();
        let mut free = || loop {
            let port = free_port();
            if ports.insert(port) {
                return SocketAddr::from(([127, 0, 0, 1], port));
            }
        };
        let (listen, management, dns, challtest) = (free(), free(), free(), free());
        let ca = TestCa::root("Pebble HTTPS test CA");
        let https_ca = dir.path().join("pebble-https-ca.pem");
        std::fs::write(&https_ca, &ca.pem).unwrap();
        ca.server(&["localhost", "127.0.0.1"])
            .write(dir.path(), "pebble-https", &[]);
        let challtestsrv = Spawned::spawn(
            Command::new("pebble-challtestsrv")
                .args(["-management", &challtest.to_string()])
                .args(["-dns01", &dns.to_string()])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv6", ""]),
        );
        let url = format!("http://{challtest}/set-default-ipv4");
        eventually(20, "pebble-challtestsrv answers", || {
            let url = url.clone();
            async move {
                let out = curl(&["-f", "-d", r#"{"ip":"127.0.0.1"}"#, &url]).await;
                out.status.success()
            }
        })
        .await;
        Pebble {
            directory_url: format!("https://{listen}/dir"),
            https_ca,
            challtest,
            listen,
            management,
            dns,
            process: None,
            _challtestsrv: challtestsrv,
            dir,
        }
    }

    /// Runs Pebble, validating HTTP-01 on `http_port` (the edge's plain
    /// HTTP listener), issuing certificates valid for `validity`
    /// (Pebble's default, five years, when `None`); without the random
    /// validation delays (`PEBBLE_VA_NOSLEEP`).
    pub async fn start(&mut self, http_port: u16, tls_port: u16, validity: Option<Duration>) {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": self.listen.to_string(),
                "managementListenAddress": self.management.to_string(),
                "certificate": self.dir.path().join("pebble-https.pem"),
                "privateKey": self.dir.path().join("pebble-https-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.map_or(0, |v| v.as_secs()),
            }
        });
        let path = self.dir.path().join("pebble-config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let process = Spawned::spawn(
            Command::new("pebble")
                .arg("-config")
                .arg(&path)
                .args(["-dnsserver", &self.dns.to_string()])
                .env("PEBBLE_VA_NOSLEEP", "1"),
        );
        self.process = Some(process);
        let listen = self.listen;
        eventually(20, "Pebble listens", || async move {
            tokio::net::TcpStream::connect(listen).await.is_ok()
        })
        .await;
    }

    /// Kills Pebble (the CA is down).
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await;
        }
    }

    /// What Pebble has printed so far.
    pub fn log(&mut self) -> Vec<String> {
        self.process
            .as_mut()
            .map(|p| p.drain_lines().to_vec())
            .unwrap_or_default()
    }

    /// Pebble's root, which signs what it issues (new at every start),
    /// written to `<dir>/<file>`.
    pub async fn root(&self, file: &str) -> PathBuf {
        let url = format!("https://{}/roots/0", self.management);
        let ca = self.https_ca.display().to_string();
        let out = curl(&["-f", "--cacert", &ca, &url]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self.dir.path().join(file);
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }
}

/// The `[acme]` table for `pebble`, retrying after `retry_min`.
pub fn acme_toml(pebble: &Pebble, retry_min: &str) -> String {
    format!(
        "[acme]\ndirectory_url = \"{}\"\ncontact_email = \"ops@example.test\"\n\
         ca_bundle = \"{}\"\nretry_min = \"{retry_min}\"\nretry_max = \"10s\"\n",
        pebble.directory_url,
        pebble.https_ca.display()
    )
}

/// The serial number (hex) of the certificate `openssl s_client` gets
/// for `name` at `addr`, and whether it verified against `ca`.
pub async fn served_serial(addr: SocketAddr, name: &str, ca: &Path) -> (String, bool) {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            name,
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let verified = text.contains("Verify return code: 0 (ok)");
    let serial = rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .next()
        .and_then(|der| der.ok())
        .and_then(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .ok()
                .map(|(_, cert)| cert.raw_serial_as_string())
        })
        .unwrap_or_default();
    (serial, verified)
}
