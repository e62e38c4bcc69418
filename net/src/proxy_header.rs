//! PROXY protocol headers (HAProxy spec, v1 text and v2 binary): written by
//! the agent in front of the upstream connection (`proxy_proto: 1 | 2`), and
//! parsed where a listener trusts a load balancer in front of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest legal v1 line, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// Largest v2 address block (addresses plus TLVs) we accept.
pub const V2_MAX_BLOCK: usize = 4096;

/// PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// From the agent config's `proxy_proto` value (`"1"`, `"2"`, or empty).
    pub fn from_config(value: &str) -> Result<Option<Version>, String> {
        match value.trim() {
            "" | "0" => Ok(None),
            "1" => Ok(Some(Version::V1)),
            "2" => Ok(Some(Version::V2)),
            other => Err(format!("proxy_proto must be 1 or 2, not {other:?}")),
        }
    }
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: Version,
    /// `None` for `UNKNOWN` (v1) or `LOCAL` / unspecified family (v2).
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// Why a header could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("PROXY v2 header: {0}")]
    BadV2(&'static str),
}

/// Writes a header carrying `source` (the visitor) and `destination` (the
/// address the visitor connected to).
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        Version::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, command PROXY
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&to_v6(s).octets());
                    out.extend_from_slice(&to_v6(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
            out
        }
    }
}

/// Both addresses in one family: IPv4 ones are mapped into IPv6 when the
/// other is IPv6 (the spec requires one family per header).
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (
            SocketAddr::new(IpAddr::V6(to_v6(a.ip())), a.port()),
            SocketAddr::new(IpAddr::V6(to_v6(b.ip())), b.port()),
        )
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Parses a header at the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((header, n)))` means the header is the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ParseError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        let prefix = b"PROXY ";
        let n = buf.len().min(prefix.len());
        if buf[..n] != prefix[..n] {
            return Err(ParseError::NotProxy);
        }
        return parse_v1(buf);
    }
    if buf[0] == V2_SIGNATURE[0] {
        let n = buf.len().min(V2_SIGNATURE.len());
        if buf[..n] != V2_SIGNATURE[..n] {
            return Err(ParseError::NotProxy);
        }
        return parse_v2(buf);
    }
    Err(ParseError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ParseError> {
    let Some(end) = buf
        .windows(2)
        .take(V1_MAX_LEN - 1)
        .position(|w| w == b"\r\n")
    else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ParseError::BadV1("no CRLF within 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ParseError::BadV1("not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let family = parts.next().ok_or(ParseError::BadV1("missing protocol"))?;
    let header = match family {
        "UNKNOWN" => ProxyHeader {
            version: Version::V1,
            source: None,
            destination: None,
        },
        "TCP4" | "TCP6" => {
            let mut field = || parts.next().ok_or(ParseError::BadV1("missing field"));
            let (sip, dip, sport, dport) = (field()?, field()?, field()?, field()?);
            if parts.next().is_some() {
                return Err(ParseError::BadV1("too many fields"));
            }
            let parse_ip = |s: &str| -> Result<IpAddr, ParseError> {
                if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                }
                .map_err(|_| ParseError::BadV1("bad address"))
            };
            let parse_port = |s: &str| -> Result<u16, ParseError> {
                if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.starts_with('0')) {
                    return Err(ParseError::BadV1("bad port"));
                }
                s.parse().map_err(|_| ParseError::BadV1("bad port"))
            };
            ProxyHeader {
                version: Version::V1,
                source: Some(SocketAddr::new(parse_ip(sip)?, parse_port(sport)?)),
                destination: Some(SocketAddr::new(parse_ip(dip)?, parse_port(dport)?)),
            }
        }
        _ => return Err(ParseError::BadV1("unknown protocol")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ParseError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::BadV2("version is not 2"));
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Err(ParseError::BadV2("unknown command"));
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_BLOCK {
        return Err(ParseError::BadV2("address block too large"));
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let block = &buf[16..16 + len];
    let (source, destination) = if command == 0 {
        (None, None) // LOCAL: addresses are to be ignored
    } else {
        match family {
            0x00 => (None, None),
            0x11 | 0x12 => {
                if block.len() < 12 {
                    return Err(ParseError::BadV2("IPv4 block too short"));
                }
                let ip =
                    |o: usize| Ipv4Addr::new(block[o], block[o + 1], block[o + 2], block[o + 3]);
                let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
                (
                    Some(SocketAddr::new(IpAddr::V4(ip(0)), port(8))),
                    Some(SocketAddr::new(IpAddr::V4(ip(4)), port(10))),
                )
            }
            0x21 | 0x22 => {
                if block.len() < 36 {
                    return Err(ParseError::BadV2("IPv6 block too short"));
                }
                let ip = |o: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&block[o..o + 16]);
                    Ipv6Addr::from(a)
                };
                let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
                (
                    Some(SocketAddr::new(IpAddr::V6(ip(0)), port(32))),
                    Some(SocketAddr::new(IpAddr::V6(ip(16)), port(34))),
                )
            }
            0x31 | 0x32 => (None, None), // UNIX sockets: no IP to report
            _ => return Err(ParseError::BadV2("unknown address family")),
        }
    };
    Ok(Some((
        ProxyHeader {
            version: Version::V2,
            source,
            destination,
        },
        16 + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4_exact_bytes() {
        let h = encode(
            Version::V1,
            addr("203.0.113.7:51234"),
            addr("127.0.0.1:443"),
        );
        assert_eq!(h, b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n");
    }

    #[test]
    fn v1_ipv6_and_mixed_families() {
        let h = encode(Version::V1, addr("[2001:db8::1]:1000"), addr("[::1]:443"));
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 1000 443\r\n");
        let mixed = encode(Version::V1, addr("10.0.0.1:1"), addr("[::1]:2"));
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n");
    }

    #[test]
    fn v2_ipv4_exact_bytes() {
        let h = encode(
            Version::V2,
            addr("203.0.113.7:51234"),
            addr("127.0.0.1:443"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7, 127, 0, 0, 1]);
        want.extend_from_slice(&51234u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
    }

    #[test]
    fn round_trips() {
        for (s, d) in [
            ("203.0.113.7:51234", "127.0.0.1:443"),
            ("[2001:db8::1]:1000", "[::1]:443"),
        ] {
            for v in [Version::V1, Version::V2] {
                let mut bytes = encode(v, addr(s), addr(d));
                let n = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let (h, used) = parse(&bytes).unwrap().unwrap();
                assert_eq!(used, n);
                assert_eq!(h.version, v);
                assert_eq!(h.source, Some(addr(s)));
                assert_eq!(h.destination, Some(addr(d)));
            }
        }
    }

    #[test]
    fn incomplete_needs_more_and_garbage_is_refused() {
        let full = encode(Version::V2, addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        let v1 = encode(Version::V1, addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        for cut in 0..v1.len() {
            assert_eq!(parse(&v1[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::NotProxy));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n").is_err());
        assert!(parse(b"PROXY TCP9 a b c d\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        let mut bad_version = full.clone();
        bad_version[12] = 0x31;
        assert!(parse(&bad_version).is_err());
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0.source, None);
    }

    #[test]
    fn config_values() {
        assert_eq!(Version::from_config(""), Ok(None));
        assert_eq!(Version::from_config("2"), Ok(Some(Version::V2)));
        assert!(Version::from_config("3").is_err());
    }
}
