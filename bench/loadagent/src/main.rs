//! `postern-loadagent`: starts N Postern agent sessions in this one process,
//! each with its own TLS/HTTP2 connection to the edge, `stream_pool: 0` and
//! one tunnel, so that the edge's memory per idle agent session can be
//! measured without N agent processes. Reports progress on stdout as JSON
//! lines and holds the sessions until SIGTERM or Ctrl-C.
//!
//! ```text
//! postern-loadagent --sessions 10000 --server-addr tunnel.us.connect.postern.localhost:30446 \
//!     --root-cas DIR/dev-ca.pem --authtoken T --proto http --upstream 127.0.0.1:30080
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use postern_agent::{Agent, Status, parse_raw};
use tokio::sync::watch;

struct Args {
    sessions: usize,
    server_addr: String,
    root_cas: String,
    authtoken: String,
    /// `http` (one domain `s<i>.<domain>` each) or `tcp` (one port each).
    proto: String,
    upstream: String,
    domain: String,
    tcp_host: String,
    tcp_port_base: u16,
    /// Sessions started before waiting for them to come online.
    batch: usize,
    batch_timeout: Duration,
    /// `connections` for every session (the agent's default when absent).
    connections: Option<u32>,
}

const USAGE: &str = "postern-loadagent --sessions N --server-addr HOST:PORT --root-cas PEM \
--authtoken T [--proto http|tcp] [--upstream HOST:PORT] [--domain postern.localhost] \
[--tcp-host 127.0.0.1] [--tcp-port-base PORT] [--batch 250] [--batch-timeout-secs 20] \
[--connections N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sessions: 0,
        server_addr: String::new(),
        root_cas: String::new(),
        authtoken: String::new(),
        proto: "http".into(),
        upstream: "127.0.0.1:30080".into(),
        domain: "postern.localhost".into(),
        tcp_host: "127.0.0.1".into(),
        tcp_port_base: 31000,
        batch: 250,
        batch_timeout: Duration::from_secs(20),
        connections: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--sessions" => args.sessions = value.parse()?,
            "--server-addr" => args.server_addr = value,
            "--root-cas" => args.root_cas = value,
            "--authtoken" => args.authtoken = value,
            "--proto" => args.proto = value,
            "--upstream" => args.upstream = value,
            "--domain" => args.domain = value,
            "--tcp-host" => args.tcp_host = value,
            "--tcp-port-base" => args.tcp_port_base = value.parse()?,
            "--batch" => args.batch = value.parse::<usize>()?.max(1),
            "--batch-timeout-secs" => args.batch_timeout = Duration::from_secs(value.parse()?),
            "--connections" => args.connections = Some(value.parse()?),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if args.sessions == 0 || args.server_addr.is_empty() || args.authtoken.is_empty() {
        bail!("--sessions, --server-addr and --authtoken are required\n{USAGE}");
    }
    if args.proto == "tcp" && usize::from(args.tcp_port_base) + args.sessions > 65536 {
        bail!("--tcp-port-base + --sessions goes past port 65535");
    }
    Ok(args)
}

/// The agent config of session `i`, as the YAML a user would write.
fn config_yaml(args: &Args, i: usize) -> anyhow::Result<String> {
    let tunnel = match args.proto.as_str() {
        "http" => format!(
            "    proto: http\n    addr: \"{}\"\n    domain: \"s{i}.{}\"\n",
            args.upstream, args.domain
        ),
        "tcp" => format!(
            "    proto: tcp\n    addr: \"{}\"\n    remote_addr: \"{}:{}\"\n",
            args.upstream,
            args.tcp_host,
            usize::from(args.tcp_port_base) + i
        ),
        other => bail!("--proto {other}: use http or tcp"),
    };
    let connections = args
        .connections
        .map(|n| format!("connections: {n}\n"))
        .unwrap_or_default();
    let root_cas = if args.root_cas.is_empty() {
        String::new()
    } else {
        format!("root_cas: \"{}\"\n", args.root_cas)
    };
    Ok(format!(
        "version: \"2\"\nauthtoken: \"{}\"\nserver_addr: \"{}\"\n{root_cas}{connections}stream_pool: 0\n\
         tunnels:\n  t{i}:\n{tunnel}",
        args.authtoken, args.server_addr
    ))
}

fn online(statuses: &[watch::Receiver<Status>]) -> usize {
    statuses.iter().filter(|s| s.borrow().online).count()
}

fn some_error(statuses: &[watch::Receiver<Status>]) -> String {
    statuses
        .iter()
        .find_map(|s| {
            let s = s.borrow();
            (!s.online).then(|| s.last_error.clone()).flatten()
        })
        .unwrap_or_default()
        .replace(['"', '\\', '\n'], " ")
}

fn report(event: &str, started: usize, statuses: &[watch::Receiver<Status>], t0: Instant) {
    println!(
        "{{\"event\":\"{event}\",\"started\":{started},\"online\":{},\"secs\":{:.3},\"error\":\"{}\"}}",
        online(statuses),
        t0.elapsed().as_secs_f64(),
        some_error(statuses)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = parse_args()?;
    let t0 = Instant::now();
    let mut agents: Vec<Agent> = Vec::with_capacity(args.sessions);
    let mut statuses = Vec::with_capacity(args.sessions);
    let mut next = 0;
    while next < args.sessions {
        let end = (next + args.batch).min(args.sessions);
        for i in next..end {
            let raw = parse_raw(serde_yaml_ng::from_str(&config_yaml(&args, i)?)?)?;
            let agent = Agent::start(raw.validate(None)?);
            statuses.push(agent.status());
            agents.push(agent);
        }
        let deadline = Instant::now() + args.batch_timeout;
        while online(&statuses[next..end]) < end - next && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report("progress", end, &statuses, t0);
        next = end;
    }
    let deadline = Instant::now() + args.batch_timeout;
    while online(&statuses) < args.sessions && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report("ready", args.sessions, &statuses, t0);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => report("holding", args.sessions, &statuses, t0),
        }
    }
    report("stopping", args.sessions, &statuses, t0);
    // Dropping 10,000 sessions one by one is slow and not what is measured:
    // exit and let the edge see the connections close.
    std::process::exit(0);
}
