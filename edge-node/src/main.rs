//! `postern-edge`: parses flags, sets up logging, runs the node until
//! SIGTERM or Ctrl-C, then drains; SIGHUP reloads the certificate files
//! of `[[tls.certificates]]`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use postern_edge::{EdgeConfig, Listeners, dev_config};
use postern_telemetry::{LogFormat, Telemetry};
use tokio::signal::unix::{SignalKind, signal};

/// mimalloc: memory freed on another thread than the one that took it
/// (a request's buffers, an event's JSON) goes back without glibc's
/// arena lock, which two busy threads otherwise fight over.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Postern edge node.
#[derive(Debug, Parser)]
#[command(name = "postern-edge", version)]
struct Args {
    /// Config file (TOML).
    #[arg(long, short, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Run one node on loopback with a local CA and a generated authtoken.
    #[arg(long)]
    dev: bool,
    /// Check a config file (TOML) and the certificate and key files it
    /// names, print "ok" and exit 0; or print the problem and exit 1.
    /// Nothing is started.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "dev"])]
    check_config: Option<PathBuf>,
    /// State directory for --dev.
    #[arg(long, default_value = "postern-data")]
    data_dir: PathBuf,
    /// Log format: text (human-readable) or json (one object per line).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match &args.check_config {
        Some(path) => check_config(path),
        None => run(args).await,
    };
    if let Err(e) = result {
        eprintln!("ERROR: {e:#}");
        std::process::exit(1);
    }
}

/// `--check-config`: the file as the node would load it at start.
fn check_config(path: &Path) -> anyhow::Result<()> {
    // Loading reads and parses every certificate and key file `[tls]`
    // names, as the node does when it starts; nothing is written.
    EdgeConfig::load(path)?;
    println!("ok");
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (config, dev) = match (&args.config, args.dev) {
        (Some(path), _) => (EdgeConfig::load(path)?, None),
        (None, true) => {
            let setup = dev_config(&args.data_dir)?;
            (setup.config, Some((setup.authtoken, setup.api_key)))
        }
        (None, false) => {
            anyhow::bail!("give --config <file>, --check-config <file>, or --dev for a local node")
        }
    };
    let telemetry = Telemetry::init("postern-edge", "info", args.log_format, &config.telemetry)?;
    let listeners = Listeners::bind(&config).await?;
    let edge = postern_edge::Edge::start(config, listeners).await?;
    if let Some((token, api_key)) = dev {
        print_dev_banner(&edge, &token, &api_key);
    }
    let shutdown =
        postern_net::shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => match edge.reload_certificates() {
                Ok(count) => tracing::info!(count, "SIGHUP: tls.certificates reloaded"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: tls.certificates not reloaded; the certificates served stay as they were"
                ),
            },
        }
    }
    let stopped = edge.shutdown().await;
    telemetry.shutdown().await;
    stopped?;
    Ok(())
}

fn print_dev_banner(edge: &postern_edge::Edge, token: &str, api_key: &str) {
    let config = edge.config();
    let addrs = edge.addresses();
    let ca = config.data_dir.join(postern_ingress::DevCa::CERT_FILE);
    println!(
        "\nPostern edge (dev) is up.\n\
         \n  agent ingress  {ingress}:{agent_port}\
         \n  HTTPS          https://<name>.{domain}:{https_port}   (TLS endpoints too)\
         \n  HTTP           http://<name>.{domain}:{http_port}\
         \n  dev CA         {ca}\
         \n  admin API      http://{admin}   (Authorization: Bearer {api_key})\
         \n  metrics        {metrics}   (Prometheus; /healthz, /readyz)\
         \n  events         {events}   (JSON lines)\
         \n\nStart an agent in another terminal:\
         \n\n  cargo run --release --bin postern -- http 8000 --server-addr {ingress}:{agent_port} \\\
         \n      --root-cas {ca} --authtoken {token}\
         \n\nthen:  curl --cacert {ca} https://<the printed name>:{https_port}/\n{sdk}{ssh}",
        ssh = match (addrs.ssh, edge.ssh_host_key()) {
            (Some(ssh), Some((_, fingerprint))) => format!(
                "\nOr, with no agent at all, plain ssh (host key {fingerprint}):\
                 \n\n  ssh -p {port} -R 443:localhost:8000 {token}@{host} http\n",
                port = ssh.port(),
                host = ssh.ip(),
            ),
            _ => String::new(),
        },
        ingress = config.agent_ingress_name(),
        agent_port = addrs.agent.port(),
        domain = config.domain,
        https_port = addrs.https.port(),
        http_port = addrs.http.map(|a| a.port()).unwrap_or(0),
        ca = ca.display(),
        events = config
            .data_dir
            .join(postern_edge::DEV_EVENTS_FILE)
            .display(),
        admin = addrs
            .admin
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into()),
        metrics = addrs
            .metrics
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_else(|| "off".into()),
        sdk = addrs
            .ngrok_agent
            .map(|a| sdk_banner(a, &ca, token))
            .unwrap_or_default(),
    );
}

/// How to point ngrok's SDKs at the dev node's ngrok agent ingress: its
/// loopback address (the dev agent certificate names 127.0.0.1) and the
/// dev CA.
fn sdk_banner(addr: std::net::SocketAddr, ca: &std::path::Path, token: &str) -> String {
    format!(
        "\nOr point one of ngrok's SDKs at it (ngrok's agent protocol on {addr}), e.g. Python:\
         \n\n  import ngrok\
         \n  listener = ngrok.forward(8000, authtoken=\"{token}\", server_addr=\"{addr}\",\
         \n      session_ca_cert=bytearray(open(\"{ca}\", \"rb\").read()))\
         \n\nRust: Session::builder().server_addr(\"{addr}\")?.ca_cert(<{ca}>); \
         Node: ngrok.forward({{addr: 8000, server_addr: \"{addr}\", session_ca_cert: <{ca}>}}).\n",
        ca = ca.display(),
    )
}
