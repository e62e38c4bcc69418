//! `[acme]`: the ACME CA the edge orders certificates from for reserved
//! domains with a `certificate_management_policy`.

use std::{path::PathBuf, time::Duration};

use base64::Engine;
use postern_net::Secret;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;

use crate::{
    config::duration,
    error::{ConfigError, invalid},
};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    /// The CA's directory URL. Default: Let's Encrypt's production
    /// directory; its staging one is
    /// `https://acme-staging-v02.api.letsencrypt.org/directory`.
    pub directory_url: Option<String>,
    /// The account's contact address (`ops@example.com`), where the CA
    /// sends expiry warnings. Optional.
    pub contact_email: Option<String>,
    /// External account binding (CAs that require one, e.g. ZeroSSL): the
    /// key id and the base64url HMAC key the CA gave. Both or neither.
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<Secret>,
    /// PEM file of CAs to trust for the ACME server's own HTTPS, besides
    /// the Mozilla roots (a private CA, or Pebble's in tests).
    pub ca_bundle: Option<PathBuf>,
    /// Renew once this fraction of a certificate's lifetime has passed.
    /// Default 0.6667 (two thirds, as Let's Encrypt advises).
    pub renew_at: Option<f64>,
    /// Back-off after a failed order: the first wait (jittered, doubling
    /// up to `retry_max`). Default `1m`.
    pub retry_min: Option<String>,
    /// The longest wait between attempts. Default `1h`.
    pub retry_max: Option<String>,
    /// How names are proved: `"http-01"` (the default) on the plain-HTTP
    /// listener, which must be reachable on port 80, or `"tls-alpn-01"`
    /// on the HTTPS listener, which must be reachable on port 443 (for
    /// deployments without port 80).
    pub challenge: Option<String>,
    /// The command that publishes and withdraws DNS-01 TXT records, as an
    /// argument list (`["/usr/local/bin/acme-dns"]`), called like lego's
    /// `exec` provider: `<command…> present _acme-challenge.<domain>.
    /// <value>`, then `<command…> cleanup <same two>`; a non-zero exit
    /// fails the order. Wildcard domains are proved this way, and every
    /// name with `challenge = "dns-01"`.
    pub dns_hook: Option<Vec<String>>,
    /// How long to wait after the hook published a record before the CA is
    /// asked to look (DNS propagation). Default `10s`.
    pub dns_hook_wait: Option<String>,
    /// Certificates on demand: when an agent binds a name under a wildcard
    /// reserved domain that has a `certificate_management_policy`
    /// (`app.example.com` under `*.example.com`), and no certificate the
    /// edge holds covers it, order one for that exact name with
    /// `challenge` (no DNS hook needed). Only names agents bind, never
    /// names visitors ask for. Default `false`.
    pub on_demand: Option<bool>,
    /// At most this many names under one wildcard reserved domain get a
    /// first order on demand per hour, at this node (renewals and retries
    /// of admitted names are not counted); beyond it a name is served by
    /// whatever certificate there is, with a warning and
    /// `postern_acme_on_demand_refused_total`. Default 20.
    pub on_demand_per_hour: Option<u32>,
}

/// The ACME challenge the edge answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// RFC 8555 §8.3, on the plain-HTTP listener.
    Http01,
    /// RFC 8737, on the HTTPS/TLS listener.
    TlsAlpn01,
    /// RFC 8555 §8.4, a TXT record published by the DNS hook.
    Dns01,
}

/// `acme.dns_hook` and `acme.dns_hook_wait`.
#[derive(Clone, Debug)]
pub struct DnsHook {
    pub argv: Vec<String>,
    pub wait: Duration,
}

/// Validated `[acme]`.
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    pub directory_url: String,
    /// `mailto:` URL.
    pub contact: Option<String>,
    /// Key id and HMAC key of the external account binding.
    pub eab: Option<(String, Secret)>,
    /// Extra roots for the ACME server's HTTPS.
    pub ca_bundle: Vec<CertificateDer<'static>>,
    pub renew_at: f64,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub challenge: Challenge,
    /// Proves wildcards, and every name when `challenge` is DNS-01.
    pub dns_hook: Option<DnsHook>,
    /// `acme.on_demand`: with `acme.on_demand_per_hour`, the names an
    /// hour each wildcard reserved domain may have ordered.
    pub on_demand_per_hour: Option<u32>,
}

impl AcmeConfig {
    /// How long an order may take: `base`, plus, with a DNS hook, the
    /// hook's own bound and its propagation wait (a long `dns_hook_wait`
    /// must not make every order time out).
    pub fn order_timeout(&self, base: Duration) -> Duration {
        self.dns_hook
            .as_ref()
            .map_or(base, |hook| base + super::issue::HOOK_TIMEOUT + hook.wait)
    }

    /// The external account binding's HMAC key, decoded.
    pub fn eab_hmac(&self) -> Option<(String, Vec<u8>)> {
        self.eab.as_ref().map(|(kid, key)| {
            let bytes = decode_hmac(key.expose()).expect("checked when the config was validated");
            (kid.clone(), bytes)
        })
    }
}

fn decode_hmac(key: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key.trim_end_matches('='))
}

impl RawAcme {
    pub fn validate(self) -> Result<AcmeConfig, ConfigError> {
        let directory_url = self
            .directory_url
            .unwrap_or_else(|| LETS_ENCRYPT.to_string());
        let uri: http::Uri = directory_url.parse().map_err(|e| {
            ConfigError::field(
                format!("acme.directory_url: {directory_url:?} is not a URL"),
                e,
            )
        })?;
        let loopback = uri.host().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => {
                return Err(invalid!(
                    "acme.directory_url: {directory_url:?} must be an https:// URL (http:// only to a loopback address)"
                ));
            }
        }
        let contact = match self.contact_email {
            None => None,
            Some(email) => {
                let ok = email
                    .split_once('@')
                    .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
                    && !email.contains(char::is_whitespace);
                if !ok {
                    return Err(invalid!(
                        "acme.contact_email: {email:?} is not an email address"
                    ));
                }
                Some(format!("mailto:{email}"))
            }
        };
        let eab = match (self.eab_kid, self.eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                if kid.trim().is_empty() {
                    return Err(invalid!("acme.eab_kid: must not be empty"));
                }
                match decode_hmac(key.expose()) {
                    Ok(bytes) if !bytes.is_empty() => {}
                    _ => return Err(invalid!("acme.eab_hmac_key: not a base64url key")),
                }
                Some((kid, key))
            }
            _ => {
                return Err(invalid!(
                    "acme.eab_kid and acme.eab_hmac_key must be given together"
                ));
            }
        };
        let ca_bundle = match self.ca_bundle {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError::field(format!("acme.ca_bundle: reading {}", path.display()), e)
                })?;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        ConfigError::field(
                            format!("acme.ca_bundle: {} is not PEM", path.display()),
                            e,
                        )
                    })?;
                if certs.is_empty() {
                    return Err(invalid!(
                        "acme.ca_bundle: {} holds no PEM certificate",
                        path.display()
                    ));
                }
                certs
            }
        };
        let renew_at = self.renew_at.unwrap_or(2.0 / 3.0);
        if !(renew_at > 0.0 && renew_at < 1.0) {
            return Err(invalid!(
                "acme.renew_at: {renew_at} must be a fraction of the lifetime between 0 and 1, such as 0.6667"
            ));
        }
        let retry_min = duration("acme.retry_min", &self.retry_min, Duration::from_secs(60))?;
        let retry_max = duration("acme.retry_max", &self.retry_max, Duration::from_secs(3600))?;
        if retry_min.is_zero() || retry_max < retry_min {
            return Err(invalid!(
                "acme.retry_max: must be at least acme.retry_min, which must be above zero"
            ));
        }
        let challenge = match self.challenge.as_deref() {
            None | Some("http-01") => Challenge::Http01,
            Some("tls-alpn-01") => Challenge::TlsAlpn01,
            Some("dns-01") => Challenge::Dns01,
            Some(other) => {
                return Err(invalid!(
                    "acme.challenge: {other:?} is not a challenge Postern answers; use \"http-01\", \"tls-alpn-01\" or \"dns-01\""
                ));
            }
        };
        let dns_hook = match self.dns_hook {
            None if challenge == Challenge::Dns01 => {
                return Err(invalid!(
                    "acme.dns_hook: challenge = \"dns-01\" needs the command that publishes the TXT records"
                ));
            }
            None if self.dns_hook_wait.is_some() => {
                return Err(invalid!(
                    "acme.dns_hook_wait: set without acme.dns_hook, so nothing would wait"
                ));
            }
            None => None,
            Some(argv) => {
                let Some(command) = argv.first().filter(|c| !c.trim().is_empty()) else {
                    return Err(invalid!(
                        "acme.dns_hook: an empty list; give the command and its arguments"
                    ));
                };
                if command.contains('/') && !std::path::Path::new(command).is_file() {
                    return Err(invalid!("acme.dns_hook: {command} is not a file"));
                }
                let wait = duration(
                    "acme.dns_hook_wait",
                    &self.dns_hook_wait,
                    Duration::from_secs(10),
                )?;
                Some(DnsHook { argv, wait })
            }
        };
        let on_demand_per_hour = match (self.on_demand, self.on_demand_per_hour) {
            (Some(true), None) => Some(20),
            (Some(true), Some(0)) => {
                return Err(invalid!(
                    "acme.on_demand_per_hour: 0 would order nothing; set acme.on_demand = false instead"
                ));
            }
            (Some(true), Some(limit)) => Some(limit),
            (_, Some(_)) => {
                return Err(invalid!(
                    "acme.on_demand_per_hour: set without acme.on_demand = true, so nothing is ordered on demand"
                ));
            }
            (_, None) => None,
        };
        Ok(AcmeConfig {
            challenge,
            dns_hook,
            on_demand_per_hour,
            directory_url,
            contact,
            eab,
            ca_bundle,
            renew_at,
            retry_min,
            retry_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> anyhow::Result<AcmeConfig> {
        Ok(toml::from_str::<RawAcme>(toml)?.validate()?)
    }

    #[test]
    fn defaults_are_lets_encrypt_and_two_thirds() {
        let config = check("").unwrap();
        assert_eq!(config.directory_url, LETS_ENCRYPT);
        assert!((config.renew_at - 2.0 / 3.0).abs() < 1e-9);
        assert!(config.eab.is_none() && config.contact.is_none());
        assert_eq!(config.challenge, Challenge::Http01);
        assert!(config.dns_hook.is_none());
        assert_eq!(config.on_demand_per_hour, None, "off by default");
        assert_eq!(
            check("on_demand = true").unwrap().on_demand_per_hour,
            Some(20)
        );
        let base = Duration::from_secs(180);
        assert_eq!(config.order_timeout(base), base);
        let config = check(
            r#"challenge = "dns-01"
dns_hook = ["sh", "-c", "exit 0"]"#,
        )
        .unwrap();
        let base = Duration::from_secs(180);
        assert_eq!(
            config.order_timeout(base),
            base + super::super::issue::HOOK_TIMEOUT + Duration::from_secs(10),
            "the hook's time is added to an order's"
        );
        let hook = config.dns_hook.unwrap();
        assert_eq!((hook.argv.len(), hook.wait), (3, Duration::from_secs(10)));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            (
                r#"directory_url = "http://acme.example.com/dir""#,
                "acme.directory_url",
            ),
            (r#"directory_url = "not a url""#, "acme.directory_url"),
            (r#"contact_email = "ops""#, "acme.contact_email"),
            (r#"eab_kid = "kid""#, "acme.eab_kid and acme.eab_hmac_key"),
            (
                r#"eab_kid = "kid"
eab_hmac_key = "!!""#,
                "acme.eab_hmac_key",
            ),
            (r#"ca_bundle = "/nonexistent/pebble.pem""#, "acme.ca_bundle"),
            ("renew_at = 1.5", "acme.renew_at"),
            ("renew_at = 0.0", "acme.renew_at"),
            (r#"retry_min = "soon""#, "acme.retry_min"),
            (r#"retry_min = "2h""#, "acme.retry_max"),
            (r#"challenge = "dns-99""#, "acme.challenge"),
            (r#"challenge = "dns-01""#, "acme.dns_hook"),
            ("dns_hook = []", "acme.dns_hook"),
            (r#"dns_hook = ["/nonexistent/hook"]"#, "acme.dns_hook"),
            (r#"dns_hook_wait = "1s""#, "acme.dns_hook_wait"),
            ("on_demand_per_hour = 5", "acme.on_demand_per_hour"),
            (
                "on_demand = false\non_demand_per_hour = 5",
                "acme.on_demand_per_hour",
            ),
            (
                "on_demand = true\non_demand_per_hour = 0",
                "acme.on_demand_per_hour",
            ),
            (
                r#"dns_hook = ["sh"]
dns_hook_wait = "later""#,
                "acme.dns_hook_wait",
            ),
        ] {
            let err = format!("{:#}", check(toml).unwrap_err());
            assert!(err.contains(key), "{toml}: {err}");
        }
        let err = toml::from_str::<RawAcme>("directory = \"x\"").unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn loopback_http_and_eab_are_accepted() {
        let config = check(
            r#"directory_url = "http://127.0.0.1:14000/dir"
contact_email = "ops@example.com"
eab_kid = "kid-1"
eab_hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W""#,
        )
        .unwrap();
        assert_eq!(config.contact.as_deref(), Some("mailto:ops@example.com"));
        let (kid, key) = config.eab_hmac().unwrap();
        assert_eq!(kid, "kid-1");
        assert_eq!(key.len(), 48);
    }
}
