//! The command an SSH client runs, in ngrok's grammar:
//! `ssh -R [name:]port:host:port user@host http|tls|tcp [options]`. The
//! options are the agent's flags of the same names, carried in the same
//! bind fields, so the registry checks and builds an SSH endpoint exactly
//! as an agent's. What SSH cannot do is refused with the reason
//! (`ERR_POSTERN_9020`): TLS termination at the edge or the agent, PROXY
//! headers, re-encryption to the upstream, a Traffic Policy document.

use postern_proto::{ErrorCode, Failure, pb};

/// Longest command line read.
const MAX_LINE: usize = 16 * 1024;
/// Most words in a command line.
const MAX_WORDS: usize = 256;

/// What the client's command asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub protocol: pb::Protocol,
    /// What every forward's bind carries besides its name or port.
    pub template: pb::BindRequest,
    /// `--url`'s name (HTTP and TLS endpoints).
    pub url: Option<String>,
}

/// A command line, understood.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Box<Command>),
    /// `--help` (or `help`): the usage, and nothing bound.
    Help,
}

/// The usage the session prints for `--help` and after a mistake.
pub const USAGE: &str = "\
usage: ssh -R [name:]port:localhost:port [v2@]<edge> http|tls|tcp [options]

  http   -R 443:localhost:8080 (or 80:…); -R app.example.com:443:… names the endpoint
  tls    -R app.example.com:443:localhost:443; TLS passes through to your service
  tcp    -R 0:localhost:22 (the edge picks the port) or -R <port>:localhost:22

options (ngrok's agent flags):
  --url <name>                           the endpoint's name (http, tls)
  --cidr-allow / --cidr-deny <cidr,...>  who may connect, by source address
  --pooling-enabled                      share the name with other endpoints
  http only:
  --basic-auth user:password             (repeat)
  --oauth <provider> [--oauth-client-id, --oauth-client-secret,
      --oauth-scope, --oauth-allow-email, --oauth-allow-domain]
  --mutual-tls-cas <ca id,...>           CAs of the edge's certificate store
  --request-header-add 'name: value' / --request-header-remove <name>
  --response-header-add 'name: value' / --response-header-remove <name>
  --host-header <name>|preserve  --compression  --circuit-breaker <0..1>
  --verify-webhook <provider> --verify-webhook-secret <secret>
  --ua-filter-allow / --ua-filter-deny <regex,...>  --scheme http,https
  --websocket-tcp-converter              WebSocket messages to a TCP service
  tls only:
  --terminate-at upstream                (the edge and the agent cannot terminate over SSH)
";

fn bad(detail: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::SSH_BAD_OPTION, detail)
}

fn unsupported(detail: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::SSH_NOT_SUPPORTED, detail)
}

/// Splits a command line as a POSIX shell would: blanks separate words,
/// single quotes keep everything, double quotes keep all but `\"` and
/// `\\`, a backslash outside quotes keeps the next character.
fn words(line: &str) -> Result<Vec<String>, Failure> {
    if line.len() > MAX_LINE {
        return Err(bad(format!(
            "the command line is {} bytes; at most {MAX_LINE}",
            line.len()
        )));
    }
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                words.extend(word.take());
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(bad("a single quote is not closed")),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(bad("a double quote is not closed")),
                        },
                        Some(c) => w.push(c),
                        None => return Err(bad("a double quote is not closed")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(bad("the command ends with a backslash")),
            },
            c if c.is_control() => {
                return Err(bad("the command holds a control character"));
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
        if words.len() > MAX_WORDS {
            return Err(bad(format!("more than {MAX_WORDS} words in the command")));
        }
    }
    words.extend(word);
    Ok(words)
}

/// Reads a command line (the client's `exec`).
pub fn parse_command(line: &str) -> Result<Parsed, Failure> {
    let words = words(line)?;
    let Some((first, rest)) = words.split_first() else {
        return Err(Failure::new(
            ErrorCode::SSH_COMMAND_REQUIRED,
            "give http, tls or tcp after the host, e.g. `ssh -R 443:localhost:8080 v2@<edge> http`",
        ));
    };
    let protocol = match first.as_str() {
        "http" => pb::Protocol::Http,
        "tls" => pb::Protocol::Tls,
        "tcp" => pb::Protocol::Tcp,
        "help" | "--help" | "-h" => return Ok(Parsed::Help),
        other => {
            return Err(Failure::new(
                ErrorCode::SSH_UNKNOWN_COMMAND,
                format!("{other:?} is not a command; use http, tls or tcp"),
            ));
        }
    };
    let mut command = Command::new(protocol);
    let mut rest = rest.iter();
    while let Some(word) = rest.next() {
        let Some(flag) = word.strip_prefix("--") else {
            return Err(positional(word));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        if name == "help" {
            return Ok(Parsed::Help);
        }
        let value = if takes_value(name)? {
            match inline {
                Some(value) => Some(value),
                None => Some(
                    rest.next()
                        .cloned()
                        .ok_or_else(|| bad(format!("--{name} needs a value")))?,
                ),
            }
        } else {
            match inline.as_deref() {
                None | Some("true") => None,
                Some(other) => {
                    return Err(bad(format!(
                        "--{name} takes no value (it was given {other:?})"
                    )));
                }
            }
        };
        command.apply(name, value)?;
    }
    Ok(Parsed::Run(Box::new(command)))
}

/// A word that is not an option.
fn positional(word: &str) -> Failure {
    if word.starts_with("tls://") || word.starts_with("https://") {
        return unsupported(
            "Re-encrypting the connection to your upstream service with TLS is not supported via SSH.",
        );
    }
    bad(format!(
        "unexpected argument {word:?}: the service is the target of -R (e.g. -R 443:localhost:8080); options start with --"
    ))
}

/// Switches: options that take no value.
const SWITCHES: &[&str] = &[
    "compression",
    "pooling-enabled",
    "websocket-tcp-converter",
    "inspect",
];

/// Options that take a value, those SSH refuses included (they are
/// refused with the reason, not as unknown).
const VALUED: &[&str] = &[
    "url",
    "domain",
    "cidr-allow",
    "cidr-deny",
    "terminate-at",
    "crt",
    "key",
    "proxy-proto",
    "traffic-policy-file",
    "traffic-policy-url",
    "traffic-policy",
    "policy-file",
    "mutual-tls-cas",
    "basic-auth",
    "oauth",
    "oauth-client-id",
    "oauth-client-secret",
    "oauth-scope",
    "oauth-allow-email",
    "oauth-allow-domain",
    "request-header-add",
    "request-header-remove",
    "response-header-add",
    "response-header-remove",
    "host-header",
    "circuit-breaker",
    "verify-webhook",
    "verify-webhook-secret",
    "ua-filter-allow",
    "ua-filter-deny",
    "scheme",
    "schemes",
];

/// Whether option `name` takes a value; an unknown option is an error.
fn takes_value(name: &str) -> Result<bool, Failure> {
    if SWITCHES.contains(&name) {
        Ok(false)
    } else if VALUED.contains(&name) {
        Ok(true)
    } else {
        Err(bad(format!(
            "unknown option --{name}; `--help` lists the options"
        )))
    }
}

/// A comma-separated list, without empty items.
fn list(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl Command {
    fn new(protocol: pb::Protocol) -> Command {
        let mut template = pb::BindRequest {
            name: "ssh".into(),
            protocol: protocol.into(),
            ..Default::default()
        };
        if protocol == pb::Protocol::Tls {
            template.terminate_at = pb::TerminateAt::Upstream.into();
        }
        Command {
            protocol,
            template,
            url: None,
        }
    }

    /// What `ssh -N` gets, where no command can be given: HTTP for remote
    /// port 80 or 443, TCP for any other.
    pub fn inferred(port: u32) -> Command {
        Command::new(match port {
            80 | 443 => pb::Protocol::Http,
            _ => pb::Protocol::Tcp,
        })
    }

    fn http_only(&self, name: &str) -> Result<(), Failure> {
        if self.protocol != pb::Protocol::Http {
            return Err(bad(format!("--{name} is for http tunnels")));
        }
        Ok(())
    }

    fn modules(&mut self) -> &mut pb::HttpModules {
        self.template.modules.get_or_insert_with(Default::default)
    }

    fn oauth(&mut self) -> &mut pb::OAuthOptions {
        self.template.oauth.get_or_insert_with(Default::default)
    }

    /// Applies one option (`value` is `None` for a switch).
    fn apply(&mut self, name: &str, value: Option<String>) -> Result<(), Failure> {
        let value = value.unwrap_or_default();
        match name {
            "url" | "domain" => self.set_url(&value)?,
            "cidr-allow" | "cidr-deny" => {
                let rules = self
                    .template
                    .ip_restriction
                    .get_or_insert_with(Default::default);
                let into = if name == "cidr-allow" {
                    &mut rules.allow_cidrs
                } else {
                    &mut rules.deny_cidrs
                };
                into.extend(list(&value));
            }
            "pooling-enabled" => self.template.pooling_enabled = true,
            "terminate-at" => self.terminate_at(&value)?,
            "crt" | "key" => {
                return Err(unsupported(format!(
                    "--{name} is for TLS termination at the edge or the agent: SSH does not support termination at the edge or at the agent"
                )));
            }
            "proxy-proto" => return Err(unsupported("PROXY proto is not supported via SSH.")),
            "traffic-policy-file" | "traffic-policy-url" | "traffic-policy" | "policy-file" => {
                return Err(unsupported(
                    "a Traffic Policy is not configurable via SSH; ask the operator for an endpoint policy on the domain",
                ));
            }
            "inspect" => {
                return Err(unsupported(
                    "traffic inspection runs in the agent, and there is none over SSH",
                ));
            }
            "mutual-tls-cas" => {
                if self.protocol == pb::Protocol::Tls {
                    return Err(unsupported(
                        "mutual TLS on a TLS endpoint needs TLS terminated at the edge, and SSH does not support termination at the edge",
                    ));
                }
                self.http_only(name)?;
                self.template.mutual_tls_ca_ids.extend(list(&value));
            }
            _ => self.http_option(name, value)?,
        }
        Ok(())
    }

    /// The HTTP module options.
    fn http_option(&mut self, name: &str, value: String) -> Result<(), Failure> {
        self.http_only(name)?;
        match name {
            "basic-auth" => {
                let credential = pb::BasicAuthCredential::from_pair(&value)
                    .map_err(|e| bad(format!("--basic-auth: {e}")))?;
                self.modules().basic_auth.push(credential);
            }
            "oauth" => self.oauth().provider = value,
            "oauth-client-id" => self.oauth().client_id = value,
            "oauth-client-secret" => self.oauth().client_secret = value,
            "oauth-scope" => self.oauth().scopes.extend(list(&value)),
            "oauth-allow-email" => self.oauth().allow_emails.extend(list(&value)),
            "oauth-allow-domain" => self.oauth().allow_domains.extend(list(&value)),
            "request-header-add" | "response-header-add" => {
                if value
                    .split_once(':')
                    .is_none_or(|(n, _)| n.trim().is_empty())
                {
                    return Err(bad(format!("--{name}: {value:?} is not \"name: value\"")));
                }
                self.header_edits(name).add.push(value);
            }
            "request-header-remove" | "response-header-remove" => {
                self.header_edits(name).remove.push(value)
            }
            "host-header" => {
                self.modules().host_header = match value.as_str() {
                    "rewrite" => {
                        return Err(unsupported(
                            "--host-header rewrite needs the upstream's name, which SSH does not tell the edge; give the name itself",
                        ));
                    }
                    "preserve" => String::new(),
                    literal => literal.to_string(),
                }
            }
            "compression" => self.modules().compression = true,
            "circuit-breaker" => {
                self.modules().circuit_breaker = value
                    .parse()
                    .map_err(|_| bad(format!("--circuit-breaker: {value:?} is not a number")))?
            }
            "verify-webhook" => {
                self.modules()
                    .verify_webhook
                    .get_or_insert_with(Default::default)
                    .provider = value
            }
            "verify-webhook-secret" => {
                self.modules()
                    .verify_webhook
                    .get_or_insert_with(Default::default)
                    .secret = value
            }
            "ua-filter-allow" | "ua-filter-deny" => {
                let filter = self
                    .modules()
                    .user_agent_filter
                    .get_or_insert_with(Default::default);
                let into = if name == "ua-filter-allow" {
                    &mut filter.allow
                } else {
                    &mut filter.deny
                };
                into.extend(list(&value));
            }
            "scheme" | "schemes" => {
                for scheme in list(&value) {
                    if !matches!(scheme.as_str(), "http" | "https") {
                        return Err(bad(format!("--{name}: {scheme:?} is not http or https")));
                    }
                    self.modules().schemes.push(scheme);
                }
            }
            "websocket-tcp-converter" => self.modules().websocket_tcp_converter = true,
            _ => {
                return Err(bad(format!(
                    "unknown option --{name}; `--help` lists the options"
                )));
            }
        }
        Ok(())
    }

    fn header_edits(&mut self, name: &str) -> &mut pb::HeaderEdits {
        let modules = self.modules();
        let edits = if name.starts_with("request") {
            &mut modules.request_headers
        } else {
            &mut modules.response_headers
        };
        edits.get_or_insert_with(Default::default)
    }

    fn set_url(&mut self, value: &str) -> Result<(), Failure> {
        let schemes: &[&str] = match self.protocol {
            pb::Protocol::Http => &["https://", "http://"],
            pb::Protocol::Tls => &["tls://"],
            _ => {
                return Err(bad(
                    "--url names HTTP and TLS endpoints; a TCP endpoint is its port in -R (e.g. -R 0:localhost:22)",
                ));
            }
        };
        let name = schemes
            .iter()
            .find_map(|s| value.strip_prefix(s))
            .unwrap_or(value);
        if name.is_empty() || name.contains(['/', ':', '?', '#']) {
            return Err(bad(format!(
                "--url: {value:?} is not a name like app.example.com"
            )));
        }
        self.url = Some(name.to_string());
        Ok(())
    }

    fn terminate_at(&mut self, value: &str) -> Result<(), Failure> {
        if self.protocol != pb::Protocol::Tls {
            return Err(bad("--terminate-at is for tls tunnels"));
        }
        match value {
            "upstream" => Ok(()),
            "edge" => Err(unsupported("SSH does not support termination at the edge")),
            "agent" => Err(unsupported("SSH does not support termination at the agent")),
            other => Err(bad(format!(
                "--terminate-at: {other:?} is not edge, agent or upstream"
            ))),
        }
    }

    /// The bind request for one `-R` forward: its bind address names the
    /// endpoint (for HTTP and TLS) and its port the scheme or TCP port.
    pub fn bind_request(&self, address: &str, port: u32) -> Result<pb::BindRequest, Failure> {
        let mut req = self.template.clone();
        let named = !matches!(address, "" | "localhost" | "*" | "0.0.0.0" | "::" | "[::]");
        let bad_port =
            |allowed: &str| Failure::new(ErrorCode::SSH_BAD_PORT, format!("-R {port}: {allowed}"));
        match self.protocol {
            pb::Protocol::Http | pb::Protocol::Tls => {
                let ok = match self.protocol {
                    pb::Protocol::Http => matches!(port, 0 | 80 | 443),
                    _ => matches!(port, 0 | 443),
                };
                if !ok {
                    return Err(bad_port(if self.protocol == pb::Protocol::Http {
                        "http endpoints take remote port 80 or 443"
                    } else {
                        "tls endpoints take remote port 443"
                    }));
                }
                req.domain = match (named, &self.url) {
                    (true, Some(url)) if !url.eq_ignore_ascii_case(address) => {
                        return Err(bad(format!(
                            "-R names {address} and --url names {url}: give the name once"
                        )));
                    }
                    (true, _) => address.to_string(),
                    (false, url) => url.clone().unwrap_or_default(),
                };
            }
            _ => {
                if named {
                    return Err(bad_port(
                        "a TCP endpoint is named by its port only: -R <port>:localhost:22, or -R 0:… for any port",
                    ));
                }
                req.remote_port = port;
            }
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &str) -> Command {
        match parse_command(line).unwrap() {
            Parsed::Run(c) => *c,
            Parsed::Help => panic!("help"),
        }
    }

    fn err(line: &str) -> Failure {
        parse_command(line).unwrap_err()
    }

    #[test]
    fn words_are_split_as_a_shell_would() {
        assert_eq!(
            words(r#"http --request-header-add 'x-a: one two' --basic-auth "a:b \"c\" d1234""#)
                .unwrap(),
            vec![
                "http",
                "--request-header-add",
                "x-a: one two",
                "--basic-auth",
                "a:b \"c\" d1234"
            ]
        );
        assert_eq!(words("  a\\ b  ").unwrap(), vec!["a b"]);
        assert_eq!(words("''").unwrap(), vec![""]);
        for line in ["http 'open", "http \"open", "http \\", "http \u{1}"] {
            assert_eq!(err(line).code, ErrorCode::SSH_BAD_OPTION, "{line:?}");
        }
        assert!(err(&"x ".repeat(300)).detail.contains("words"));
        assert!(err(&"x".repeat(MAX_LINE + 1)).detail.contains("bytes"));
    }

    #[test]
    fn commands_and_options_fill_the_bind() {
        let c = run(
            "http --url https://app.example.test --basic-auth alice:password1 --cidr-allow 10.0.0.0/8,127.0.0.1/32 \
             --oauth google --oauth-allow-email a@example.test --mutual-tls-cas ca_1 --compression --scheme=https",
        );
        assert_eq!(c.protocol, pb::Protocol::Http);
        assert_eq!(c.url.as_deref(), Some("app.example.test"));
        let t = &c.template;
        let m = t.modules.as_ref().unwrap();
        assert_eq!(m.basic_auth[0].username, "alice");
        assert!(m.compression);
        assert_eq!(m.schemes, vec!["https"]);
        assert_eq!(
            t.ip_restriction.as_ref().unwrap().allow_cidrs,
            vec!["10.0.0.0/8", "127.0.0.1/32"]
        );
        assert_eq!(t.oauth.as_ref().unwrap().provider, "google");
        assert_eq!(t.mutual_tls_ca_ids, vec!["ca_1"]);
        let tls = run("tls --terminate-at upstream");
        assert_eq!(tls.template.terminate_at, pb::TerminateAt::Upstream as i32);
        assert_eq!(parse_command("tcp --help").unwrap(), Parsed::Help);
    }

    #[test]
    fn mistakes_and_what_ssh_cannot_do_are_refused_with_reasons() {
        for (line, code, want) in [
            ("", ErrorCode::SSH_COMMAND_REQUIRED, "http, tls or tcp"),
            ("ftp", ErrorCode::SSH_UNKNOWN_COMMAND, "\"ftp\""),
            (
                "http --frobnicate",
                ErrorCode::SSH_BAD_OPTION,
                "unknown option --frobnicate",
            ),
            (
                "http --basic-auth",
                ErrorCode::SSH_BAD_OPTION,
                "needs a value",
            ),
            (
                "http --basic-auth a:b",
                ErrorCode::SSH_BAD_OPTION,
                "8 to 128",
            ),
            (
                "tcp --basic-auth a:password1",
                ErrorCode::SSH_BAD_OPTION,
                "for http",
            ),
            (
                "http --compression=yes",
                ErrorCode::SSH_BAD_OPTION,
                "takes no value",
            ),
            (
                "http localhost:80",
                ErrorCode::SSH_BAD_OPTION,
                "unexpected argument",
            ),
            (
                "tls --terminate-at edge",
                ErrorCode::SSH_NOT_SUPPORTED,
                "termination at the edge",
            ),
            (
                "tls --terminate-at agent",
                ErrorCode::SSH_NOT_SUPPORTED,
                "termination at the agent",
            ),
            (
                "tls --crt c.pem --key k.pem",
                ErrorCode::SSH_NOT_SUPPORTED,
                "termination",
            ),
            (
                "tls --proxy-proto 2",
                ErrorCode::SSH_NOT_SUPPORTED,
                "PROXY proto is not supported via SSH.",
            ),
            (
                "tls tls://localhost:443",
                ErrorCode::SSH_NOT_SUPPORTED,
                "Re-encrypting",
            ),
            (
                "tls --mutual-tls-cas ca_1",
                ErrorCode::SSH_NOT_SUPPORTED,
                "termination at the edge",
            ),
            (
                "http --traffic-policy-file p.yml",
                ErrorCode::SSH_NOT_SUPPORTED,
                "Traffic Policy",
            ),
            (
                "http --host-header rewrite",
                ErrorCode::SSH_NOT_SUPPORTED,
                "upstream's name",
            ),
            (
                "tcp --url tcp://1.tcp.example.test:20000",
                ErrorCode::SSH_BAD_OPTION,
                "port in -R",
            ),
            (
                "http --url https://a.example.test/path",
                ErrorCode::SSH_BAD_OPTION,
                "not a name",
            ),
        ] {
            let e = err(line);
            assert_eq!(e.code, code, "{line:?}: {e}");
            assert!(e.detail.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn forwards_name_the_endpoint_and_their_port_must_fit() {
        let http = run("http");
        assert_eq!(http.bind_request("localhost", 443).unwrap().domain, "");
        assert_eq!(
            http.bind_request("app.example.test", 80).unwrap().domain,
            "app.example.test"
        );
        assert_eq!(
            http.bind_request("localhost", 8080).unwrap_err().code,
            ErrorCode::SSH_BAD_PORT
        );
        let named = run("http --url app.example.test");
        assert_eq!(
            named.bind_request("", 443).unwrap().domain,
            "app.example.test"
        );
        assert!(named.bind_request("other.example.test", 443).is_err());
        let tcp = run("tcp");
        assert_eq!(tcp.bind_request("localhost", 0).unwrap().remote_port, 0);
        assert_eq!(tcp.bind_request("", 20001).unwrap().remote_port, 20001);
        assert!(tcp.bind_request("app.example.test", 20001).is_err());
        assert_eq!(
            run("tls").bind_request("localhost", 22).unwrap_err().code,
            ErrorCode::SSH_BAD_PORT
        );
        assert_eq!(Command::inferred(443).protocol, pb::Protocol::Http);
        assert_eq!(Command::inferred(0).protocol, pb::Protocol::Tcp);
    }
}
