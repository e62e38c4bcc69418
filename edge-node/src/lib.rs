//! A Postern edge node: the composition root. It loads the config, serves
//! agents over gRPC/TLS on `tunnel.<region>.connect.<domain>`, keeps the
//! registry of agent sessions, runs the public gateway, and drains on
//! shutdown. Listeners are bound by the caller and passed in, so tests can
//! run a whole node in-process on port 0.

mod acl;
mod admin;
mod auth;
mod ca_store;
mod cluster;
mod config;
mod dev;
mod node_link;
mod oauth;
mod service;
mod session;
mod telemetry;

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use postern_ingress::{CertStore, DevCa, Gateway, GatewayConfig, Outcomes, build_server_config};
use postern_net::{HttpServer, HttpTimeouts, Pem, Secret, certified_key_from_pem};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use acl::Acl;
pub use auth::{AuthtokenRecord, Authtokens};
pub use config::{EdgeConfig, RawConfig, expand_env};
pub use dev::{DEV_EVENTS_FILE, DevSetup, dev_config};

/// How long the node's own servers (admin, metrics, the agent listener)
/// get to stop at shutdown, after the drain.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The node's listening sockets.
pub struct Listeners {
    pub agent: TcpListener,
    pub http: Option<TcpListener>,
    pub https: TcpListener,
    pub admin: Option<TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: Option<TcpListener>,
    /// The link between nodes (`[cluster] rpc_listen`).
    pub node_link: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in the config.
    pub async fn bind(config: &EdgeConfig) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {what} listener on {addr}"))
        };
        Ok(Listeners {
            agent: bind(config.listen.agent, "agent").await?,
            http: match config.listen.http {
                Some(addr) => Some(bind(addr, "http").await?),
                None => None,
            },
            https: bind(config.listen.https, "https").await?,
            admin: match config.listen.admin {
                Some(addr) => Some(bind(addr, "admin").await?),
                None => None,
            },
            metrics: match config.listen.metrics {
                Some(addr) => Some(bind(addr, "metrics").await?),
                None => None,
            },
            node_link: match config.cluster.as_ref().and_then(|c| c.rpc_listen) {
                Some(addr) => Some(bind(addr, "cluster.rpc_listen").await?),
                None => None,
            },
        })
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads the certificates of `[[tls.certificates]]` into `certs`.
fn load_certificates(config: &EdgeConfig, certs: &CertStore) -> anyhow::Result<()> {
    for (cert, key) in &config.tls.certificates {
        let (cert_name, key_name) = (cert.display().to_string(), key.display().to_string());
        let names = certs.add_pem(
            Pem::new(&cert_name, &read(cert)?),
            Pem::new(&key_name, &read(key)?),
        )?;
        tracing::info!(cert = %cert.display(), names = ?names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), "certificate loaded");
    }
    Ok(())
}

/// The agent listener's certificate and key from `tls.agent_cert` and
/// `tls.agent_key`.
fn agent_cert_key(
    (cert, key): &(std::path::PathBuf, std::path::PathBuf),
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    Ok(certified_key_from_pem(
        Pem::new(&format!("tls.agent_cert {}", cert.display()), &read(cert)?),
        Pem::new(&format!("tls.agent_key {}", key.display()), &read(key)?),
    )?)
}

/// What `postern-edge --check-config` checks beyond the file itself:
/// every certificate and key file `[tls]` names is read and parsed, as the
/// node does when it starts. Nothing is written (the dev CA is not
/// created).
pub fn check_config_files(config: &EdgeConfig) -> anyhow::Result<()> {
    load_certificates(config, &CertStore::new(None))?;
    if let Some(paths) = &config.tls.agent_cert {
        agent_cert_key(paths)?;
    }
    Ok(())
}

/// Where a running node listens.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub agent: SocketAddr,
    pub http: Option<SocketAddr>,
    pub https: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// A running edge node.
pub struct Edge {
    config: EdgeConfig,
    addresses: Addresses,
    gateway: Gateway,
    registry: Arc<session::Registry>,
    admin: Option<HttpServer>,
    stop_grpc: CancellationToken,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The agent listener's connection tasks (TLS handshakes).
    agent_connections: TaskTracker,
    events: postern_events::EventPipeline,
    telemetry: Option<HttpServer>,
    /// `/readyz`: true once serving, false from the start of a drain.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Membership of a cluster (`[cluster]`).
    cluster: Option<Arc<cluster::ClusterNode>>,
}

impl Edge {
    /// Starts serving on `listeners`.
    pub async fn start(config: EdgeConfig, listeners: Listeners) -> anyhow::Result<Edge> {
        let dev_ca = if config.tls.dev_ca {
            Some(DevCa::load_or_create(&config.data_dir).context("loading the dev CA")?)
        } else {
            None
        };
        let certs = Arc::new(CertStore::new(dev_ca));
        let cas = Arc::new(
            ca_store::CaStore::open(
                config.data_dir.clone(),
                config
                    .admin
                    .key_encryption_secret
                    .as_ref()
                    .map(Secret::expose),
            )
            .context("opening the certificate-authority store")?,
        );
        let tokens = Arc::new(Authtokens::new(config.authtokens.clone()));
        let agent_addr = listeners.agent.local_addr()?;
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(
                cluster::ClusterNode::start(cluster::Joining {
                    config: c,
                    node_id: &config.node_id,
                    region: &config.region,
                    data_dir: config.data_dir.clone(),
                    cas: cas.clone(),
                    tokens: tokens.clone(),
                    link: listeners.node_link,
                    agent_addr: c.agent_advertise.clone().or_else(|| {
                        (!agent_addr.ip().is_unspecified()).then(|| agent_addr.to_string())
                    }),
                    stream_wait: config.session.stream_wait,
                })
                .await?,
            )),
            None => None,
        };
        load_certificates(&config, &certs)?;
        let agent_key = match &config.tls.agent_cert {
            Some(paths) => agent_cert_key(paths)?,
            None => {
                let name = config.agent_ingress_name();
                let ca = certs
                    .dev_ca()
                    .context("no agent certificate and no dev CA")?;
                let (cert, key) = ca.issue_pem(&[name])?;
                certified_key_from_pem(
                    Pem::new("dev agent certificate", cert.as_bytes()),
                    Pem::new("dev agent key", key.as_bytes()),
                )?
            }
        };
        let agent_certs = cluster::AgentCerts {
            default: Arc::new(agent_key),
            ingresses: cluster.as_ref().map(|c| c.ingress_certs()),
        };
        let agent_tls = build_server_config(Arc::new(agent_certs), None, &[b"h2"]);

        let addresses = Addresses {
            agent: listeners.agent.local_addr()?,
            http: listeners
                .http
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
            https: listeners.https.local_addr()?,
            admin: listeners
                .admin
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
            metrics: listeners
                .metrics
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
        };
        let events = postern_events::EventPipeline::start(&config.events, &config.data_dir)
            .context("starting the event pipeline")?;
        let https_public_port = config.public.https_port.unwrap_or(addresses.https.port());
        let oauth = oauth::service(&config.oauth, https_public_port).context("oauth")?;
        let gateway = Gateway::new(
            GatewayConfig {
                https_public_port,
                tcp_bind_ip: config.tcp_bind_ip,
                tcp_public_host: config.public.tcp_host.clone(),
                tcp_ports: config.tcp_ports.clone(),
                random_domain_base: config.public.random_domain_base.clone(),
                default_server_name: Some(config.domain.clone()),
                client_hello_timeout: config.limits.client_hello_timeout,
                client_hello_max: config.limits.client_hello_max_bytes,
                tls_handshake_timeout: config.limits.tls_handshake_timeout,
                header_read_timeout: config.limits.header_read_timeout,
                max_connections: config.limits.max_connections,
                max_header_bytes: config.limits.max_header_bytes,
                max_headers: config.limits.max_headers,
                h2_max_concurrent_streams: config.limits.h2_max_concurrent_streams,
                h2_stream_window: config.limits.h2_stream_window,
                h2_connection_window: config.limits.h2_connection_window,
                idle_timeout: config.limits.idle_timeout,
                trusted_proxies: config.trusted_proxies.clone(),
                oauth: Some(oauth.clone()),
                rate_store: None,
            },
            certs,
            Outcomes {
                sink: events.sink(),
                region: config.region.clone(),
                node_id: config.node_id.clone(),
                account_id: None,
                metrics: Arc::default(),
            },
        );
        if let Some(http) = listeners.http {
            gateway.serve_http(http);
        }
        gateway.serve_https(listeners.https);

        let registry = session::Registry::new(
            gateway.clone(),
            tokens,
            session::RegistrySettings {
                region: config.region.clone(),
                node_id: config.node_id.clone(),
                session: config.session.clone(),
                limits: config.limits.clone(),
                endpoint_policies: config.endpoint_policies.clone(),
                cas: cas.clone(),
                oauth: oauth.clone(),
            },
        );
        if let Some(cluster) = &cluster {
            registry.attach_cluster(cluster.clone());
            cluster.follow(registry.clone(), events.runtime_handle());
        }
        // The admin and metrics listeners cut slow request heads as the
        // public side does.
        let http_timeouts = HttpTimeouts {
            header_read: config.limits.header_read_timeout,
            ..HttpTimeouts::default()
        };
        let admin = listeners.admin.map(|listener| {
            let state = admin::AdminState {
                key_hashes: config.admin.key_hashes.clone(),
                cas: cas.clone(),
                oauth: oauth.clone(),
                cluster: cluster.clone(),
                registry: registry.clone(),
            };
            let state = Arc::new(state);
            HttpServer::start("admin", listener, http_timeouts, move |req, peer| {
                admin::handle(state.clone(), req, peer)
            })
        });
        let stop_grpc = CancellationToken::new();
        let agent_connections = TaskTracker::new();
        let incoming = service::tls_incoming(
            "agent",
            listeners.agent,
            agent_tls,
            &agent_connections,
            &stop_grpc,
        );
        let svc = postern_proto::pb::tunnel_server::TunnelServer::new(service::TunnelService::new(
            registry.clone(),
        ));
        let stop = stop_grpc.clone();
        let grpc = tokio::spawn(
            service::server_builder(
                config.session.heartbeat_interval,
                config.session.heartbeat_tolerance,
            )
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        );
        tracing::info!(
            node_id = %config.node_id,
            region = %config.region,
            agent_ingress = %config.agent_ingress_name(),
            agent = %addresses.agent,
            https = %addresses.https,
            http = ?addresses.http,
            "edge node started"
        );
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let telemetry = listeners.metrics.map(|listener| {
            let state = telemetry::Telemetry {
                gateway: gateway.clone(),
                registry: registry.clone(),
                region: config.region.clone(),
                events: events.metrics_handle(),
                ready: ready.clone(),
                cluster: cluster.clone(),
            };
            let state = Arc::new(state);
            HttpServer::start("metrics", listener, http_timeouts, move |req, peer| {
                telemetry::handle(state.clone(), req, peer)
            })
        });
        Ok(Edge {
            config,
            addresses,
            gateway,
            registry,
            admin,
            stop_grpc,
            grpc,
            agent_connections,
            events,
            telemetry,
            ready,
            cluster,
        })
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// Public-side counters.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut stats = self.gateway.stats().snapshot();
        stats.push(("agent_sessions", self.registry.session_count() as u64));
        stats.push(("open_connections", self.gateway.open_connections() as u64));
        stats.extend(self.events.metrics().pairs());
        if let Some(cluster) = &self.cluster {
            stats.extend(cluster.stats());
        }
        stats
    }

    /// The endpoints bound on this node.
    pub fn endpoints(&self) -> Vec<Arc<postern_ingress::Endpoint>> {
        self.gateway.endpoints()
    }

    /// Drains: refuse new sessions and connections, let in-flight work
    /// finish within the grace period, then close agent sessions, then
    /// flush the event pipeline (bounded by `events.flush_timeout`).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!(grace = ?self.config.drain_grace, "draining");
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.registry.start_drain();
        self.gateway.drain(self.config.drain_grace).await;
        self.registry.shutdown().await;
        if let Some(admin) = self.admin {
            admin.shutdown(STOP_WAIT).await;
        }
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
        self.stop_grpc.cancel();
        self.agent_connections.close();
        let (grpc, _) = tokio::join!(
            tokio::time::timeout(STOP_WAIT, self.grpc),
            tokio::time::timeout(STOP_WAIT, self.agent_connections.wait()),
        );
        let grpc = match grpc {
            Ok(Ok(result)) => result.context("agent gRPC server"),
            Ok(Err(join)) => Err(join).context("agent gRPC server task"),
            Err(_) => {
                tracing::warn!("agent connections did not close within 5s");
                Ok(())
            }
        };
        // Last, so that the events of connections closed above are in.
        self.events.shutdown().await;
        if let Some(telemetry) = self.telemetry {
            telemetry.shutdown(STOP_WAIT).await;
        }
        grpc?;
        tracing::info!("edge node stopped");
        Ok(())
    }
}

/// Runs a node until `shutdown` resolves, then drains.
pub async fn run(
    config: EdgeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let edge = Edge::start(config, listeners).await?;
    shutdown.await;
    edge.shutdown().await
}
