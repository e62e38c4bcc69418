//! Domain routing: exact names and `*.` wildcards, the most specific wins
//! (`app.example.test` beats `*.example.test`, which beats `*.test`), and a
//! wildcard also covers nested names (`a.b.example.test`), as ngrok does.
//!
//! Every name is normalised once, here, so that `App.Example.TEST.:443`
//! cannot slip past a rule written for `app.example.test`.

use std::collections::HashMap;

/// Longest DNS name.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Why a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is longer than 253 characters")]
    TooLong,
    #[error("the name has an empty label")]
    EmptyLabel,
    #[error("the label {0:?} is longer than 63 characters")]
    LabelTooLong(String),
    #[error("the name contains {0:?}; only letters, digits, '-', '_' and '.' are allowed")]
    BadCharacter(char),
    #[error("'*' is only allowed as the whole left-most label (\"*.example.com\")")]
    BadWildcard,
    #[error("the port in {0:?} is not a number")]
    BadPort(String),
    #[error("{0:?} is not a valid IPv6 address")]
    BadAddress(String),
}

/// A domain an endpoint binds: an exact name or a wildcard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainPattern {
    Exact(String),
    /// `*.suffix`; holds the suffix.
    Wildcard(String),
}

impl DomainPattern {
    /// Parses and normalises `app.example.test` or `*.example.test`.
    pub fn parse(raw: &str) -> Result<DomainPattern, NameError> {
        if let Some(suffix) = raw.strip_prefix("*.") {
            let suffix = normalize_name(suffix)?;
            if suffix.contains('*') {
                return Err(NameError::BadWildcard);
            }
            return Ok(DomainPattern::Wildcard(suffix));
        }
        let name = normalize_name(raw)?;
        Ok(DomainPattern::Exact(name))
    }

    /// Whether this pattern covers `other`: the same name, a name under a
    /// wildcard, or a narrower wildcard (`*.a.example.com` under `*.example.com`).
    pub fn covers(&self, other: &DomainPattern) -> bool {
        match (self, other) {
            (DomainPattern::Exact(a), DomainPattern::Exact(b)) => a == b,
            (DomainPattern::Exact(_), DomainPattern::Wildcard(_)) => false,
            (DomainPattern::Wildcard(_), DomainPattern::Exact(name)) => self.matches(name),
            (DomainPattern::Wildcard(suffix), DomainPattern::Wildcard(other)) => {
                other == suffix || self.matches(other)
            }
        }
    }

    /// Whether `name` (normalised) falls under this pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            DomainPattern::Exact(exact) => exact == name,
            DomainPattern::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(name) => f.write_str(name),
            DomainPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Lower-cases, drops one trailing dot and checks the characters.
pub fn normalize_name(raw: &str) -> Result<String, NameError> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(NameError::LabelTooLong(label.to_string()));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(if c == '*' {
                NameError::BadWildcard
            } else {
                NameError::BadCharacter(c)
            });
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// Normalises a Host header or `:authority`: drops the port, then as
/// [`normalize_name`]. IP literals are returned as they are.
pub fn normalize_host(raw: &str) -> Result<String, NameError> {
    let raw = raw.trim();
    if let Ok(ip) = raw.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: "[::1]" or "[::1]:443"
        let (ip, after) = rest.split_once(']').ok_or(NameError::BadCharacter('['))?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return Err(NameError::BadPort(raw.to_string()));
        }
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| NameError::BadAddress(ip.to_string()))?;
        return Ok(ip.to_string());
    }
    let host = match raw.rsplit_once(':') {
        Some((host, port)) => {
            if !is_port(port) {
                return Err(NameError::BadPort(raw.to_string()));
            }
            host
        }
        None => raw,
    };
    normalize_name(host)
}

fn is_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u16>().is_ok()
}

/// Maps domains to values (endpoints).
#[derive(Debug)]
pub struct Router<T> {
    exact: HashMap<String, T>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, T>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> Router<T> {
    /// Adds a route; gives the value back when the pattern is taken.
    pub fn insert(&mut self, pattern: &DomainPattern, value: T) -> Result<(), T> {
        let map = match pattern {
            DomainPattern::Exact(name) => (&mut self.exact, name),
            DomainPattern::Wildcard(suffix) => (&mut self.wildcard, suffix),
        };
        match map.0.entry(map.1.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => Err(value),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(value);
                Ok(())
            }
        }
    }

    pub fn remove(&mut self, pattern: &DomainPattern) -> Option<T> {
        match pattern {
            DomainPattern::Exact(name) => self.exact.remove(name),
            DomainPattern::Wildcard(suffix) => self.wildcard.remove(suffix),
        }
    }

    pub fn get(&self, pattern: &DomainPattern) -> Option<&T> {
        match pattern {
            DomainPattern::Exact(name) => self.exact.get(name),
            DomainPattern::Wildcard(suffix) => self.wildcard.get(suffix),
        }
    }

    /// The most specific route for a normalised name.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        if let Some(value) = self.exact.get(name) {
            return Some(value);
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(value) = self.wildcard.get(rest) {
                return Some(value);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(patterns: &[&'static str]) -> Router<&'static str> {
        let mut r = Router::default();
        for p in patterns {
            r.insert(&DomainPattern::parse(p).unwrap(), *p).unwrap();
        }
        r
    }

    #[test]
    fn most_specific_wins() {
        let r = router(&[
            "app.example.test",
            "*.example.test",
            "*.test",
            "*.c1.example.test",
        ]);
        assert_eq!(r.lookup("app.example.test"), Some(&"app.example.test"));
        assert_eq!(r.lookup("other.example.test"), Some(&"*.example.test"));
        assert_eq!(
            r.lookup("a.b.example.test"),
            Some(&"*.example.test"),
            "nested names"
        );
        assert_eq!(r.lookup("x.c1.example.test"), Some(&"*.c1.example.test"));
        assert_eq!(r.lookup("example.test"), Some(&"*.test"));
        assert_eq!(r.lookup("test"), None);
        assert_eq!(r.lookup("example.org"), None);
    }

    #[test]
    fn wildcard_does_not_cover_its_own_suffix() {
        let r = router(&["*.example.test"]);
        assert_eq!(r.lookup("example.test"), None);
        assert_eq!(r.lookup("xexample.test"), None);
    }

    #[test]
    fn duplicate_patterns_are_refused() {
        let mut r = router(&["app.example.test"]);
        let again = DomainPattern::parse("APP.example.test.").unwrap();
        assert_eq!(r.insert(&again, "second"), Err("second"));
        assert!(r.remove(&again).is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host("App.Example.TEST.:443").unwrap(),
            "app.example.test"
        );
        assert_eq!(
            normalize_host("app.example.test").unwrap(),
            "app.example.test"
        );
        assert_eq!(normalize_host("[::1]:8443").unwrap(), "::1");
        assert_eq!(normalize_host("[0:0::1]").unwrap(), "::1");
        // Found by the `host` fuzz target: brackets must hold an address.
        assert_eq!(
            normalize_host("[\n:1]:8443"),
            Err(NameError::BadAddress("\n:1".into()))
        );
        assert!(normalize_host("[app.test]").is_err());
        assert_eq!(normalize_host("127.0.0.1:80").unwrap(), "127.0.0.1");
        assert!(normalize_host("").is_err());
        assert!(normalize_host("a@b.test").is_err());
        assert!(normalize_host("a..b").is_err());
        assert!(normalize_host("app.test:99999").is_err());
        assert!(normalize_host("app.test:").is_err());
        assert!(normalize_host("app test").is_err());
        assert!(normalize_host(&format!("{}.test", "a".repeat(64))).is_err());
    }

    #[test]
    fn patterns() {
        assert_eq!(
            DomainPattern::parse("*.Example.test").unwrap(),
            DomainPattern::Wildcard("example.test".into())
        );
        assert!(DomainPattern::parse("app.*.example.test").is_err());
        assert!(DomainPattern::parse("*-app.example.test").is_err());
        assert!(DomainPattern::parse("*.*.example.test").is_err());
        let w = DomainPattern::parse("*.example.test").unwrap();
        assert!(w.matches("a.example.test"));
        assert!(w.matches("a.b.example.test"));
        assert!(!w.matches("example.test"));
        assert!(!w.matches("aexample.test"));
        assert_eq!(w.to_string(), "*.example.test");
    }
}
