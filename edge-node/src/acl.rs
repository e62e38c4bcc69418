//! ngrok's authtoken ACLs: `bind:` rules deciding what an agent may serve.
//!
//! - no rules: anything;
//! - `bind:*`: anything;
//! - `bind:app.example.com`: exactly that name;
//! - `bind:*.example.com`: any name ending in `.example.com`, at any depth,
//!   and wildcards at or below it (`*.example.com`, `*.a.example.com`);
//! - `bind:*:20000` or `bind:*:20000-20010`: TCP endpoints on those ports.

use std::ops::RangeInclusive;

use postern_ingress::DomainPattern;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    Any,
    Name(DomainPattern),
    Ports(RangeInclusive<u16>),
}

/// An ACL rule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("rule {rule:?}: {reason}")]
pub struct AclError {
    pub rule: String,
    pub reason: String,
}

/// A parsed ACL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Acl, AclError> {
        let rules = rules
            .iter()
            .map(|r| {
                parse_rule(r.as_ref()).map_err(|reason| AclError {
                    rule: r.as_ref().to_string(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Acl { rules })
    }

    /// Whether an HTTP or TLS endpoint on `pattern` may be bound.
    pub fn allows_name(&self, pattern: &DomainPattern) -> bool {
        self.rules.is_empty()
            || self.rules.iter().any(|rule| match rule {
                Rule::Any => true,
                Rule::Ports(_) => false,
                Rule::Name(rule) => rule.covers(pattern),
            })
    }

    /// Whether a TCP endpoint on `port` may be bound (0: any free port).
    pub fn allows_port(&self, port: u16) -> bool {
        self.rules.is_empty()
            || self.rules.iter().any(|rule| match rule {
                Rule::Any => true,
                Rule::Ports(range) => port != 0 && range.contains(&port),
                Rule::Name(_) => false,
            })
    }

    pub fn is_unrestricted(&self) -> bool {
        self.rules.is_empty() || self.rules.contains(&Rule::Any)
    }
}

/// A rule, or why it is refused.
fn parse_rule(rule: &str) -> Result<Rule, String> {
    let Some(target) = rule.strip_prefix("bind:") else {
        return Err(
            "only bind: rules exist (\"bind:app.example.com\", \"bind:*.example.com\", \"bind:*\")"
                .into(),
        );
    };
    if target == "*" {
        return Ok(Rule::Any);
    }
    if target.contains('=') {
        return Err(
            "label rules (bind:key=value) are for labeled tunnels, which Postern does not have"
                .into(),
        );
    }
    if let Some((host, ports)) = target.rsplit_once(':') {
        if host != "*" {
            return Err(
                "TCP rules name any host: \"bind:*:20000\" or \"bind:*:20000-20010\"".into(),
            );
        }
        let parse = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
        let range = match ports.split_once('-') {
            Some((a, b)) => parse(a).zip(parse(b)).map(|(a, b)| a..=b),
            None => parse(ports).map(|p| p..=p),
        };
        return match range {
            Some(r) if !r.is_empty() => Ok(Rule::Ports(r)),
            _ => Err(format!("{ports:?} is not a port or port range")),
        };
    }
    DomainPattern::parse(target)
        .map(Rule::Name)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    #[test]
    fn no_rules_and_star_allow_everything() {
        for acl in [
            Acl::parse::<&str>(&[]).unwrap(),
            Acl::parse(&["bind:*"]).unwrap(),
        ] {
            assert!(acl.allows_name(&p("anything.example.org")));
            assert!(acl.allows_name(&p("*.example.org")));
            assert!(acl.allows_port(22));
            assert!(acl.allows_port(0));
        }
    }

    #[test]
    fn exact_rule() {
        let acl = Acl::parse(&["bind:app.example.test"]).unwrap();
        assert!(acl.allows_name(&p("app.example.test")));
        assert!(acl.allows_name(&p("APP.example.test.")), "normalised");
        assert!(!acl.allows_name(&p("x.app.example.test")));
        assert!(!acl.allows_name(&p("*.app.example.test")));
        assert!(!acl.allows_name(&p("example.test")));
        assert!(!acl.allows_port(22));
    }

    #[test]
    fn wildcard_rule_covers_names_and_narrower_wildcards() {
        let acl = Acl::parse(&["bind:*.customer1.example.test"]).unwrap();
        assert!(acl.allows_name(&p("app.customer1.example.test")));
        assert!(acl.allows_name(&p("a.b.customer1.example.test")));
        assert!(acl.allows_name(&p("*.customer1.example.test")));
        assert!(acl.allows_name(&p("*.a.customer1.example.test")));
        assert!(!acl.allows_name(&p("customer1.example.test")));
        assert!(!acl.allows_name(&p("*.example.test")), "wider wildcard");
        assert!(!acl.allows_name(&p("app.customer2.example.test")));
        assert!(!acl.allows_name(&p("app.customer1.example.test.evil.com")));
        assert!(!acl.allows_name(&p("xcustomer1.example.test")));
    }

    #[test]
    fn port_rules() {
        let acl = Acl::parse(&["bind:*:20000-20010", "bind:*:2222"]).unwrap();
        assert!(acl.allows_port(20005));
        assert!(acl.allows_port(2222));
        assert!(!acl.allows_port(22));
        assert!(!acl.allows_port(0), "a random port is not within the rule");
        assert!(!acl.allows_name(&p("app.example.test")));
    }

    #[test]
    fn bad_rules_are_refused_with_reasons() {
        for (rule, want) in [
            ("app.example.test", "only bind:"),
            ("bind:foo=bar", "label"),
            ("bind:a.*.example", "'*'"),
            ("bind:host:22", "any host"),
            ("bind:*:0", "port"),
            ("bind:*:9-3", "port"),
        ] {
            let err = format!("{:#}", Acl::parse(&[rule]).unwrap_err());
            assert!(err.contains(want), "{rule}: {err}");
        }
    }
}
