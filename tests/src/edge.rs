//! A real edge node in-process, and agents against it.

use std::{path::PathBuf, sync::Once, time::Duration};

use postern_agent::{Agent, AgentConfig, Status};
use postern_edge::{Addresses, Edge, EdgeConfig, Listeners};
use tokio::net::TcpListener;

use tokio::process::Command;

use crate::{Spawned, TempDir, binary};

/// The test edge's base domain.
pub const DOMAIN: &str = "example.test";
/// A token whose ACL only allows `*.customer1.example.test` and port 29500.
pub const ACL_TOKEN: &str = "acl-token-customer1";
/// The admin API key of every test edge.
pub const API_KEY: &str = "test-admin-api-key-0123456789";

/// Installs the crypto provider and a test log subscriber (RUST_LOG).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let filter =
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Which optional listeners an in-process test edge has, and how it
/// differs from the usual test config.
#[derive(Clone, Copy, Debug, Default)]
struct Listening {
    /// `listen.ssh`.
    ssh: bool,
    /// `listen.http = ""`.
    no_http: bool,
    /// Agent heartbeats of a minute instead of 1 s + 3 s, so that only
    /// the session's own end closes a silent agent's connections.
    slow_heartbeat: bool,
}

/// An edge node on loopback with a dev CA and two authtokens, in-process or
/// as the `postern-edge` binary.
pub struct TestEdge {
    edge: Option<Edge>,
    process: Option<Spawned>,
    pub dir: TempDir,
    pub token: String,
    pub addrs: Addresses,
    extra: String,
    /// `ulimit -n` for the binary.
    fd_limit: Option<u32>,
    node_id: String,
    region: String,
    /// The network namespace the binary runs in, if not this one.
    netns: Option<String>,
}

impl TestEdge {
    pub async fn start() -> TestEdge {
        Self::start_with("").await
    }

    /// `extra` is appended to the TOML config (e.g. a `[limits]` table).
    pub async fn start_with(extra: &str) -> TestEdge {
        Self::start_on("127.0.0.1", extra, "test-edge", "us", Listening::default()).await
    }

    /// As [`TestEdge::start_with`], with the SSH ingress on (`listen.ssh`).
    pub async fn start_with_ssh(extra: &str) -> TestEdge {
        Self::start_ssh_node("test-edge", "us", extra).await
    }

    /// As [`TestEdge::start_node`], with the SSH ingress on.
    pub async fn start_ssh_node(node_id: &str, region: &str, extra: &str) -> TestEdge {
        let listening = Listening {
            ssh: true,
            ..Listening::default()
        };
        Self::start_on("127.0.0.1", extra, node_id, region, listening).await
    }

    /// An edge that waits a minute for a silent agent's heartbeat (see
    /// `Listening::slow_heartbeat`).
    pub async fn start_with_slow_heartbeat() -> TestEdge {
        let listening = Listening {
            slow_heartbeat: true,
            ..Listening::default()
        };
        Self::start_on("127.0.0.1", "", "test-edge", "us", listening).await
    }

    /// An edge whose listeners are on `[::1]`, for IPv6 clients.
    pub async fn start_v6() -> TestEdge {
        Self::start_on("[::1]", "", "test-edge", "us", Listening::default()).await
    }

    /// A node named `node_id` in `region` (e.g. one of a cluster, with a
    /// `[cluster]` table in `extra`).
    pub async fn start_node(node_id: &str, region: &str, extra: &str) -> TestEdge {
        Self::start_on("127.0.0.1", extra, node_id, region, Listening::default()).await
    }

    /// As [`TestEdge::start_node`], with the plain-HTTP listener off
    /// (`listen.http = ""`).
    pub async fn start_node_without_http(node_id: &str, region: &str, extra: &str) -> TestEdge {
        let listening = Listening {
            no_http: true,
            ..Listening::default()
        };
        Self::start_on("127.0.0.1", extra, node_id, region, listening).await
    }

    async fn start_on(
        ip: &str,
        extra: &str,
        node_id: &str,
        region: &str,
        listening: Listening,
    ) -> TestEdge {
        init();
        let dir = TempDir::new("edge");
        let token = format!("test-token-{}", postern_net::random_label());
        let bind = || async { TcpListener::bind(format!("{ip}:0")).await.unwrap() };
        let mut listeners = Listeners {
            agent: bind().await,
            http: if listening.no_http {
                None
            } else {
                Some(bind().await)
            },
            https: bind().await,
            admin: Some(bind().await),
            metrics: Some(bind().await),
            node_link: None,
            ngrok_agent: Some(bind().await),
            ssh: if listening.ssh {
                Some(bind().await)
            } else {
                None
            },
        };
        let mut edge = TestEdge {
            edge: None,
            process: None,
            dir,
            token,
            addrs: Addresses {
                agent: listeners.agent.local_addr().unwrap(),
                http: listeners.http.as_ref().map(|l| l.local_addr().unwrap()),
                https: listeners.https.local_addr().unwrap(),
                admin: listeners.admin.as_ref().map(|l| l.local_addr().unwrap()),
                metrics: listeners.metrics.as_ref().map(|l| l.local_addr().unwrap()),
                ngrok_agent: listeners
                    .ngrok_agent
                    .as_ref()
                    .map(|l| l.local_addr().unwrap()),
                ssh: listeners.ssh.as_ref().map(|l| l.local_addr().unwrap()),
            },
            extra: extra.to_string(),
            fd_limit: None,
            node_id: node_id.to_string(),
            region: region.to_string(),
            netns: None,
        };
        let mut config = edge.config();
        if listening.slow_heartbeat {
            config.session.heartbeat_interval = Duration::from_secs(30);
            config.session.heartbeat_tolerance = Duration::from_secs(30);
        }
        listeners.node_link = link_listener(&config).await;
        edge.edge = Some(Edge::start(config, listeners).await.expect("edge starts"));
        edge
    }

    /// Runs the `postern-edge` binary instead, on free loopback ports.
    pub async fn start_process() -> TestEdge {
        Self::start_process_with("").await
    }

    /// As [`TestEdge::start_process`], with `extra` appended to the config.
    pub async fn start_process_with(extra: &str) -> TestEdge {
        Self::spawn_binary(extra, None, "test-edge", "us", None).await
    }

    /// As [`TestEdge::start_node`], running the binary.
    pub async fn start_process_node(node_id: &str, region: &str, extra: &str) -> TestEdge {
        Self::spawn_binary(extra, None, node_id, region, None).await
    }

    /// As [`TestEdge::start_process_node`], inside the network namespace
    /// `netns` and listening on its address `ip`.
    pub async fn start_process_in(
        node_id: &str,
        region: &str,
        extra: &str,
        netns: &crate::netns::NetNs,
    ) -> TestEdge {
        let at = Some((netns.name.clone(), netns.ns_ip));
        Self::spawn_binary(extra, None, node_id, region, at).await
    }

    /// The binary with at most `fds` open file descriptors (`ulimit -n`).
    pub async fn start_process_with_fd_limit(fds: u32) -> TestEdge {
        Self::spawn_binary("", Some(fds), "test-edge", "us", None).await
    }

    async fn spawn_binary(
        extra: &str,
        fd_limit: Option<u32>,
        node_id: &str,
        region: &str,
        netns: Option<(String, std::net::Ipv4Addr)>,
    ) -> TestEdge {
        init();
        let ip = netns
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |n| n.1);
        // Five picks of one process: never the same port twice (a CI run
        // once drew one port for two listeners and the binary could not
        // start).
        let mut taken = std::collections::HashSet::new();
        let mut free = || loop {
            let port = crate::free_port();
            if taken.insert(port) {
                return std::net::SocketAddr::from((ip, port));
            }
        };
        let mut edge = TestEdge {
            edge: None,
            process: None,
            dir: TempDir::new("edge-bin"),
            token: format!("test-token-{}", postern_net::random_label()),
            addrs: Addresses {
                agent: free(),
                http: Some(free()),
                https: free(),
                admin: Some(free()),
                metrics: Some(free()),
                ngrok_agent: Some(free()),
                ssh: None,
            },
            extra: extra.to_string(),
            fd_limit: None,
            node_id: node_id.to_string(),
            region: region.to_string(),
            netns: netns.map(|n| n.0),
        };
        edge.fd_limit = fd_limit;
        std::fs::write(edge.dir.path().join("edge.toml"), edge.config_toml()).unwrap();
        edge.spawn_process().await;
        edge
    }

    /// Runs the binary again on the same config and data directory, after
    /// the previous process has exited.
    pub async fn restart_process(&mut self) {
        if let Some(mut old) = self.process.take() {
            let _ = old.child.wait().await;
        }
        self.spawn_process().await;
    }

    async fn spawn_process(&mut self) {
        let mut command = match (self.fd_limit, &self.netns) {
            (None, None) => Command::new(binary("postern-edge")),
            (None, Some(netns)) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns])
                    .arg(binary("postern-edge"));
                ip
            }
            (Some(fds), _) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
                    .arg(binary("postern-edge"));
                sh
            }
        };
        let process = Spawned::spawn(
            command
                .arg("--config")
                .arg(self.dir.path().join("edge.toml")),
        );
        self.process = Some(process);
        let agent = self.addrs.agent;
        crate::eventually(20, "the edge binary listens", || async move {
            tokio::net::TcpStream::connect(agent).await.is_ok()
        })
        .await;
    }

    /// The edge process, when running the binary.
    pub fn process(&mut self) -> &mut Spawned {
        self.process.as_mut().expect("edge runs as a process")
    }

    /// The config as TOML, for in-process nodes and for the binary.
    pub fn config_toml(&self) -> String {
        format!(
            r#"
node_id = "{node_id}"
region = "{region}"
domain = "{DOMAIN}"
data_dir = "{dir}"
drain_grace = "3s"
[listen]
agent = "{agent}"
http = "{http}"
https = "{https}"
admin = "{admin}"
metrics = "{metrics}"
ngrok_agent = "{ngrok_agent}"
{ssh}[public]
tcp_host = "127.0.0.1"
random_domain_base = "apps.{DOMAIN}"
[tcp]
bind_ip = "127.0.0.1"
ports = "20000-29999"
[tls]
dev_ca = true
[session]
heartbeat_interval = "1s"
heartbeat_tolerance = "3s"
[admin]
api_keys = ["{API_KEY}"]
[[authtokens]]
token = "{token}"
description = "unrestricted test token"
[[authtokens]]
token = "{ACL_TOKEN}"
acl = ["bind:*.customer1.{DOMAIN}", "bind:*:29500"]
{extra}
"#,
            dir = self.dir.path().display(),
            agent = self.addrs.agent,
            http = self.addrs.http.map(|a| a.to_string()).unwrap_or_default(),
            https = self.addrs.https,
            admin = self.addrs.admin.expect("admin listener"),
            metrics = self.addrs.metrics.expect("metrics listener"),
            ngrok_agent = self.addrs.ngrok_agent.expect("ngrok agent listener"),
            ssh = self
                .addrs
                .ssh
                .map(|a| format!("ssh = \"{a}\"\n"))
                .unwrap_or_default(),
            token = self.token,
            extra = self.extra,
            node_id = self.node_id,
            region = self.region,
        )
    }

    fn config(&self) -> EdgeConfig {
        EdgeConfig::from_toml(&self.config_toml()).expect("test config is valid")
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join(postern_ingress::DevCa::CERT_FILE)
    }

    pub fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("edge running in-process")
    }

    /// Whether the node runs in this process (not as the binary).
    pub fn in_process(&self) -> bool {
        self.edge.is_some()
    }

    /// A counter of the public side.
    pub fn stat(&self, name: &str) -> u64 {
        self.edge()
            .stats()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Drains and stops the node; how the drain went, when the node ran
    /// in this process.
    pub async fn stop(&mut self) -> Option<postern_edge::Drained> {
        let edge = self.edge.take()?;
        Some(edge.shutdown().await.expect("edge drains cleanly"))
    }

    /// Starts the node again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let bind = |addr| async move {
            for _ in 0..100 {
                if let Ok(l) = TcpListener::bind(addr).await {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("could not bind {addr} again");
        };
        let listeners = Listeners {
            agent: bind(self.addrs.agent).await,
            http: match self.addrs.http {
                Some(addr) => Some(bind(addr).await),
                None => None,
            },
            https: bind(self.addrs.https).await,
            admin: Some(bind(self.addrs.admin.unwrap()).await),
            metrics: Some(bind(self.addrs.metrics.unwrap()).await),
            node_link: None,
            ngrok_agent: Some(bind(self.addrs.ngrok_agent.unwrap()).await),
            ssh: match self.addrs.ssh {
                Some(addr) => Some(bind(addr).await),
                None => None,
            },
        };
        let config = self.config();
        let listeners = Listeners {
            node_link: link_listener(&config).await,
            ..listeners
        };
        self.edge = Some(Edge::start(config, listeners).await.expect("edge restarts"));
    }

    /// The events written so far to `file` under the node's data
    /// directory by a file destination (one JSON object a line).
    pub fn file_events(&self, file: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The agent YAML preamble for this edge with `token`.
    /// The agent's flags for the `postern` binary against this edge.
    pub fn agent_args(&self, token: &str) -> Vec<String> {
        vec![
            "--authtoken".into(),
            token.to_string(),
            "--server-addr".into(),
            self.addrs.agent.to_string(),
            "--tls-server-name".into(),
            format!("tunnel.{}.connect.{DOMAIN}", self.region),
            "--root-cas".into(),
            self.ca_pem().display().to_string(),
        ]
    }

    pub fn agent_yaml(&self, token: &str, tunnels: &str) -> String {
        let name = format!("tunnel.{}.connect.{DOMAIN}", self.region);
        self.agent_yaml_through(token, &name, &self.ca_pem(), tunnels)
    }

    /// The agent YAML for connecting as `server_name` (an agent ingress's
    /// region domain), trusting `root_cas`.
    fn agent_yaml_through(
        &self,
        token: &str,
        server_name: &str,
        root_cas: &std::path::Path,
        tunnels: &str,
    ) -> String {
        format!(
            "authtoken: {token}\nserver_addr: \"{agent}\"\ntls_server_name: {server_name}\n\
             root_cas: {ca}\nheartbeat_interval: 1s\nheartbeat_tolerance: 3s\ntunnels:\n{tunnels}",
            agent = self.addrs.agent,
            ca = root_cas.display(),
        )
    }

    pub fn agent_config(&self, token: &str, tunnels: &str) -> AgentConfig {
        parse_agent_config(&self.agent_yaml(token, tunnels))
    }

    /// Starts an in-process agent with the default token and waits until
    /// it is online. `tunnels` is the YAML body of the `tunnels:` map.
    pub async fn agent(&self, tunnels: &str) -> (Agent, Status) {
        self.agent_with(&self.token.clone(), tunnels)
            .await
            .expect("agent comes online")
    }

    /// An in-process agent of `yaml` (see [`TestEdge::agent_yaml`]), once
    /// online; the error is the agent's when it stops before that.
    pub async fn agent_of_yaml(&self, yaml: &str) -> anyhow::Result<(Agent, Status)> {
        online(Agent::start(parse_agent_config(yaml))).await
    }

    /// As [`TestEdge::agent`] with a token; the error is the agent's when
    /// it stops before coming online.
    pub async fn agent_with(&self, token: &str, tunnels: &str) -> anyhow::Result<(Agent, Status)> {
        online(Agent::start(self.agent_config(token, tunnels))).await
    }

    /// As [`TestEdge::agent`], with the agent API and inspector on a free
    /// loopback port: the agent, the API's address and the status once
    /// online. `extra` is agent config put before the edge's keys.
    pub async fn agent_with_api(
        &self,
        extra: &str,
        tunnels: &str,
    ) -> (Agent, std::net::SocketAddr, Status) {
        let yaml = format!(
            "web_addr: 127.0.0.1:0\n{extra}{}",
            self.agent_yaml(&self.token, tunnels)
        );
        let (agent, status) = online(Agent::start(parse_agent_config(&yaml)))
            .await
            .expect("agent comes online");
        let api = agent.web_addr().expect("the API listens");
        (agent, api, status)
    }

    /// As [`TestEdge::agent_with`], connecting as `server_name` and
    /// trusting `root_cas`.
    pub async fn agent_through(
        &self,
        token: &str,
        server_name: &str,
        root_cas: &std::path::Path,
        tunnels: &str,
    ) -> anyhow::Result<(Agent, Status)> {
        let yaml = self.agent_yaml_through(token, server_name, root_cas, tunnels);
        online(Agent::start(parse_agent_config(&yaml))).await
    }

    /// Calls the admin API with `key` and an optional `(content type,
    /// body)`: the status and the JSON answer (`Null` when there is none).
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
        key: &str,
    ) -> (u16, serde_json::Value) {
        let url = format!("http://{}{path}", self.addrs.admin.expect("admin listener"));
        let auth = format!("Authorization: Bearer {key}");
        let mut args = vec!["-X", method, "-H", &auth, "-w", "\n%{http_code}"];
        if let Some((content_type, data)) = body {
            args.extend(["-H", content_type, "--data-binary", data]);
        }
        args.push(&url);
        let out = crate::curl(&args).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').expect("curl wrote the status");
        (
            code.parse().expect("an HTTP status"),
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The HTTP status curl gets for `https://<host><path>` on this edge
    /// (trusting its dev CA), with `extra` curl arguments.
    pub async fn https_status(&self, host: &str, path: &str, extra: &[&str]) -> String {
        let ca = self.ca_pem();
        let resolve = self.resolve(host);
        let url = self.https_url(host, path);
        let mut args = vec![
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        String::from_utf8_lossy(&crate::curl(&args).await.stdout).into_owned()
    }

    /// curl to `https://<host><path>` on this edge, trusting its dev CA,
    /// with `extra` arguments: (status, response headers lower-cased,
    /// body).
    pub async fn fetch(&self, host: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
        let ca = self.ca_pem().display().to_string();
        let resolve = self.resolve(host);
        let url = self.https_url(host, path);
        let mut args = vec!["--cacert", &ca, "--resolve", &resolve, "-D", "-"];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = crate::curl(&args).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no status from {url}: {text} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    /// The node's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The Prometheus text of the node's `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let url = format!(
            "http://{}/metrics",
            self.addrs.metrics.expect("metrics listener")
        );
        let out = crate::curl(&["-f", &url]).await;
        assert!(out.status.success(), "GET {url} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `GET` or `DELETE` `/certificate_authorities/{id}` with the test
    /// admin key.
    pub async fn ca(&self, method: &str, id: &str) -> (u16, serde_json::Value) {
        self.api(
            method,
            &format!("/certificate_authorities/{id}"),
            None,
            API_KEY,
        )
        .await
    }

    /// `curl` to `https://<host>/echo` on this edge, trusting its dev CA,
    /// with an optional client certificate and key and extra arguments.
    pub async fn curl_mtls(
        &self,
        host: &str,
        cert: Option<(&std::path::Path, &std::path::Path)>,
        extra: &[&str],
    ) -> std::process::Output {
        let ca = self.ca_pem();
        let resolve = self.resolve(host);
        let url = self.https_url(host, "/echo");
        let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
        let (c, k);
        if let Some((cert, key)) = cert {
            c = cert.display().to_string();
            k = key.display().to_string();
            args.extend(["--cert", &c, "--key", &k]);
        }
        args.extend(extra);
        args.push(&url);
        crate::curl(&args).await
    }

    /// `host:port:127.0.0.1` for curl's --resolve, on the HTTPS port.
    pub fn resolve(&self, host: &str) -> String {
        format!("{host}:{}:127.0.0.1", self.addrs.https.port())
    }

    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.addrs.https.port())
    }
}

fn parse_agent_config(yaml: &str) -> AgentConfig {
    let value = serde_yaml_ng::from_str(yaml).expect("agent yaml");
    postern_agent::parse_raw(value)
        .and_then(|raw| raw.validate(None))
        .expect("agent config is valid")
}

/// Waits until `agent` is online: its status then, or its error when it
/// stops first.
async fn online(agent: Agent) -> anyhow::Result<(Agent, Status)> {
    let mut status = agent.status();
    let online = tokio::time::timeout(Duration::from_secs(20), status.wait_for(|s| s.online)).await;
    match online {
        Ok(Ok(s)) => {
            let s = s.clone();
            Ok((agent, s))
        }
        Ok(Err(_)) => Err(agent
            .wait()
            .await
            .expect_err("an agent that stops early has failed")
            .into()),
        Err(_) => panic!(
            "agent not online within 20s: {:?}",
            agent.status().borrow().clone()
        ),
    }
}

/// The listener of `[cluster] rpc_listen` (e.g. `127.0.0.1:0`), if set.
async fn link_listener(config: &EdgeConfig) -> Option<TcpListener> {
    let addr = config.cluster.as_ref()?.rpc_listen?;
    Some(
        TcpListener::bind(addr)
            .await
            .expect("binding the node link"),
    )
}

/// The URL a status lists for a tunnel.
/// An `[[events.subscriptions]]` table writing every
/// `http_request_complete.v0` event to `<data_dir>/events.jsonl`.
pub const EVENTS_TO_FILE: &str = r#"
[[events.subscriptions]]
id = "file-events"
sources = [{ type = "http_request_complete.v0" }]
destination = { file = { path = "events.jsonl" } }
"#;

pub fn url_of(status: &Status, tunnel: &str) -> String {
    status
        .tunnels
        .iter()
        .find(|(n, _)| n == tunnel)
        .map(|(_, u)| u.clone())
        .unwrap_or_else(|| panic!("no tunnel {tunnel} in {status:?}"))
}
