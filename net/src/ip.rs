//! IP restrictions (ngrok's `allow_cidrs` / `deny_cidrs`) and the one place
//! that decides which address a visitor has: the TCP peer, unless that peer
//! is a listed load balancer that tells us otherwise (PROXY header or
//! `X-Forwarded-For`).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Who may connect to an endpoint. Deny wins; an empty allow list allows
/// everyone not denied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpPolicy {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// A CIDR that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?} is not a CIDR like \"10.0.0.0/8\" or \"2001:db8::/32\"")]
pub struct CidrError {
    pub field: &'static str,
    pub value: String,
}

/// Parses a CIDR; a bare address is a /32 or /128.
pub fn parse_cidr(field: &'static str, value: &str) -> Result<IpNet, CidrError> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| CidrError {
            field,
            value: value.to_string(),
        })
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) count as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

impl IpPolicy {
    pub fn parse<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<IpPolicy, CidrError> {
        Ok(IpPolicy {
            allow: allow
                .iter()
                .map(|c| parse_cidr("allow_cidrs", c.as_ref()))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|c| parse_cidr("deny_cidrs", c.as_ref()))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !contains(&self.deny, ip) && (self.allow.is_empty() || contains(&self.allow, ip))
    }
}

/// Load balancers whose word about the client address is taken.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    pub cidrs: Vec<IpNet>,
    /// Trusted peers send a PROXY header (v1 or v2) first on every connection.
    pub proxy_protocol: bool,
    /// Trusted peers' `X-Forwarded-For` names the client (HTTP only).
    pub forwarded_for: bool,
}

impl TrustedProxies {
    pub fn trusts(&self, peer: IpAddr) -> bool {
        contains(&self.cidrs, canonical(peer))
    }

    /// The visitor of an HTTP request: the right-most address of
    /// `X-Forwarded-For` that is not itself a trusted proxy, when the peer
    /// is trusted; otherwise the peer.
    pub fn http_client(&self, peer: SocketAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.forwarded_for || !self.trusts(peer.ip()) {
            return peer.ip();
        }
        let Some(header) = forwarded_for else {
            return peer.ip();
        };
        for hop in header.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.trusts(ip) => continue,
                Ok(ip) => return ip,
                Err(_) => return peer.ip(),
            }
        }
        peer.ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_empty_allow_allows() {
        let p = IpPolicy::parse(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"]).unwrap();
        assert!(p.allows(ip("10.2.3.4")));
        assert!(!p.allows(ip("10.1.2.3")), "deny wins");
        assert!(!p.allows(ip("192.168.1.1")), "not in the allow list");
        assert!(p.allows(ip("2001:db8::1")));
        assert!(!p.allows(ip("2001:db9::1")));
        assert!(
            p.allows(ip("::ffff:10.2.3.4")),
            "IPv4-mapped counts as IPv4"
        );
        assert!(!p.allows(ip("::ffff:10.1.0.1")));
        let deny_only = IpPolicy::parse(&[] as &[&str], &["127.0.0.1"]).unwrap();
        assert!(!deny_only.allows(ip("127.0.0.1")));
        assert!(deny_only.allows(ip("127.0.0.2")));
        assert!(IpPolicy::default().allows(ip("1.2.3.4")));
    }

    #[test]
    fn bad_cidrs_name_the_field() {
        let e = IpPolicy::parse(&["10.0.0.0/33"], &[]).unwrap_err();
        assert_eq!(e.field, "allow_cidrs");
        assert!(
            IpPolicy::parse(&[] as &[&str], &["nope"])
                .unwrap_err()
                .to_string()
                .contains("deny_cidrs")
        );
        assert_eq!(
            parse_cidr("x", "10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let t = TrustedProxies {
            cidrs: vec![parse_cidr("t", "10.0.0.0/8").unwrap()],
            proxy_protocol: false,
            forwarded_for: true,
        };
        let lb: SocketAddr = "10.0.0.5:1234".parse().unwrap();
        let other: SocketAddr = "203.0.113.9:1234".parse().unwrap();
        assert_eq!(
            t.http_client(lb, Some("198.51.100.7, 10.0.0.9")),
            ip("198.51.100.7")
        );
        assert_eq!(
            t.http_client(other, Some("198.51.100.7")),
            ip("203.0.113.9"),
            "spoofed"
        );
        assert_eq!(t.http_client(lb, Some("garbage")), ip("10.0.0.5"));
        assert_eq!(t.http_client(lb, None), ip("10.0.0.5"));
    }
}
