//! Reaching the edge through an outbound proxy: ngrok's `proxy_url`, or
//! the `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` convention. An `http://`
//! proxy is asked to `CONNECT`; an `https://` one the same inside TLS to
//! the proxy; a `socks5://` (or `socks5h://`) one speaks SOCKS5 (RFC 1928),
//! with a user name and password (RFC 1929) when the URL carries them. The
//! edge's own TLS then runs through the tunnel the proxy opened.

use std::{fmt, sync::Arc};

use base64::Engine;
use postern_net::Secret;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::error::{AgentError, ConfigError, TlsSetupError, bail, invalid};

/// Returns [`AgentError::Proxy`] with a message formatted as `format!`
/// takes it: the proxy refused, or answered what the agent cannot use.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(AgentError::Proxy(format!($($arg)*)))
    };
}

/// A byte stream of any kind: to the edge (a TCP connection, or a tunnel
/// through a proxy), or to an upstream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The proxy's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Http,
    Https,
    Socks5,
}

/// An outbound proxy and the hosts that bypass it.
#[derive(Clone)]
pub struct Proxy {
    kind: Kind,
    host: String,
    port: u16,
    credentials: Option<(String, Secret)>,
    /// Where the URL came from (`proxy_url`, `HTTPS_PROXY`), for messages.
    source: &'static str,
    /// `NO_PROXY`: hosts (and their subdomains), IPs, or `*`.
    no_proxy: Vec<String>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self, self.source)
    }
}

impl fmt::Display for Proxy {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            Kind::Http => "http",
            Kind::Https => "https",
            Kind::Socks5 => "socks5",
        };
        let user = match &self.credentials {
            Some((user, _)) => format!("{user}:********@"),
            None => String::new(),
        };
        write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
    }
}

/// The environment variables that name a proxy, in the order read.
const PROXY_VARS: &[&str] = &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];

impl Proxy {
    /// The proxy for the tunnel connection: `proxy_url` when given, else
    /// the environment's; `NO_PROXY` applies to either.
    pub fn configured(proxy_url: Option<&str>) -> Result<Option<Proxy>, ConfigError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let (text, source) = match proxy_url {
            Some(url) if !url.is_empty() => (url.to_string(), "proxy_url"),
            _ => match PROXY_VARS.iter().find_map(|v| env(v).map(|t| (t, *v))) {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let mut proxy = Proxy::parse(&text, source)?;
        proxy.no_proxy = env("NO_PROXY")
            .or_else(|| env("no_proxy"))
            .map(|list| {
                list.split(',')
                    .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(proxy))
    }

    /// Reads `scheme://[user[:password]@]host[:port][/]`.
    fn parse(text: &str, source: &'static str) -> Result<Proxy, ConfigError> {
        let shown = || match text.rsplit_once('@') {
            Some((_, host)) => {
                format!("{}…@{host}", &text[..text.find("://").map_or(0, |i| i + 3)])
            }
            None => text.to_string(),
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            invalid!(
                "{source}: {:?} has no scheme (http://, https:// or socks5://)",
                shown()
            )
        })?;
        let (kind, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (Kind::Http, 80),
            "https" => (Kind::Https, 443),
            "socks5" | "socks5h" => (Kind::Socks5, 1080),
            other => bail!("{source}: the scheme {other:?} is not http, https or socks5"),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, rest),
        };
        if hostport.contains('/') {
            bail!("{source}: {:?}: a proxy URL has no path", shown());
        }
        // A bracketed IPv6 literal keeps its colons; the port follows the `]`.
        let (host, port) = match hostport.strip_prefix('[') {
            Some(bracketed) => match bracketed.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => (host, Some(port.strip_prefix(':').unwrap_or(port))),
                None => bail!(
                    "{source}: {:?} opens an IPv6 address with [ and never closes it",
                    shown()
                ),
            },
            None => match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            },
        };
        let port = match port {
            None => default_port,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid!("{source}: {port:?} is not a port"))?,
        };
        if host.is_empty() {
            bail!("{source}: {:?} names no host", shown());
        }
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user)
                    .map_err(|e| e.within(format!("{source}: the user name")))?;
                let password = percent_decode(password)
                    .map_err(|e| e.within(format!("{source}: the password")))?;
                if kind == Kind::Socks5 && (user.len() > 255 || password.len() > 255) {
                    bail!("{source}: SOCKS5 user names and passwords are at most 255 bytes");
                }
                Some((user, Secret::new(password)))
            }
        };
        Ok(Proxy {
            kind,
            host: host.to_string(),
            port,
            credentials,
            source,
            no_proxy: Vec::new(),
        })
    }

    /// Whether `host` goes through the proxy (`NO_PROXY` does not name it,
    /// nor a domain it is under).
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            let entry = entry.split_once(':').map_or(entry.as_str(), |(h, _)| h);
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
    }

    /// Opens a tunnel to `host:port` through the proxy.
    pub async fn connect(&self, host: &str, port: u16) -> Result<Box<dyn Io>, AgentError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| AgentError::ProxyIo {
                step: format!("{}: connecting to the proxy {self}", self.source),
                source,
            })?;
        tcp.set_nodelay(true)?;
        match self.kind {
            Kind::Http => {
                let mut tcp = tcp;
                self.http_connect(&mut tcp, host, port).await?;
                Ok(Box::new(tcp))
            }
            Kind::Https => {
                let name = ServerName::try_from(self.host.clone()).map_err(|source| {
                    AgentError::ProxyName {
                        what: format!("{}: {:?} is not a TLS name", self.source, self.host),
                        source,
                    }
                })?;
                let config =
                    rustls::ClientConfig::builder_with_provider(postern_net::crypto_provider())
                        .with_safe_default_protocol_versions()
                        .map_err(TlsSetupError::Protocol)?
                        .with_root_certificates(crate::tls::host_roots()?)
                        .with_no_client_auth();
                let mut tls = TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|source| AgentError::ProxyIo {
                        step: format!("{}: TLS to the proxy {self}", self.source),
                        source,
                    })?;
                self.http_connect(&mut tls, host, port).await?;
                Ok(Box::new(tls))
            }
            Kind::Socks5 => {
                let mut tcp = tcp;
                self.socks5_connect(&mut tcp, host, port).await?;
                Ok(Box::new(tcp))
            }
        }
    }

    async fn http_connect(
        &self,
        stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
        host: &str,
        port: u16,
    ) -> Result<(), AgentError> {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, password)) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", password.expose()));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        // Byte by byte up to the blank line: what follows belongs to the
        // edge's TLS.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                refuse!(
                    "{}: the proxy {self} sent an answer head over 16 KiB",
                    self.source
                );
            }
            let byte = stream
                .read_u8()
                .await
                .map_err(|source| AgentError::ProxyIo {
                    step: format!(
                        "{}: the proxy {self} closed the connection before answering CONNECT",
                        self.source
                    ),
                    source,
                })?;
            head.push(byte);
        }
        let status_line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let code = status_line.split_whitespace().nth(1).unwrap_or_default();
        match code {
            "200" => Ok(()),
            // 407 is the standard answer; some proxies (tinyproxy) send 401.
            "401" | "407" if self.credentials.is_none() => refuse!(
                "{}: the proxy {self} wants credentials ({code}); put them in the URL as user:password@",
                self.source
            ),
            "401" | "407" => refuse!(
                "{}: the proxy {self} refused the credentials ({code})",
                self.source
            ),
            _ => refuse!(
                "{}: the proxy {self} refused CONNECT {target}: {status_line:?}",
                self.source
            ),
        }
    }

    async fn socks5_connect(
        &self,
        stream: &mut TcpStream,
        host: &str,
        port: u16,
    ) -> Result<(), AgentError> {
        let source = self.source;
        let offered: &[u8] = if self.credentials.is_some() {
            &[0x00, 0x02]
        } else {
            &[0x00]
        };
        let mut hello = vec![0x05, offered.len() as u8];
        hello.extend_from_slice(offered);
        stream.write_all(&hello).await?;
        let mut choice = [0u8; 2];
        stream
            .read_exact(&mut choice)
            .await
            .map_err(|e| AgentError::ProxyIo {
                step: format!("{source}: the SOCKS5 proxy {self} closed the connection"),
                source: e,
            })?;
        match choice {
            [0x05, 0x00] => {}
            [0x05, 0x02] => {
                let Some((user, password)) = &self.credentials else {
                    refuse!(
                        "{source}: the SOCKS5 proxy {self} asked for credentials that were not offered"
                    );
                };
                let password = password.expose().as_bytes();
                let mut auth = vec![0x01, user.len() as u8];
                auth.extend_from_slice(user.as_bytes());
                auth.push(password.len() as u8);
                auth.extend_from_slice(password);
                stream.write_all(&auth).await?;
                let mut status = [0u8; 2];
                stream.read_exact(&mut status).await?;
                if status[1] != 0 {
                    refuse!("{source}: the SOCKS5 proxy {self} refused the user name and password");
                }
            }
            [0x05, 0xff] if self.credentials.is_none() => refuse!(
                "{source}: the SOCKS5 proxy {self} wants credentials; put them in the URL as user:password@"
            ),
            [0x05, _] => refuse!(
                "{source}: the SOCKS5 proxy {self} accepts none of the offered authentication methods"
            ),
            _ => refuse!("{source}: {self} does not speak SOCKS5"),
        }
        let mut request = vec![0x05, 0x01, 0x00];
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            Ok(std::net::IpAddr::V4(ip)) => {
                request.push(0x01);
                request.extend_from_slice(&ip.octets());
            }
            Ok(std::net::IpAddr::V6(ip)) => {
                request.push(0x04);
                request.extend_from_slice(&ip.octets());
            }
            Err(_) => {
                let name = host.as_bytes();
                if name.len() > 255 {
                    refuse!("{source}: {host:?} is too long for SOCKS5");
                }
                request.push(0x03);
                request.push(name.len() as u8);
                request.extend_from_slice(name);
            }
        }
        request.extend_from_slice(&port.to_be_bytes());
        stream.write_all(&request).await?;
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).await?;
        if reply[1] != 0 {
            let why = match reply[1] {
                0x02 => "not allowed by its rules",
                0x03 => "network unreachable",
                0x04 => "host unreachable",
                0x05 => "connection refused",
                0x06 => "TTL expired",
                0x07 => "command not supported",
                0x08 => "address type not supported",
                _ => "general failure",
            };
            refuse!("{source}: the SOCKS5 proxy {self} could not connect to {host}:{port}: {why}");
        }
        // The bound address, which the agent does not need.
        let skip = match reply[3] {
            0x01 => 4,
            0x04 => 16,
            0x03 => usize::from(stream.read_u8().await?),
            other => refuse!("{source}: the SOCKS5 proxy {self} sent address type {other}"),
        };
        let mut rest = vec![0u8; skip + 2];
        stream.read_exact(&mut rest).await?;
        Ok(())
    }
}

/// Opens a byte stream to the edge at `addr` (`host:port`), through the
/// proxy when one applies to the host; `.localhost` names are loopback
/// (RFC 6761) whatever the resolver says.
pub async fn dial(proxy: Option<&Proxy>, addr: &str) -> Result<Box<dyn Io>, AgentError> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| AgentError::Address(addr.to_string()))?;
    if let Some(proxy) = proxy.filter(|p| p.applies_to(host)) {
        return proxy
            .connect(host.trim_start_matches('[').trim_end_matches(']'), port)
            .await;
    }
    let tcp = match localhost_addr(host, port) {
        Some(addr) => TcpStream::connect(addr).await?,
        None => TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    Ok(Box::new(tcp))
}

fn localhost_addr(host: &str, port: u16) -> Option<std::net::SocketAddr> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (host == "localhost" || host.ends_with(".localhost")).then(|| ([127, 0, 0, 1], port).into())
}

/// `%XX` escapes of a URL's user name or password.
fn percent_decode(text: &str) -> Result<String, ConfigError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .ok_or_else(|| invalid!("a '%' not followed by two hex digits"))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|e| ConfigError::field("a '%' not followed by two hex digits", e))?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| ConfigError::field("not UTF-8 once decoded", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://u%40x:p%3Aw@proxy.corp:3128/", "proxy_url").unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (Kind::Http, "proxy.corp", 3128)
        );
        let (user, password) = p.credentials.as_ref().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("u@x", "p:w"));
        assert_eq!(p.to_string(), "http://u@x:********@proxy.corp:3128");
        assert_eq!(Proxy::parse("https://proxy", "x").unwrap().port, 443);
        assert_eq!(Proxy::parse("socks5h://[::1]", "x").unwrap().port, 1080);
        assert_eq!(
            Proxy::parse("socks5://[::1]:9050", "x").unwrap().host,
            "::1"
        );
        for (bad, want) in [
            ("proxy:3128", "no scheme"),
            ("ftp://proxy", "not http, https or socks5"),
            ("http://proxy:x", "not a port"),
            ("http://", "names no host"),
            ("http://a:b@proxy/path", "no path"),
            ("http://a%zz:b@proxy", "user name"),
        ] {
            let err = format!("{:#}", Proxy::parse(bad, "proxy_url").unwrap_err());
            assert!(
                err.starts_with("proxy_url") && err.contains(want),
                "{bad}: {err}"
            );
            assert!(!err.contains(":b@"), "the password is never shown: {err}");
        }
    }

    #[test]
    fn localhost_names_are_loopback() {
        assert_eq!(
            localhost_addr("tunnel.us.connect.postern.localhost", 4443),
            Some(([127, 0, 0, 1], 4443).into())
        );
        assert_eq!(
            localhost_addr("localhost", 1),
            Some(([127, 0, 0, 1], 1).into())
        );
        assert_eq!(localhost_addr("example.test", 443), None);
    }

    #[test]
    fn no_proxy_names_hosts_and_their_subdomains() {
        let mut p = Proxy::parse("http://proxy:1", "x").unwrap();
        p.no_proxy = vec![
            "example.com".into(),
            "10.0.0.1".into(),
            "edge.test:443".into(),
        ];
        assert!(!p.applies_to("example.com"));
        assert!(!p.applies_to("tunnel.us.example.com"));
        assert!(p.applies_to("notexample.com"));
        assert!(!p.applies_to("10.0.0.1"));
        assert!(!p.applies_to("edge.test"));
        assert!(p.applies_to("other.test"));
        p.no_proxy = vec!["*".into()];
        assert!(!p.applies_to("anything"));
    }
}
