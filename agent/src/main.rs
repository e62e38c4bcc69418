//! `postern`: the agent CLI, shaped like ngrok's.
//!
//! ```text
//! postern http 8080 --domain app.example.com
//! postern http 8080 --oauth google --oauth-client-id … --oauth-allow-domain acme.org
//! postern tls 443 --terminate-at agent --crt c.pem --key k.pem
//! postern tcp 22
//! postern start web db --config a.yml --config b.yml
//! postern events tail --brokers kafka:9092 --from-beginning
//! postern api credentials create --acl 'bind:*.example.com'
//! postern config check --config /etc/postern/postern.yml
//! sudo postern service install --config /etc/postern/postern.yml
//! ```

mod api_cli;
mod events_cli;
mod service_cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::{
    ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, parser::ValueSource,
};
use postern_agent::{Agent, load_files, overlay, parse_raw};
use postern_telemetry::{LogFormat, Telemetry, TraceSettings};
use serde_yaml_ng::{Mapping, Value};

/// mimalloc: memory freed on another thread than the one that took it
/// (a request's buffers, an event's JSON) goes back without glibc's
/// arena lock, which two busy threads otherwise fight over.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "postern",
    version,
    about = "Expose a local service through a Postern edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Debug, Args)]
struct Global {
    /// Config file(s), ngrok v2 YAML; later files win. Default:
    /// ~/.config/postern/postern.yml when it exists.
    #[arg(long = "config", global = true)]
    config: Vec<PathBuf>,
    /// Authtoken.
    #[arg(long, global = true, env = "POSTERN_AUTHTOKEN", hide_env_values = true)]
    authtoken: Option<String>,
    /// Edge agent listener, host:port.
    #[arg(long, global = true)]
    server_addr: Option<String>,
    /// Region; with connect_domain dials tunnel.<region>.connect.<connect_domain>.
    #[arg(long, global = true)]
    region: Option<String>,
    /// TLS name to verify instead of the server_addr host.
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    /// PEM file of CAs to trust for the edge (a private edge CA).
    #[arg(long, global = true)]
    root_cas: Option<String>,
    /// Idle data streams kept open for the edge (0: open each on demand).
    #[arg(long, global = true)]
    stream_pool: Option<u32>,
    /// Connections to the edge per session, data streams spread across
    /// them (default: one per core, at most 4).
    #[arg(long, global = true)]
    connections: Option<u32>,
    /// Log format: text (human-readable) or json (one object per line).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an HTTP upstream on an HTTPS endpoint.
    Http {
        /// Upstream: 8080, host:port, http://..., https://...
        addr: String,
        #[command(flatten)]
        common: TunnelFlags,
        /// Verify an https:// upstream's certificate.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        upstream_tls_verify: bool,
        /// The upstream's protocol: http1 (default) or http2 (gRPC; h2c
        /// for http://, ALPN h2 for https://).
        #[arg(long)]
        upstream_protocol: Option<String>,
        #[command(flatten)]
        auth: Box<postern_agent::AuthFlags>,
        #[command(flatten)]
        modules: Box<postern_agent::ModuleFlags>,
        /// Capture requests for the inspector (ngrok's --inspect; default true).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        inspect: Option<bool>,
    },
    /// Serve a TLS endpoint routed by SNI.
    Tls {
        /// Upstream: 443, host:port, tls://...
        addr: String,
        #[command(flatten)]
        common: TunnelFlags,
        /// Where TLS ends: edge, agent or upstream (default upstream, or edge with --crt/--key).
        #[arg(long)]
        terminate_at: Option<String>,
        /// Certificate (PEM) for terminate_at edge or agent.
        #[arg(long)]
        crt: Option<String>,
        /// Private key (PEM).
        #[arg(long)]
        key: Option<String>,
        /// Verify a tls:// upstream's certificate.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        upstream_tls_verify: bool,
    },
    /// Serve a TCP endpoint.
    Tcp {
        /// Upstream: 22 or host:port.
        addr: String,
        /// Ask for this public address (host:port; the port counts).
        #[arg(long)]
        remote_addr: Option<String>,
        /// The endpoint's URL (ngrok's --url): tcp://host:port, host:port,
        /// or tcp:// for a random port.
        #[arg(long)]
        url: Option<String>,
        /// PROXY protocol version to write to the upstream (1 or 2).
        #[arg(long)]
        proxy_proto: Option<String>,
        #[command(flatten)]
        cidrs: CidrFlags,
        #[command(flatten)]
        pooling: PoolingFlag,
        #[command(flatten)]
        policy: PolicyFlag,
    },
    /// Start tunnels from the config files.
    Start {
        /// Tunnel names.
        names: Vec<String>,
        /// Start every tunnel in the config.
        #[arg(long)]
        all: bool,
    },
    /// Read an edge's events from Kafka.
    Events {
        #[command(subcommand)]
        command: events_cli::EventsCommand,
    },
    /// Call the edge's admin API: postern api <resource> <verb>.
    Api(api_cli::ApiArgs),
    /// Check config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the agent as a systemd service.
    Service {
        #[command(subcommand)]
        command: service_cli::ServiceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check the config files as `postern start --all` would load them
    /// (every key, value and file they name); print every problem found
    /// and exit 1, or "Valid configuration file at …".
    Check,
}

/// The global flags that feed a session, which the commands that start
/// none refuse rather than ignore.
const SESSION_FLAGS: [&str; 7] = [
    "authtoken",
    "server_addr",
    "region",
    "tls_server_name",
    "root_cas",
    "stream_pool",
    "connections",
];

const NO_TUNNELS: &str = "tunnels: the config defines no tunnels";

/// `--traffic-policy-file`.
#[derive(Debug, Args)]
struct PolicyFlag {
    /// ngrok's Traffic Policy for the endpoint: a YAML or JSON file.
    #[arg(long, alias = "policy-file")]
    traffic_policy_file: Option<PathBuf>,
}

impl PolicyFlag {
    /// Puts the file's text in the tunnel's `traffic_policy`.
    fn set(self, tunnel: &mut Mapping) -> anyhow::Result<()> {
        if let Some(path) = self.traffic_policy_file {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("--traffic-policy-file: cannot read {}", path.display())
            })?;
            set(tunnel, "traffic_policy", Some(text));
        }
        Ok(())
    }
}

/// What name an HTTP or TLS endpoint asks for.
#[derive(Debug, Args)]
struct NameFlags {
    /// The endpoint's URL (ngrok's --url): https://app.example.com,
    /// app.example.com, http://…, tls://…, or a scheme alone for a random name.
    #[arg(long)]
    url: Option<String>,
    /// Domain to serve: app.example.com or *.example.com.
    #[arg(long, alias = "hostname")]
    domain: Option<String>,
    /// A label under the edge's base domain for random names (ngrok's
    /// --subdomain).
    #[arg(long)]
    subdomain: Option<String>,
}

impl NameFlags {
    fn set(self, tunnel: &mut Mapping) {
        set(tunnel, "url", self.url);
        set(tunnel, "domain", self.domain);
        set(tunnel, "subdomain", self.subdomain);
    }
}

#[derive(Debug, Args)]
struct TunnelFlags {
    #[command(flatten)]
    name: NameFlags,
    /// Require client certificates from these CAs: a PEM file, or CA ids
    /// (ca_…, comma-separated) of the edge's certificate-authority store.
    #[arg(long)]
    mutual_tls_cas: Option<String>,
    /// PROXY protocol version to write to the upstream (1 or 2).
    #[arg(long)]
    proxy_proto: Option<String>,
    #[command(flatten)]
    cidrs: CidrFlags,
    #[command(flatten)]
    pooling: PoolingFlag,
    #[command(flatten)]
    policy: PolicyFlag,
}

/// ngrok's `--pooling-enabled`.
#[derive(Debug, Args)]
struct PoolingFlag {
    /// Share the endpoint with other agents that pool it with the same
    /// settings; the edge balances visitors across them.
    #[arg(long = "pooling-enabled")]
    enabled: bool,
}

impl PoolingFlag {
    fn set(&self, tunnel: &mut Mapping) {
        if self.enabled {
            set(tunnel, "pooling_enabled", Some(true));
        }
    }
}

/// ngrok's IP restriction flags.
#[derive(Debug, Args)]
struct CidrFlags {
    /// Allow only these sources (CIDR, IPv4 or IPv6; repeat the flag).
    #[arg(long = "cidr-allow")]
    allow: Vec<String>,
    /// Refuse these sources (deny wins over allow).
    #[arg(long = "cidr-deny")]
    deny: Vec<String>,
}

impl CidrFlags {
    /// The config's `ip_restriction` map, when any flag was given.
    fn to_yaml(&self) -> Option<Value> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return None;
        }
        let list =
            |v: &[String]| Value::Sequence(v.iter().map(|c| Value::from(c.as_str())).collect());
        let mut map = Mapping::new();
        map.insert(Value::from("allow_cidrs"), list(&self.allow));
        map.insert(Value::from("deny_cidrs"), list(&self.deny));
        Some(Value::Mapping(map))
    }
}

fn set(map: &mut Mapping, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        map.insert(Value::from(key), v.into());
    }
}

/// The merged config files with the command line on top, and the tunnel
/// names to run.
fn build_config(cli: Cli) -> anyhow::Result<(Value, Option<Vec<String>>)> {
    let mut value = load_files(&config_paths(&cli.global))?;
    let mut top = Mapping::new();
    let g = cli.global;
    set(&mut top, "authtoken", g.authtoken);
    set(&mut top, "server_addr", g.server_addr);
    set(&mut top, "region", g.region);
    set(&mut top, "tls_server_name", g.tls_server_name);
    set(&mut top, "root_cas", g.root_cas);
    set(&mut top, "stream_pool", g.stream_pool.map(u64::from));
    set(&mut top, "connections", g.connections.map(u64::from));
    let mut tunnel = Mapping::new();
    let names = match cli.command {
        Command::Events { .. }
        | Command::Api(_)
        | Command::Config { .. }
        | Command::Service { .. } => {
            anyhow::bail!("this command starts no tunnels")
        }
        Command::Start { names, all } => {
            if all {
                None
            } else if names.is_empty() {
                anyhow::bail!("name the tunnels to start, or pass --all");
            } else {
                Some(names)
            }
        }
        Command::Http {
            addr,
            common,
            upstream_tls_verify,
            upstream_protocol,
            auth,
            modules,
            inspect,
        } => {
            set(&mut tunnel, "upstream_protocol", upstream_protocol);
            for (key, value) in auth.tunnel_keys().into_iter().chain(modules.tunnel_keys()) {
                set(&mut tunnel, key, Some(value));
            }
            set(&mut tunnel, "inspect", inspect);
            set(&mut tunnel, "proto", Some("http"));
            set(&mut tunnel, "addr", Some(addr));
            common.name.set(&mut tunnel);
            set(&mut tunnel, "proxy_proto", common.proxy_proto);
            set(&mut tunnel, "ip_restriction", common.cidrs.to_yaml());
            common.pooling.set(&mut tunnel);
            common.policy.set(&mut tunnel)?;
            set(
                &mut tunnel,
                "upstream_tls_verify",
                Some(upstream_tls_verify),
            );
            Some(vec!["command_line".to_string()])
        }
        Command::Tls {
            addr,
            common,
            terminate_at,
            crt,
            key,
            upstream_tls_verify,
        } => {
            set(&mut tunnel, "proto", Some("tls"));
            set(&mut tunnel, "addr", Some(addr));
            common.name.set(&mut tunnel);
            set(&mut tunnel, "proxy_proto", common.proxy_proto);
            set(&mut tunnel, "ip_restriction", common.cidrs.to_yaml());
            common.pooling.set(&mut tunnel);
            common.policy.set(&mut tunnel)?;
            set(&mut tunnel, "terminate_at", terminate_at);
            set(&mut tunnel, "mutual_tls_cas", common.mutual_tls_cas);
            set(&mut tunnel, "crt", crt);
            set(&mut tunnel, "key", key);
            set(
                &mut tunnel,
                "upstream_tls_verify",
                Some(upstream_tls_verify),
            );
            Some(vec!["command_line".to_string()])
        }
        Command::Tcp {
            addr,
            remote_addr,
            url,
            proxy_proto,
            cidrs,
            pooling,
            policy,
        } => {
            set(&mut tunnel, "ip_restriction", cidrs.to_yaml());
            pooling.set(&mut tunnel);
            policy.set(&mut tunnel)?;
            set(&mut tunnel, "proto", Some("tcp"));
            set(&mut tunnel, "addr", Some(addr));
            set(&mut tunnel, "remote_addr", remote_addr);
            set(&mut tunnel, "url", url);
            set(&mut tunnel, "proxy_proto", proxy_proto);
            Some(vec!["command_line".to_string()])
        }
    };
    let mut tunnels = Mapping::new();
    if !tunnel.is_empty() {
        tunnels.insert(Value::from("command_line"), Value::Mapping(tunnel));
    }
    overlay(&mut value, top, tunnels);
    Ok((value, names))
}

/// `--config`, or the default file when it exists.
fn config_paths(global: &Global) -> Vec<PathBuf> {
    if global.config.is_empty() {
        default_config_path()
            .filter(|p| p.exists())
            .into_iter()
            .collect()
    } else {
        global.config.clone()
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("postern").join("postern.yml"))
}

#[tokio::main]
async fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let telemetry = match Telemetry::init(
        "postern",
        "warn",
        cli.global.log_format,
        &TraceSettings::default(),
    ) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            std::process::exit(1);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = run(cli, &matches).await;
    telemetry.shutdown().await;
    if let Err(e) = result {
        eprintln!("ERROR: {e:#}");
        std::process::exit(1);
    }
}

/// Refuses the session flags given on the command line to a command that
/// starts no session.
fn refuse_session_flags(matches: &ArgMatches, command: &str) -> anyhow::Result<()> {
    match SESSION_FLAGS
        .iter()
        .find(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
    {
        Some(id) => anyhow::bail!(
            "--{}: `postern {command}` starts no session and does not use it",
            id.replace('_', "-")
        ),
        None => Ok(()),
    }
}

/// `postern config check`: every problem of the files, or that they are valid.
fn check_config(paths: &[PathBuf]) -> anyhow::Result<()> {
    if paths.is_empty() {
        anyhow::bail!(
            "no config file: pass --config <file>{}",
            default_config_path()
                .map(|d| format!(" ({} does not exist)", d.display()))
                .unwrap_or_default()
        );
    }
    let files = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let raw = parse_raw(load_files(paths)?).with_context(|| format!("in {files}"))?;
    let no_tunnels = raw.tunnels.0.is_empty();
    let mut problems: Vec<String> = match raw.validate(None) {
        Ok(_) => Vec::new(),
        Err(e) => format!("{e:#}").lines().map(str::to_string).collect(),
    };
    if no_tunnels {
        problems.push(NO_TUNNELS.to_string());
    }
    match problems.len() {
        0 => {
            println!("Valid configuration file at {files}");
            Ok(())
        }
        n => anyhow::bail!(
            "{n} problem{} in {files}:\n  {}",
            if n == 1 { "" } else { "s" },
            problems.join("\n  ")
        ),
    }
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    let cli = match cli.command {
        Command::Events { command } => return events_cli::run(command).await,
        Command::Api(args) => {
            refuse_session_flags(matches, "api")?;
            return api_cli::run(args, &config_paths(&cli.global)).await;
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            refuse_session_flags(matches, "config check")?;
            return check_config(&config_paths(&cli.global));
        }
        Command::Service { command } => {
            refuse_session_flags(matches, "service")?;
            let mut paths = Vec::new();
            if let service_cli::ServiceCommand::Install { .. } = command {
                for path in config_paths(&cli.global) {
                    paths.push(
                        path.canonicalize()
                            .with_context(|| format!("--config {}", path.display()))?,
                    );
                }
                check_config(&paths)?;
            } else if !cli.global.config.is_empty() {
                anyhow::bail!("--config: only `postern service install` takes config files");
            }
            return service_cli::run(command, &paths);
        }
        command => Cli { command, ..cli },
    };
    let (value, names) = build_config(cli)?;
    let config = parse_raw(value)?.validate(names.as_deref())?;
    anyhow::ensure!(!config.tunnels.is_empty(), NO_TUNNELS);
    let upstreams: Vec<(String, String)> = config
        .tunnels
        .iter()
        .map(|t| (t.name.clone(), t.upstream.url(t.proto)))
        .collect();
    let agent = Agent::start(config);
    if let Some(addr) = agent.web_addr() {
        println!("{:<16}http://{addr}", "Web Interface");
    }
    let mut status = agent.status();
    let printer = tokio::spawn(async move {
        let mut shown = Vec::new();
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            if s.online && s.tunnels != shown {
                println!("{:<16}online", "Session Status");
                println!("{:<16}{}", "Session", s.session_id);
                println!("{:<16}{} (node {})", "Region", s.region, s.node_id);
                for (name, url) in &s.tunnels {
                    let upstream = upstreams
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, u)| u.as_str())
                        .unwrap_or("(started through the agent API)");
                    println!("{:<16}{url} -> {upstream}", "Forwarding");
                }
                shown = s.tunnels.clone();
            } else if !s.online && !shown.is_empty() {
                println!(
                    "{:<16}reconnecting ({})",
                    "Session Status",
                    s.last_error.as_deref().unwrap_or("")
                );
            }
        }
    });
    let stop =
        postern_net::shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
    let result = agent.run_until(stop).await;
    printer.abort();
    Ok(result?)
}
