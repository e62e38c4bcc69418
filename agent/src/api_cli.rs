//! `postern api <resource> <verb>`: the edge's admin API from the command
//! line, as ngrok's `ngrok api`. One table describes every resource the
//! edge serves, its verbs and the fields of each; the clap commands (with
//! `--help` for every call) and the requests are built from it.
//!
//! ```text
//! postern api credentials create --acl 'bind:*.example.com' --description site-a
//! postern api certificate-authorities create --ca-pem @ca.pem
//! postern api credentials list
//! postern api tunnel-sessions stop ts_2bq0…
//! ```
//!
//! The API's address and key come from `--api-url`/`--api-key`, else
//! `POSTERN_API_URL`/`POSTERN_API_KEY`, else `api_url`/`api_key` in the
//! agent config. Answers are printed as pretty JSON; an API error prints
//! its message and `ERR_POSTERN_…` code and exits 1.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::{Arg, ArgAction, ArgGroup, ArgMatches, Command, FromArgMatches};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use postern_agent::{ApiUrl, load_files, parse_raw};
use serde_json::{Map, Value};
use tokio::net::TcpStream;

/// How a flag's value goes into the request body.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A string; `@path` reads the file.
    Text,
    /// A list of strings: the flag repeated, or values separated by commas.
    List,
    Bool,
    /// A JSON value; `@path` reads the file.
    Json,
}

/// One field of a create or update body (or of a list's query).
#[derive(Debug)]
struct Field {
    /// The JSON key; the flag is the key with `-` for `_`.
    key: &'static str,
    kind: Kind,
    required: bool,
    help: &'static str,
}

const fn field(key: &'static str, kind: Kind, help: &'static str) -> Field {
    Field {
        key,
        kind,
        required: false,
        help,
    }
}

const fn required(key: &'static str, kind: Kind, help: &'static str) -> Field {
    Field {
        key,
        kind,
        required: true,
        help,
    }
}

const DESCRIPTION: Field = field("description", Kind::Text, "Free text, up to 255 bytes.");
const METADATA: Field = field(
    "metadata",
    Kind::Text,
    "Free text for your tools, up to 4096 bytes.",
);
const OWNER_ID: Field = field(
    "owner_id",
    Kind::Text,
    "The bot user (bot_…) that owns it: only its credentials may use it.",
);
const TEXT: &[Field] = &[DESCRIPTION, METADATA];

#[derive(Debug)]
enum Verb {
    /// `POST /<path>` with the fields.
    Create(&'static [Field]),
    /// `GET /<path>`, with the fields as the query.
    List(&'static [Field]),
    /// `GET /<path>/{id}`.
    Get,
    /// `PATCH /<path>/{id}` with the fields given (at least one).
    Update(&'static [Field]),
    /// `DELETE /<path>/{id}`.
    Delete,
    /// `POST /<path>/{id}/<name>` with the fields (a body only when it
    /// has any), and what it does.
    Action(&'static str, &'static str, &'static [Field]),
    /// `DELETE /<path>` with the fields as the query: every object they
    /// select.
    DeleteAll(&'static [Field]),
}

impl Verb {
    fn name(&self) -> &'static str {
        match self {
            Verb::Create(_) => "create",
            Verb::List(_) => "list",
            Verb::Get => "get",
            Verb::Update(_) => "update",
            Verb::Delete => "delete",
            Verb::Action(name, ..) => name,
            Verb::DeleteAll(_) => "delete-all",
        }
    }

    fn fields(&self) -> &'static [Field] {
        match self {
            Verb::Create(fields)
            | Verb::List(fields)
            | Verb::Update(fields)
            | Verb::DeleteAll(fields)
            | Verb::Action(_, _, fields) => fields,
            Verb::Get | Verb::Delete => &[],
        }
    }

    fn takes_id(&self) -> bool {
        !matches!(self, Verb::Create(_) | Verb::List(_) | Verb::DeleteAll(_))
    }
}

#[derive(Debug)]
struct Resource {
    /// The command: `certificate-authorities`.
    name: &'static str,
    /// The API's path: `certificate_authorities`.
    path: &'static str,
    /// One object, for help: `certificate authority`.
    noun: &'static str,
    /// What they are, for help.
    about: &'static str,
    verbs: &'static [Verb],
}

const DOMAIN: Field = required(
    "domain",
    Kind::Text,
    "The name: app.example.com, or (not for agent ingresses) *.example.com for it and every name under it.",
);

const CERTIFICATE_POLICY: Field = field(
    "certificate_management_policy",
    Kind::Json,
    "The edge orders and renews the name's certificate from its [acme] CA: {\"authority\": \"letsencrypt\", \"private_key_type\": \"ecdsa\"} (or \"rsa\"); null stops it.",
);

const TRAFFIC_POLICY: Field = field(
    "traffic_policy",
    Kind::Text,
    "A Traffic Policy document as YAML or JSON text (@policy.yml reads the file); it runs before the agent's. A policy needs CAs, a Traffic Policy or both.",
);

const ACL: Field = field(
    "acl",
    Kind::List,
    "ngrok ACL rules: bind:app.example.com, bind:*.example.com, bind:*:20000. None: any name.",
);

/// What an update of a credential (a token's or an SSH key's) may change.
const CREDENTIAL_UPDATE: &[Field] = &[
    field(
        "acl",
        Kind::List,
        "The new ACL rules (replace the old ones).",
    ),
    DESCRIPTION,
    METADATA,
];

/// Reserved domains and agent ingresses: a domain with an owner.
const NAMED_VERBS: &[Verb] = &[
    Verb::Create(&[DOMAIN, DESCRIPTION, METADATA, OWNER_ID]),
    Verb::List(&[]),
    Verb::Get,
    Verb::Update(TEXT),
    Verb::Delete,
];

/// Every resource of the edge's admin API (`edge-node/src/admin.rs`).
const RESOURCES: &[Resource] = &[
    Resource {
        name: "credentials",
        path: "credentials",
        noun: "credential",
        about: "Agent authtokens with their ACLs (a token is shown once, when created).",
        verbs: &[
            Verb::Create(&[ACL, DESCRIPTION, METADATA, OWNER_ID]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(CREDENTIAL_UPDATE),
            Verb::Delete,
        ],
    },
    Resource {
        name: "ssh-credentials",
        path: "ssh_credentials",
        noun: "ssh credential",
        about: "SSH public keys that log in to the edge's SSH ingress (ssh -R), with their ACLs.",
        verbs: &[
            Verb::Create(&[
                required(
                    "public_key",
                    Kind::Text,
                    "The key in OpenSSH's authorized_keys format: ssh-ed25519 AAAA… comment; @id_ed25519.pub reads the file.",
                ),
                ACL,
                DESCRIPTION,
                METADATA,
                OWNER_ID,
            ]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(CREDENTIAL_UPDATE),
            Verb::Delete,
        ],
    },
    Resource {
        name: "certificate-authorities",
        path: "certificate_authorities",
        noun: "certificate authority",
        about: "CAs that client certificates must chain to (mutual TLS).",
        verbs: &[
            Verb::Create(&[
                required(
                    "ca_pem",
                    Kind::Text,
                    "The CA certificate as PEM; @ca.pem reads the file.",
                ),
                field(
                    "private_key_pem",
                    Kind::Text,
                    "Its private key as PEM (@file), stored encrypted; needs key_encryption_secret on the edge.",
                ),
                DESCRIPTION,
                METADATA,
            ]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Delete,
        ],
    },
    Resource {
        name: "bot-users",
        path: "bot_users",
        noun: "bot user",
        about: "Owners of credentials and names; deleting one deletes its credentials.",
        verbs: &[
            Verb::Create(&[
                required("name", Kind::Text, "A name, 1 to 255 bytes."),
                field(
                    "active",
                    Kind::Bool,
                    "Whether its credentials work (default true).",
                ),
            ]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(&[
                field("name", Kind::Text, "A new name."),
                field("active", Kind::Bool, "true or false."),
            ]),
            Verb::Delete,
        ],
    },
    Resource {
        name: "reserved-domains",
        path: "reserved_domains",
        noun: "reserved domain",
        about: "Names only their owner's credentials may bind.",
        verbs: &[
            Verb::Create(&[DOMAIN, DESCRIPTION, METADATA, OWNER_ID, CERTIFICATE_POLICY]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(&[DESCRIPTION, METADATA, CERTIFICATE_POLICY]),
            Verb::Delete,
        ],
    },
    Resource {
        name: "agent-ingresses",
        path: "agent_ingresses",
        noun: "agent ingress",
        about: "Domains agents connect to, as tunnel.<region>.<domain>.",
        verbs: NAMED_VERBS,
    },
    Resource {
        name: "endpoint-policies",
        path: "endpoint_policies",
        noun: "endpoint policy",
        about: "What a domain requires whatever agents ask: client certificates, the operator's Traffic Policy.",
        verbs: &[
            Verb::Create(&[
                DOMAIN,
                field(
                    "mutual_tls_cas",
                    Kind::List,
                    "Ids of certificate authorities (ca_…) client certificates must chain to.",
                ),
                TRAFFIC_POLICY,
                DESCRIPTION,
                METADATA,
            ]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(&[
                field(
                    "mutual_tls_cas",
                    Kind::List,
                    "The new CA ids (replace the old ones).",
                ),
                TRAFFIC_POLICY,
                DESCRIPTION,
                METADATA,
            ]),
            Verb::Delete,
        ],
    },
    Resource {
        name: "event-subscriptions",
        path: "event_subscriptions",
        noun: "event subscription",
        about: "Traffic events sent to a file or Kafka.",
        verbs: &[
            Verb::Create(&[
                required(
                    "sources",
                    Kind::Json,
                    "JSON list of sources, e.g. '[{\"type\":\"http_request_complete.v0\",\"filter\":\"…\",\"fields\":[…]}]' (or @file).",
                ),
                required(
                    "destination",
                    Kind::Json,
                    "JSON destination: '{\"file\":{\"path\":\"events.jsonl\"}}' or '{\"kafka\":{\"brokers\":[…],\"topic\":…}}' (or @file).",
                ),
                DESCRIPTION,
                METADATA,
            ]),
            Verb::List(&[]),
            Verb::Get,
            Verb::Update(&[
                field(
                    "sources",
                    Kind::Json,
                    "New JSON list of sources (or @file).",
                ),
                field(
                    "destination",
                    Kind::Json,
                    "New JSON destination (or @file).",
                ),
                DESCRIPTION,
                METADATA,
            ]),
            Verb::Delete,
        ],
    },
    Resource {
        name: "endpoints",
        path: "endpoints",
        noun: "endpoint",
        about: "The endpoints online, at this node and (in a cluster) the others.",
        verbs: &[Verb::List(&[]), Verb::Get],
    },
    Resource {
        name: "tunnel-sessions",
        path: "tunnel_sessions",
        noun: "tunnel session",
        about: "The agent sessions of the cluster (or of this node).",
        verbs: &[
            Verb::List(&[]),
            Verb::Get,
            Verb::Action(
                "restart",
                "Ask an ngrok SDK session's restart handler to run.",
                &[],
            ),
            Verb::Action(
                "stop",
                "End a tunnel session (a Postern agent is told why and exits; an ngrok SDK session's stop handler runs).",
                &[],
            ),
            Verb::Action(
                "update",
                "Ask an ngrok SDK session's update handler to run.",
                &[
                    field("version", Kind::Text, "The version to update to."),
                    field(
                        "permit_major_version",
                        Kind::Bool,
                        "Whether another major version will do.",
                    ),
                ],
            ),
        ],
    },
    Resource {
        name: "oauth-sessions",
        path: "oauth_sessions",
        noun: "OAuth session",
        about: "Visitors' OAuth sessions, by user; deleting one logs it out everywhere.",
        verbs: &[
            Verb::List(&[
                field("user_id", Kind::Text, "The user's id at the provider."),
                field("email", Kind::Text, "The user's email address."),
            ]),
            Verb::Delete,
            Verb::DeleteAll(&[required(
                "user_id",
                Kind::Text,
                "The user's id at the provider: every session of theirs is logged out.",
            )]),
        ],
    },
];

/// The parsed `postern api …` command line.
#[derive(Debug)]
pub struct ApiArgs {
    url: Option<String>,
    key: Option<String>,
    call: Call,
}

/// One request to the admin API.
#[derive(Debug)]
struct Call {
    method: Method,
    /// Below the API's base path, with the query.
    path: String,
    body: Option<Value>,
}

impl Verb {
    fn command(&self, resource: &Resource) -> Command {
        let noun = resource.noun;
        let a = if noun.starts_with(['a', 'e', 'i', 'o', 'u', 'O']) {
            "an"
        } else {
            "a"
        };
        let about = match self {
            Verb::Create(_) => format!("Create {a} {noun}."),
            Verb::List(_) => format!("List every {noun}."),
            Verb::Get => format!("Show one {noun}."),
            Verb::Update(_) => format!("Change {a} {noun}."),
            Verb::Delete => format!("Delete {a} {noun}."),
            Verb::Action(_, about, _) => about.to_string(),
            Verb::DeleteAll(_) => format!("Delete every {noun} the flags select."),
        };
        let mut command = Command::new(self.name()).about(about);
        if self.takes_id() {
            command = command.arg(Arg::new("id").required(true).help("The object's id."));
        }
        for field in self.fields() {
            let flag = field.key.replace('_', "-");
            let arg = Arg::new(field.key)
                .long(flag)
                .value_name(field.key.to_uppercase())
                .help(field.help)
                .required(field.required);
            command = command.arg(match field.kind {
                Kind::Text => arg.value_parser(text),
                Kind::Json => arg.value_parser(json),
                Kind::Bool => arg
                    .value_parser(clap::value_parser!(bool))
                    .action(ArgAction::Set),
                Kind::List => arg
                    .value_parser(text)
                    .action(ArgAction::Append)
                    .value_delimiter(','),
            });
        }
        if matches!(self, Verb::Update(_)) {
            let keys = self.fields().iter().map(|f| f.key);
            command = command.group(
                ArgGroup::new("change")
                    .args(keys)
                    .required(true)
                    .multiple(true),
            );
        }
        command
    }

    /// The request for these matches.
    fn call(&self, resource: &Resource, matches: &ArgMatches) -> Call {
        let mut path = format!("/{}", resource.path);
        if self.takes_id()
            && let Some(id) = matches.get_one::<String>("id")
        {
            path = format!("{path}/{}", escape(id));
        }
        let mut fields = Map::new();
        for field in self.fields() {
            let value = match field.kind {
                Kind::List => matches
                    .get_many::<Value>(field.key)
                    .map(|values| Value::Array(values.cloned().collect())),
                Kind::Bool => matches.get_one::<bool>(field.key).map(|b| Value::Bool(*b)),
                Kind::Text | Kind::Json => matches.get_one::<Value>(field.key).cloned(),
            };
            if let Some(value) = value {
                fields.insert(field.key.to_string(), value);
            }
        }
        let (method, body) = match self {
            Verb::Create(_) => (Method::POST, Some(Value::Object(fields))),
            Verb::Update(_) => (Method::PATCH, Some(Value::Object(fields))),
            Verb::List(_) | Verb::DeleteAll(_) => {
                let query: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{k}={}", escape(v.as_str().unwrap_or_default())))
                    .collect();
                if !query.is_empty() {
                    path = format!("{path}?{}", query.join("&"));
                }
                let method = match self {
                    Verb::List(_) => Method::GET,
                    _ => Method::DELETE,
                };
                (method, None)
            }
            Verb::Get => (Method::GET, None),
            Verb::Delete => (Method::DELETE, None),
            Verb::Action(name, ..) => {
                path = format!("{path}/{name}");
                (
                    Method::POST,
                    (!fields.is_empty()).then_some(Value::Object(fields)),
                )
            }
        };
        Call { method, path, body }
    }
}

/// Percent-encodes an id in the path or a value in the query (a comma
/// stays: `get ca_1,ca_2` asks for two).
fn escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A flag's text: as given, or the file after `@`.
fn read_arg(value: &str) -> Result<String, String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}")),
        None => Ok(value.to_string()),
    }
}

/// A text flag's value.
fn text(value: &str) -> Result<Value, String> {
    read_arg(value).map(Value::String)
}

/// A JSON flag's value, inline or from the file after `@`.
fn json(value: &str) -> Result<Value, String> {
    serde_json::from_str(&read_arg(value)?).map_err(|e| format!("not JSON: {e}"))
}

impl clap::Args for ApiArgs {
    fn augment_args(command: Command) -> Command {
        command
            .subcommand_required(true)
            .arg(
                Arg::new("api_url")
                    .long("api-url")
                    .global(true)
                    .env("POSTERN_API_URL")
                    .value_name("URL")
                    .help(
                        "The edge's admin API (default: api_url in the config, else \
                         http://127.0.0.1:9090).",
                    ),
            )
            .arg(
                Arg::new("api_key")
                    .long("api-key")
                    .global(true)
                    .env("POSTERN_API_KEY")
                    .hide_env_values(true)
                    .value_name("KEY")
                    .help("An admin API key (default: api_key in the config)."),
            )
            .subcommands(RESOURCES.iter().map(|resource| {
                Command::new(resource.name)
                    .about(resource.about)
                    .subcommand_required(true)
                    .subcommands(resource.verbs.iter().map(|verb| verb.command(resource)))
            }))
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for ApiArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let missing = || clap::Error::new(clap::error::ErrorKind::MissingSubcommand);
        let (name, resource_matches) = matches.subcommand().ok_or_else(missing)?;
        let resource = RESOURCES
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(missing)?;
        let (verb_name, verb_matches) = resource_matches.subcommand().ok_or_else(missing)?;
        let verb = resource
            .verbs
            .iter()
            .find(|v| v.name() == verb_name)
            .ok_or_else(missing)?;
        Ok(ApiArgs {
            url: matches.get_one::<String>("api_url").cloned(),
            key: matches.get_one::<String>("api_key").cloned(),
            call: verb.call(resource, verb_matches),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// Runs the call and prints the answer; `config` are the agent config
/// files to take `api_url` and `api_key` from.
pub async fn run(args: ApiArgs, config: &[PathBuf]) -> anyhow::Result<()> {
    let raw = parse_raw(load_files(config)?)?;
    let where_from = if config.is_empty() {
        "no config file".to_string()
    } else {
        config
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key = args
        .key
        .or_else(|| raw.api_key.map(|k| k.expose().to_string()))
        .filter(|k| !k.is_empty())
        .with_context(|| {
            format!(
                "no admin API key: pass --api-key, set POSTERN_API_KEY, or put api_key in the \
                 config ({where_from})"
            )
        })?;
    let url = match args.url {
        Some(url) => ApiUrl::parse(&url).context("--api-url")?,
        None => match raw.api_url {
            Some(url) => ApiUrl::parse(&url).context("api_url")?,
            None => ApiUrl::parse(ApiUrl::DEFAULT)?,
        },
    };
    let (status, body) = send(&url, &key, &args.call).await?;
    if status.is_success() {
        if !body.is_empty() {
            let value: Value = serde_json::from_slice(&body)
                .with_context(|| format!("the API at {} answered with no JSON", url.url))?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        return Ok(());
    }
    let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let code = error["error_code"].as_str().unwrap_or("no error code");
    let msg = error["msg"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    if status == StatusCode::UNAUTHORIZED {
        anyhow::bail!(
            "the admin API at {} refused the API key (HTTP 401, {code}): check --api-key, \
             POSTERN_API_KEY or api_key in the config ({where_from})",
            url.url
        );
    }
    anyhow::bail!("{msg} ({code}, HTTP {})", status.as_u16())
}

/// One HTTP/1.1 request on its own connection: the status and body.
async fn send(url: &ApiUrl, key: &str, call: &Call) -> anyhow::Result<(StatusCode, Bytes)> {
    let unreachable = || {
        format!(
            "cannot reach the admin API at {} (set --api-url, POSTERN_API_URL or api_url)",
            url.url
        )
    };
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .with_context(unreachable)?;
    let body = match &call.body {
        Some(value) => Bytes::from(value.to_string()),
        None => Bytes::new(),
    };
    let authority = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = Request::builder()
        .method(call.method.clone())
        .uri(format!("{}{}", url.base_path, call.path))
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("postern/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .context("building the request")?;
    let answer = if url.tls {
        let config = postern_agent::https_client_config()?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .with_context(|| format!("{}: {:?} is not a TLS server name", url.url, url.host))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(unreachable)?;
        exchange(tls, request).await
    } else {
        exchange(tcp, request).await
    };
    answer.with_context(unreachable)
}

async fn exchange<S>(io: S, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let answer = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::select! {
        answer = answer => answer,
        closed = connection => match closed {
            Ok(()) => anyhow::bail!("the connection closed before an answer"),
            Err(e) => Err(e.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::Args;
    use serde_json::json;

    use super::*;

    fn parse(args: &[&str]) -> Call {
        let command = ApiArgs::augment_args(Command::new("api").no_binary_name(true));
        let matches = command.try_get_matches_from(args).unwrap();
        ApiArgs::from_arg_matches(&matches).unwrap().call
    }

    #[test]
    fn the_table_makes_well_formed_commands_and_requests() {
        ApiArgs::augment_args(Command::new("api")).debug_assert();
        let call = parse(&[
            "credentials",
            "create",
            "--acl",
            "bind:a.test,bind:b.test",
            "--acl",
            "bind:*:20000",
        ]);
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&Method::POST, "/credentials")
        );
        assert_eq!(
            call.body,
            Some(json!({"acl": ["bind:a.test", "bind:b.test", "bind:*:20000"]}))
        );
        let call = parse(&["oauth-sessions", "list", "--email", "a b@x.test"]);
        assert_eq!(call.path, "/oauth_sessions?email=a%20b%40x.test");
        let call = parse(&["certificate-authorities", "get", "ca_1,ca_2"]);
        assert_eq!(call.path, "/certificate_authorities/ca_1,ca_2");
        let call = parse(&["oauth-sessions", "delete-all", "--user-id", "alice"]);
        assert_eq!(
            (&call.method, call.path.as_str(), &call.body),
            (&Method::DELETE, "/oauth_sessions?user_id=alice", &None)
        );
        let call = parse(&["tunnel-sessions", "stop", "ts_1"]);
        assert_eq!(
            (&call.method, call.path.as_str(), &call.body),
            (&Method::POST, "/tunnel_sessions/ts_1/stop", &None)
        );
        let call = parse(&["tunnel-sessions", "update", "ts_1", "--version", "3.1"]);
        assert_eq!(
            (&call.method, call.path.as_str(), &call.body),
            (
                &Method::POST,
                "/tunnel_sessions/ts_1/update",
                &Some(json!({"version": "3.1"}))
            )
        );
        let call = parse(&["bot-users", "update", "bot_1", "--active", "false"]);
        assert_eq!(
            (&call.method, call.body),
            (&Method::PATCH, Some(json!({"active": false})))
        );
        let call = parse(&[
            "ssh-credentials",
            "create",
            "--public-key",
            "ssh-ed25519 AAAA k",
            "--acl",
            "bind:a.test",
        ]);
        assert_eq!(
            (&call.method, call.path.as_str(), call.body),
            (
                &Method::POST,
                "/ssh_credentials",
                Some(json!({"public_key": "ssh-ed25519 AAAA k", "acl": ["bind:a.test"]}))
            )
        );
    }
}
