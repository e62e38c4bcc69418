//! ngrok's endpoint URL (`--url`, and `url` of a version 3 endpoint) and
//! its `--subdomain`: what name, port and scheme a tunnel asks the edge for.

use super::Proto;
use crate::error::{ConfigError, bail, invalid};

/// The scheme an endpoint URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    Tls,
    Tcp,
}

impl Scheme {
    /// The tunnel protocol that serves this scheme.
    pub fn proto(self) -> Proto {
        match self {
            Scheme::Http | Scheme::Https => Proto::Http,
            Scheme::Tls => Proto::Tls,
            Scheme::Tcp => Proto::Tcp,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tls => "tls",
            Scheme::Tcp => "tcp",
        }
    }
}

/// An endpoint URL taken apart: `https://app.example.com`,
/// `tcp://1.tcp.example.com:20001`, a bare host, or a scheme alone (a
/// random name or port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointUrl {
    pub scheme: Option<Scheme>,
    pub host: Option<String>,
    pub port: Option<u16>,
}

impl EndpointUrl {
    pub fn parse(text: &str) -> Result<EndpointUrl, ConfigError> {
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = match scheme.to_ascii_lowercase().as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    "tls" => Scheme::Tls,
                    "tcp" => Scheme::Tcp,
                    other => bail!("{text:?}: the scheme {other:?} is not https, http, tls or tcp"),
                };
                (Some(scheme), rest)
            }
            None => (None, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            bail!("{text:?}: an endpoint URL names a host, not a path");
        }
        if rest.contains('@') {
            bail!("{text:?}: an endpoint URL carries no user name or password");
        }
        if rest.starts_with('[') {
            bail!("{text:?}: an endpoint is named by a domain, not an IP address");
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid!("{text:?}: {port:?} is not a port"))?;
                (host, Some(port))
            }
            None => (rest, None),
        };
        if host.is_empty() && port.is_some() {
            bail!("{text:?}: a port needs a host");
        }
        Ok(EndpointUrl {
            scheme,
            host: (!host.is_empty()).then(|| host.to_ascii_lowercase()),
            port,
        })
    }

    /// Checks the URL fits a tunnel of `proto` (a `tls://` URL on an HTTP
    /// tunnel does not) and a TCP URL with a host has a port.
    pub fn check(&self, proto: Proto) -> Result<(), ConfigError> {
        if let Some(scheme) = self.scheme
            && scheme.proto() != proto
        {
            let command = match proto {
                Proto::Http => "http",
                Proto::Tls => "tls",
                Proto::Tcp => "tcp",
            };
            bail!(
                "a {}:// URL is not served by a {command} tunnel",
                scheme.name()
            );
        }
        if proto == Proto::Tcp && self.host.is_some() && self.port.is_none() {
            bail!("a TCP endpoint URL is host:port, like tcp://1.tcp.example.com:20001");
        }
        Ok(())
    }

    /// HTTP tunnels: the one scheme the URL serves, when it names one.
    pub fn http_scheme(&self) -> Option<&'static str> {
        match self.scheme {
            Some(Scheme::Http) => Some("http"),
            Some(Scheme::Https) => Some("https"),
            _ => None,
        }
    }
}

/// Checks ngrok's `subdomain`: labels of letters, digits and `-`,
/// separated by dots.
pub fn check_subdomain(subdomain: &str) -> Result<(), ConfigError> {
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if subdomain.is_empty() || !subdomain.split('.').all(valid_label) {
        bail!(
            "{subdomain:?} is not a subdomain: labels of letters, digits and '-', separated by dots"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> EndpointUrl {
        EndpointUrl::parse(text).unwrap()
    }

    #[test]
    fn the_forms_ngrok_documents() {
        assert_eq!(
            url("https://app.example.com"),
            EndpointUrl {
                scheme: Some(Scheme::Https),
                host: Some("app.example.com".into()),
                port: None
            }
        );
        assert_eq!(url("https://App.Example.com:443/").port, Some(443));
        assert_eq!(
            url("https://App.Example.com:443/").host.unwrap(),
            "app.example.com"
        );
        assert_eq!(url("tcp://1.tcp.example.com:20001").port, Some(20001));
        assert_eq!(url("1.tcp.example.com:27210").scheme, None);
        assert_eq!(url("app.example.com").host.unwrap(), "app.example.com");
        assert_eq!(url("https://*.example.com").host.unwrap(), "*.example.com");
        let scheme_only = url("tls://");
        assert_eq!(
            (scheme_only.scheme, scheme_only.host),
            (Some(Scheme::Tls), None)
        );
        assert_eq!(url("http://svc.internal").http_scheme(), Some("http"));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (text, want) in [
            ("ftp://x.example.com", "scheme"),
            ("https://x.example.com/path", "path"),
            ("https://user:pw@x.example.com", "user name"),
            ("https://x.example.com:99999", "not a port"),
            ("https://:443", "needs a host"),
            ("https://[::1]", "IP address"),
        ] {
            let err = EndpointUrl::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = url("tls://x.example.com").check(Proto::Http).unwrap_err();
        assert!(err.to_string().contains("http tunnel"), "{err}");
        let err = url("tcp://x.example.com").check(Proto::Tcp).unwrap_err();
        assert!(err.to_string().contains("host:port"), "{err}");
        assert!(url("tcp://").check(Proto::Tcp).is_ok());
    }

    #[test]
    fn subdomains() {
        assert!(check_subdomain("my-app").is_ok());
        assert!(check_subdomain("a.b").is_ok());
        for bad in ["", "-x", "x_y", "a..b", "x.example.com/"] {
            assert!(check_subdomain(bad).is_err(), "{bad}");
        }
    }
}
