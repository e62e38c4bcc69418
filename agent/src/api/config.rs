//! The agent API's settings: where it listens (`web_addr`), the `Host`
//! names it answers (`web_allow_hosts`), the credentials it asks for
//! (`web_auth`, a Postern key) and how much the inspector keeps
//! (`inspect_db_size`).

use std::net::TcpListener;

use postern_net::Secret;
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::guard::HostRule;
use crate::{
    error::{AgentError, ConfigError, bail, invalid},
    inspect::DEFAULT_DB_SIZE,
};

/// ngrok's default address.
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 4040;
/// With the default address, ports 4040 to 4049 are tried in turn, so that
/// several agents on one machine each get an API (ngrok does the same).
const DEFAULT_PORTS_TRIED: u16 = 10;

/// `web_auth` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebAuth {
    /// Requests must carry `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// `user:password`; requests must carry these as HTTP basic
    /// credentials (browsers ask for them).
    pub basic: Option<String>,
}

/// Where the API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebAddr {
    /// `127.0.0.1:4040`, or the next free port up to 4049.
    Default,
    /// Exactly this `host:port`; failing to bind it stops the agent.
    At(String),
}

/// What the API requires of every request.
#[derive(Clone, Debug)]
pub enum WebAuth {
    /// Nothing: the API trusts whoever reaches it (ngrok's behaviour).
    Open,
    Bearer(Secret),
    Basic {
        user: String,
        password: Secret,
    },
}

/// The validated API settings.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// `None`: no API, no inspector (`web_addr: false`).
    pub addr: Option<WebAddr>,
    /// `Host` values answered besides loopback names and the domains of
    /// tunnels that forward to the API itself.
    pub allow_hosts: Vec<HostRule>,
    pub auth: WebAuth,
    /// Bytes of captured requests kept; 0 when inspection is off.
    pub inspect_db_size: u64,
}

impl WebConfig {
    /// Validates the raw keys; errors name the key.
    pub(crate) fn validate(
        web_addr: Option<&Value>,
        allow_hosts: &[String],
        auth: Option<&RawWebAuth>,
        inspect_db_size: Option<i64>,
    ) -> Result<WebConfig, ConfigError> {
        let addr = match web_addr {
            None => Some(WebAddr::Default),
            Some(Value::Bool(false)) => None,
            Some(Value::String(s)) if s.parse::<u16>().is_ok() => {
                Some(WebAddr::At(format!("{DEFAULT_HOST}:{s}")))
            }
            Some(Value::Number(n)) if n.as_u64().is_some_and(|p| p <= 65535) => {
                Some(WebAddr::At(format!("{DEFAULT_HOST}:{n}")))
            }
            Some(Value::String(s))
                if s.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Some(WebAddr::At(s.clone()))
            }
            Some(other) => {
                bail!("web_addr: {other:?} must be host:port (like \"127.0.0.1:4040\") or false")
            }
        };
        let allow_hosts = allow_hosts
            .iter()
            .map(|h| HostRule::parse(h).map_err(|e| invalid!("web_allow_hosts: {e}")))
            .collect::<Result<_, _>>()?;
        let auth = match auth {
            None => WebAuth::Open,
            Some(RawWebAuth {
                bearer_token: Some(_),
                basic: Some(_),
            }) => bail!("web_auth: give bearer_token or basic, not both"),
            Some(RawWebAuth {
                bearer_token: Some(token),
                ..
            }) => {
                if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    bail!("web_auth.bearer_token: use at least 16 characters, without spaces");
                }
                WebAuth::Bearer(Secret::new(token.clone()))
            }
            Some(RawWebAuth {
                basic: Some(basic), ..
            }) => {
                let (user, password) = basic
                    .split_once(':')
                    .filter(|(u, _)| !u.is_empty())
                    .ok_or_else(|| invalid!("web_auth.basic: must be \"user:password\""))?;
                if password.len() < 8 {
                    bail!("web_auth.basic: the password needs at least 8 characters");
                }
                WebAuth::Basic {
                    user: user.to_string(),
                    password: Secret::new(password),
                }
            }
            Some(RawWebAuth { .. }) => {
                bail!("web_auth: give bearer_token or basic")
            }
        };
        let inspect_db_size = match inspect_db_size {
            None | Some(0) => DEFAULT_DB_SIZE,
            Some(-1) => 0,
            Some(n) if n > 0 => n as u64,
            Some(n) => bail!(
                "inspect_db_size: {n} must be a size in bytes, 0 for the default (50 MB) or -1 to turn inspection off"
            ),
        };
        Ok(WebConfig {
            addr,
            allow_hosts,
            auth,
            inspect_db_size,
        })
    }

    /// Binds the API's listener (non-blocking, for tokio).
    pub(crate) fn bind(&self) -> Result<Option<TcpListener>, AgentError> {
        let listener = match &self.addr {
            None => return Ok(None),
            Some(WebAddr::At(addr)) => {
                TcpListener::bind(addr).map_err(|source| AgentError::WebBind {
                    addr: addr.clone(),
                    source,
                })?
            }
            Some(WebAddr::Default) => {
                let ports = DEFAULT_PORT..DEFAULT_PORT + DEFAULT_PORTS_TRIED;
                let Some(listener) = ports
                    .clone()
                    .find_map(|port| TcpListener::bind((DEFAULT_HOST, port)).ok())
                else {
                    tracing::warn!(
                        "web_addr: {DEFAULT_HOST}:{}-{} are all in use; the agent API and inspector are off",
                        ports.start,
                        ports.end - 1
                    );
                    return Ok(None);
                };
                listener
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(AgentError::WebNonBlocking)?;
        Ok(Some(listener))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(yaml: &str) -> Result<WebConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Keys {
            web_addr: Option<Value>,
            #[serde(default)]
            web_allow_hosts: Vec<String>,
            web_auth: Option<RawWebAuth>,
            inspect_db_size: Option<i64>,
        }
        let k: Keys = serde_yaml_ng::from_str(yaml).map_err(ConfigError::Syntax)?;
        WebConfig::validate(
            k.web_addr.as_ref(),
            &k.web_allow_hosts,
            k.web_auth.as_ref(),
            k.inspect_db_size,
        )
    }

    #[test]
    fn defaults_are_ngroks() {
        let w = web("{}").unwrap();
        assert_eq!(w.addr, Some(WebAddr::Default));
        assert!(matches!(w.auth, WebAuth::Open));
        assert_eq!(w.inspect_db_size, 50_000_000);
        assert_eq!(web("inspect_db_size: -1").unwrap().inspect_db_size, 0);
        assert_eq!(web("inspect_db_size: 1000").unwrap().inspect_db_size, 1000);
    }

    #[test]
    fn web_addr_forms() {
        assert_eq!(web("web_addr: false").unwrap().addr, None);
        assert_eq!(
            web("web_addr: localhost:4041").unwrap().addr,
            Some(WebAddr::At("localhost:4041".into()))
        );
        assert_eq!(
            web("web_addr: 4045").unwrap().addr,
            Some(WebAddr::At("127.0.0.1:4045".into()))
        );
        assert_eq!(
            web("web_addr: \"[::1]:0\"").unwrap().addr,
            Some(WebAddr::At("[::1]:0".into()))
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (yaml, want) in [
            ("web_addr: true", "web_addr"),
            ("web_addr: nowhere", "web_addr"),
            ("web_allow_hosts: [\"10.0.0.0/99\"]", "web_allow_hosts"),
            ("web_auth: {bearer_token: short}", "web_auth.bearer_token"),
            ("web_auth: {basic: \"admin\"}", "web_auth.basic"),
            ("web_auth: {basic: \"admin:short\"}", "web_auth.basic"),
            (
                "web_auth: {basic: \"a:longenough\", bearer_token: \"0123456789abcdef\"}",
                "not both",
            ),
            ("web_auth: {}", "web_auth"),
            ("web_auth: {token: x}", "token"),
            ("inspect_db_size: -5", "inspect_db_size"),
        ] {
            let err = format!("{:#}", web(yaml).unwrap_err());
            assert!(err.contains(want), "{yaml}: {want:?} not in {err}");
        }
    }

    #[test]
    fn credentials_never_print() {
        let w = web("web_auth: {basic: \"admin:s3cret-pass\"}").unwrap();
        let shown = format!("{w:?}");
        assert!(!shown.contains("s3cret-pass"), "{shown}");
        assert!(shown.contains("********"));
        let w = web("web_auth: {bearer_token: \"tok-0123456789abcdef\"}").unwrap();
        assert!(!format!("{w:?}").contains("tok-0123456789abcdef"));
    }

    #[test]
    fn two_config_files_merge_into_the_site_to_site_setup() {
        let dir =
            std::env::temp_dir().join(format!("postern-web-merge-{}", postern_net::random_label()));
        std::fs::create_dir_all(&dir).unwrap();
        let customer = dir.join("ngrok.yml");
        let ours = dir.join("postern.yml");
        std::fs::write(
            &customer,
            "version: \"2\"\nauthtoken: tok\nserver_addr: edge.example.test:443\n\
             web_addr: 127.0.0.1:4040\ntunnels:\n  their-app:\n    proto: http\n    addr: 3000\n",
        )
        .unwrap();
        std::fs::write(
            &ours,
            "web_addr: 127.0.0.1:4141\nweb_auth:\n  bearer_token: tok-0123456789abcdef\n\
             tunnels:\n  agent-api:\n    proto: http\n    addr: 4141\n    \
             domain: agent.customer1.example.test\n    inspect: false\n",
        )
        .unwrap();
        let merged = crate::config::load_files(&[&customer, &ours]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let config = crate::config::parse_raw(merged)
            .unwrap()
            .validate(Some(&["agent-api".to_string()]))
            .unwrap();
        assert_eq!(config.authtoken.expose(), "tok", "from the first file");
        assert_eq!(
            config.web.addr,
            Some(WebAddr::At("127.0.0.1:4141".into())),
            "the later file wins"
        );
        assert!(matches!(config.web.auth, WebAuth::Bearer(_)));
        let names: Vec<_> = config.tunnels.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["agent-api"], "only the named tunnel starts");
        assert!(!config.tunnels[0].inspect);
        assert_eq!(config.tunnels[0].upstream.port, 4141);
    }

    #[test]
    fn an_explicit_address_that_is_taken_is_an_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let w = web(&format!("web_addr: \"{addr}\"")).unwrap();
        let err = format!("{:#}", w.bind().unwrap_err());
        assert!(err.contains("web_addr") && err.contains(&addr), "{err}");
        let w = web("web_addr: \"127.0.0.1:0\"").unwrap();
        assert!(w.bind().unwrap().is_some());
        assert!(web("web_addr: false").unwrap().bind().unwrap().is_none());
    }
}
