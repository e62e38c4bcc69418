//! Who may use the agent API: the `Host` allow-list (against DNS
//! rebinding), the configured credentials, and a same-origin check on
//! requests that change something (against cross-site requests from a
//! browser on the agent's machine).

use std::net::IpAddr;

use base64::Engine;
use http::{HeaderMap, Method, header};

use super::config::WebAuth;

/// One `web_allow_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRule {
    Ip(IpAddr),
    /// An address and a prefix length.
    Cidr(IpAddr, u8),
    /// This name only.
    Exact(String),
    /// `.example.com`: the name and every name under it.
    Suffix(String),
}

impl HostRule {
    pub(crate) fn parse(s: &str) -> Result<HostRule, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if s.is_empty() {
            return Err("an entry is empty".into());
        }
        if let Some((ip, bits)) = s.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?;
            return Ok(HostRule::Cidr(ip, bits));
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(HostRule::Ip(ip));
        }
        let name = s.strip_prefix('.').unwrap_or(&s);
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(format!("{s:?} is not a host name, IP, CIDR or .suffix"));
        }
        Ok(if s.starts_with('.') {
            HostRule::Suffix(name.to_string())
        } else {
            HostRule::Exact(name.to_string())
        })
    }

    fn matches(&self, host: &str) -> bool {
        let ip = host.parse::<IpAddr>().ok();
        match self {
            HostRule::Ip(want) => ip == Some(*want),
            HostRule::Cidr(net, bits) => ip.is_some_and(|ip| in_cidr(ip, *net, *bits)),
            HostRule::Exact(name) => host == name,
            HostRule::Suffix(name) => {
                host == name
                    || host
                        .strip_suffix(name.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
        }
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The host of a `Host` header: lower case, without port or brackets.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a request's `Host` may be answered: loopback names and
/// addresses always; `rules`; and `tunnel_domains`, the domains (exact, or
/// `*.` wildcards) of tunnels that forward to this API, since a request
/// through such a tunnel carries the tunnel's domain.
pub(crate) fn host_allowed(
    headers: &HeaderMap,
    rules: &[HostRule],
    tunnel_domains: &[String],
) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let host = host_name(host);
    if host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    {
        return true;
    }
    rules.iter().any(|r| r.matches(&host))
        || tunnel_domains.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            match d.strip_prefix("*.") {
                Some(base) => host
                    .strip_suffix(base)
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => host == d,
            }
        })
}

/// Whether the request carries the configured credentials.
pub(crate) fn authorized(auth: &WebAuth, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (scheme, credentials) = given.split_once(' ').unwrap_or((given, ""));
    match auth {
        WebAuth::Open => true,
        WebAuth::Bearer(token) => {
            scheme.eq_ignore_ascii_case("bearer")
                && constant_time_eq(credentials.trim().as_bytes(), token.expose().as_bytes())
        }
        WebAuth::Basic { user, password } => {
            if !scheme.eq_ignore_ascii_case("basic") {
                return false;
            }
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials.trim())
            else {
                return false;
            };
            let Some((u, p)) = std::str::from_utf8(&decoded)
                .ok()
                .and_then(|d| d.split_once(':'))
            else {
                return false;
            };
            // Both compared, so the time taken does not say which was wrong.
            let user_ok = constant_time_eq(u.as_bytes(), user.as_bytes());
            let password_ok = constant_time_eq(p.as_bytes(), password.expose().as_bytes());
            user_ok & password_ok
        }
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a browser sent this state-changing request from another site:
/// an `Origin` that is not this `Host`, or `Sec-Fetch-Site: cross-site`.
/// curl and other non-browser clients send neither and pass.
pub(crate) fn cross_site(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site")) {
        return true;
    }
    match header(header::ORIGIN.as_str()) {
        None => false,
        Some(origin) => {
            let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
            let host = header(header::HOST.as_str()).unwrap_or("");
            authority.is_empty() || !authority.eq_ignore_ascii_case(host)
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use postern_net::Secret;

    fn with(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn host(h: &str) -> HeaderMap {
        with(&[("host", h)])
    }

    #[test]
    fn loopback_hosts_are_always_allowed() {
        for h in [
            "localhost",
            "localhost:4040",
            "127.0.0.1:4040",
            "127.1.2.3",
            "[::1]:4040",
            "app.localhost",
        ] {
            assert!(host_allowed(&host(h), &[], &[]), "{h}");
        }
        for h in ["evil.example", "10.0.0.1:4040", "localhost.evil.example"] {
            assert!(!host_allowed(&host(h), &[], &[]), "{h}");
        }
        assert!(!host_allowed(&HeaderMap::new(), &[], &[]), "no Host");
    }

    #[test]
    fn allow_list_entries() {
        let rules: Vec<HostRule> = ["10.0.0.0/8", "192.168.1.5", "box.lan", ".corp.example"]
            .iter()
            .map(|r| HostRule::parse(r).unwrap())
            .collect();
        for h in [
            "10.1.2.3:4040",
            "192.168.1.5",
            "box.lan:4040",
            "corp.example",
            "a.b.corp.example",
        ] {
            assert!(host_allowed(&host(h), &rules, &[]), "{h}");
        }
        for h in ["11.0.0.1", "192.168.1.6", "x.box.lan", "evilcorp.example"] {
            assert!(!host_allowed(&host(h), &rules, &[]), "{h}");
        }
        assert!(HostRule::parse("10.0.0.0/33").is_err());
        assert!(HostRule::parse("bad host").is_err());
        assert!(HostRule::parse("").is_err());
    }

    #[test]
    fn domains_of_tunnels_to_the_api_are_allowed() {
        let domains = vec![
            "agent.customer1.example.test".to_string(),
            "*.ops.example.test".to_string(),
        ];
        assert!(host_allowed(
            &host("Agent.Customer1.example.test:4443"),
            &[],
            &domains
        ));
        assert!(host_allowed(&host("a.ops.example.test"), &[], &domains));
        assert!(!host_allowed(&host("ops.example.test"), &[], &domains));
        assert!(!host_allowed(
            &host("api.customer1.example.test"),
            &[],
            &domains
        ));
    }

    #[test]
    fn bearer_and_basic() {
        let open = WebAuth::Open;
        assert!(authorized(&open, &HeaderMap::new()));
        let bearer = WebAuth::Bearer(Secret::new("tok-0123456789abcdef"));
        assert!(authorized(
            &bearer,
            &with(&[("authorization", "Bearer tok-0123456789abcdef")])
        ));
        assert!(!authorized(
            &bearer,
            &with(&[("authorization", "Bearer nope")])
        ));
        assert!(!authorized(&bearer, &HeaderMap::new()));
        let basic = WebAuth::Basic {
            user: "admin".into(),
            password: Secret::new("s3cret-pass"),
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let good = format!("Basic {}", b64("admin:s3cret-pass"));
        let bad = format!("Basic {}", b64("admin:wrong-pass"));
        assert!(authorized(&basic, &with(&[("authorization", &good)])));
        assert!(!authorized(&basic, &with(&[("authorization", &bad)])));
        assert!(!authorized(
            &basic,
            &with(&[("authorization", "Basic !!!")])
        ));
        assert!(!authorized(
            &basic,
            &with(&[("authorization", "Bearer s3cret-pass")])
        ));
    }

    #[test]
    fn cross_site_writes_are_refused() {
        let post = Method::POST;
        assert!(!cross_site(&post, &host("127.0.0.1:4040")), "curl");
        assert!(!cross_site(
            &post,
            &with(&[
                ("host", "127.0.0.1:4040"),
                ("origin", "http://127.0.0.1:4040")
            ])
        ));
        assert!(cross_site(
            &post,
            &with(&[
                ("host", "127.0.0.1:4040"),
                ("origin", "https://evil.example")
            ])
        ));
        assert!(cross_site(
            &post,
            &with(&[("host", "127.0.0.1:4040"), ("origin", "null")])
        ));
        assert!(cross_site(
            &Method::DELETE,
            &with(&[("host", "127.0.0.1:4040"), ("sec-fetch-site", "cross-site")])
        ));
        assert!(!cross_site(
            &Method::GET,
            &with(&[
                ("host", "127.0.0.1:4040"),
                ("origin", "https://evil.example")
            ])
        ));
    }
}
