//! A Postern edge node: the composition root. It loads the config, serves
//! agents over gRPC/TLS on `tunnel.<region>.connect.<domain>`, keeps the
//! registry of agent sessions, runs the public gateway, and drains on
//! shutdown. Listeners are bound by the caller and passed in, so tests can
//! run a whole node in-process on port 0.

mod acl;
mod acme;
mod admin;
mod auth;
mod ca_store;
mod cluster;
mod config;
mod dev;
mod error;
mod ngrok;
mod node_link;
mod oauth;
mod registry;
mod service;
mod ssh;
mod telemetry;

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use postern_ingress::{
    CertSource, CertStore, DevCa, Gateway, Outcomes, RateStore, RedisRates, ServingCert,
    build_server_config,
};
use postern_net::{HttpServer, HttpTimeouts, Pem, Secret, certified_key_from_pem};
use rustls::ServerConfig;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use acl::{Acl, AclError};
pub use auth::{AuthtokenRecord, Authtokens, TokenError};
pub use config::{EdgeConfig, RawConfig, expand_env};
pub use dev::{DEV_EVENTS_FILE, DevSetup, dev_config};
pub use error::{ConfigError, RunError, ShutdownError, StartError};

use cluster::ClusterNode;
use registry::{ClusterView, Registry, RegistrySettings};

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
    /// ngrok's SDKs (`listen.ngrok_agent`).
    pub ngrok_agent: Option<TcpListener>,
    /// The SSH ingress (`listen.ssh`).
    pub ssh: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in the config.
    pub async fn bind(config: &EdgeConfig) -> Result<Listeners, StartError> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
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
            ssh: match config.listen.ssh {
                Some(addr) => Some(bind(addr, "ssh").await?),
                None => None,
            },
            node_link: match config.cluster.as_ref().and_then(|c| c.rpc_listen) {
                Some(addr) => Some(bind(addr, "cluster.rpc_listen").await?),
                None => None,
            },
            ngrok_agent: match config.listen.ngrok_agent {
                Some(addr) => Some(bind(addr, "listen.ngrok_agent").await?),
                None => None,
            },
        })
    }

    /// Where they listen.
    fn addresses(&self) -> io::Result<Addresses> {
        let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
        Ok(Addresses {
            agent: self.agent.local_addr()?,
            http: addr(&self.http)?,
            https: self.https.local_addr()?,
            admin: addr(&self.admin)?,
            metrics: addr(&self.metrics)?,
            ngrok_agent: addr(&self.ngrok_agent)?,
            ssh: addr(&self.ssh)?,
        })
    }
}

/// Where a running node listens.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub agent: SocketAddr,
    pub http: Option<SocketAddr>,
    pub https: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// The ngrok agent ingress, when on.
    pub ngrok_agent: Option<SocketAddr>,
    pub ssh: Option<SocketAddr>,
}

/// A running edge node.
pub struct Edge {
    config: EdgeConfig,
    addresses: Addresses,
    gateway: Gateway,
    registry: Arc<Registry>,
    admin: Option<HttpServer>,
    stop_grpc: CancellationToken,
    grpc: JoinHandle<()>,
    /// The agent listeners' connection tasks (TLS handshakes; the ngrok
    /// SDKs' sessions and their streams).
    agent_connections: TaskTracker,
    events: postern_events::EventPipeline,
    telemetry: Option<HttpServer>,
    /// `/readyz`: true once serving, false from the start of a drain.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Membership of a cluster (`[cluster]`).
    cluster: Option<Arc<ClusterNode>>,
    /// The SSH ingress, when `listen.ssh` is set, and its host key.
    ssh: Option<(ssh::SshServer, ssh::HostKey)>,
    /// The certificate manager (`[acme]`).
    acme: Option<Arc<acme::Acme>>,
    /// SIGHUP reloads of `[[tls.certificates]]`.
    reloads: Arc<CertReloads>,
}

/// Reloads of the certificate files, by result, for `/metrics`.
#[derive(Debug, Default)]
struct CertReloads {
    done: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl Edge {
    /// Starts serving on `listeners`: the gateway, the agent listener,
    /// the admin API and telemetry, in the cluster when the config has one.
    pub async fn start(config: EdgeConfig, listeners: Listeners) -> Result<Edge, StartError> {
        let addresses = listeners.addresses().map_err(StartError::Listener)?;
        let certs = Arc::new(cert_store(&config)?);
        let cas = Arc::new(
            ca_store::CaStore::open(
                config.data_dir.clone(),
                config
                    .admin
                    .key_encryption_secret
                    .as_ref()
                    .map(Secret::expose),
            )
            .map_err(StartError::CaStore)?,
        );
        let tokens = Arc::new(Authtokens::new(config.authtokens.clone()));
        let cluster = join_cluster(
            &config,
            &cas,
            &tokens,
            &certs,
            listeners.node_link,
            addresses.agent,
        )
        .await?;
        let agent_certs = agent_certs(&config, &certs, cluster.as_deref())?;
        let events = postern_events::EventPipeline::start(&config.events, &config.data_dir)
            .map_err(StartError::Events)?;
        let https_public_port = config.public.https_port.unwrap_or(addresses.https.port());
        let redis = oauth::redis(&config.oauth)?;
        let rates = redis
            .clone()
            .filter(|_| config.rate_limits_in_redis)
            .map(|redis| Arc::new(RedisRates::new(redis)) as Arc<dyn RateStore>);
        let oauth = oauth::service(&config.oauth, redis, https_public_port);
        let gateway = Gateway::new(
            config.gateway(https_public_port, oauth.clone(), rates),
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
        let acme = match (&config.acme, &cluster) {
            (Some(acme), Some(cluster)) => {
                let acme = acme::Acme::start(
                    acme.clone(),
                    &config.data_dir,
                    gateway.certs().clone(),
                    gateway.acme_challenges().clone(),
                    cluster.clone(),
                )
                .map_err(StartError::Acme)?;
                cluster.set_acme(acme.clone());
                Some(acme)
            }
            _ => None,
        };

        let registry = Registry::new(
            gateway.clone(),
            tokens.clone(),
            RegistrySettings {
                region: config.region.clone(),
                node_id: config.node_id.clone(),
                session: config.session.clone(),
                limits: config.limits.clone(),
                endpoint_policies: config.endpoint_policies.clone(),
                cas: cas.clone(),
                oauth: oauth.clone(),
                cluster: cluster.clone().map(|c| c as Arc<dyn ClusterView>),
            },
        );
        if let Some(cluster) = &cluster {
            cluster.follow(
                registry.clone(),
                events.runtime_handle(),
                gateway.acme_challenges().clone(),
            );
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
        let ssh = listeners
            .ssh
            .map(|listener| {
                let key = match &config.ssh.host_key {
                    Some(key) => key.clone(),
                    None => ssh::HostKey::load_or_create(&config.data_dir)
                        .map_err(StartError::SshHostKey)?,
                };
                let server = ssh::SshServer::start(
                    listener,
                    key.clone(),
                    config.ssh.clone(),
                    &config.session,
                    registry.clone(),
                    tokens,
                );
                Ok::<_, StartError>((server, key))
            })
            .transpose()?;
        let stop_grpc = CancellationToken::new();
        let agent_connections = TaskTracker::new();
        let grpc = serve_agents(
            &config,
            listeners.agent,
            build_server_config(agent_certs.clone(), None, &[b"h2"]),
            registry.clone(),
            &agent_connections,
            stop_grpc.clone(),
        );
        if let Some(listener) = listeners.ngrok_agent {
            // ngrok's SDKs offer no ALPN.
            ngrok::serve(
                listener,
                build_server_config(agent_certs, None, &[]),
                registry.clone(),
                &agent_connections,
                stop_grpc.clone(),
            );
        }
        tracing::info!(
            node_id = %config.node_id,
            region = %config.region,
            agent_ingress = %config.agent_ingress_name(),
            agent = %addresses.agent,
            ngrok_agent = ?addresses.ngrok_agent,
            https = %addresses.https,
            http = ?addresses.http,
            ssh = ?addresses.ssh,
            "edge node started"
        );
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reloads = Arc::new(CertReloads::default());
        let telemetry = listeners.metrics.map(|listener| {
            let state = telemetry::Telemetry {
                gateway: gateway.clone(),
                registry: registry.clone(),
                region: config.region.clone(),
                events: events.metrics_handle(),
                ready: ready.clone(),
                cluster: cluster.clone(),
                acme: acme.clone(),
                reloads: reloads.clone(),
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
            ssh,
            acme,
            reloads,
        })
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// The SSH ingress's host key as a `known_hosts` key (`ssh-ed25519
    /// AAAA…`) and its fingerprint, when the ingress is on.
    pub fn ssh_host_key(&self) -> Option<(String, String)> {
        let (_, key) = self.ssh.as_ref()?;
        Some((key.public_openssh(), key.fingerprint()))
    }

    /// Public-side counters.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut stats = self.gateway.metrics().counters();
        stats.push(("agent_sessions", self.registry.session_count() as u64));
        stats.push(("agent_connections", self.registry.connection_count() as u64));
        stats.push(("open_connections", self.gateway.open_connections() as u64));
        stats.extend(self.events.metrics().pairs());
        if let Some(cluster) = &self.cluster {
            stats.extend(cluster.stats());
        }
        if let Some(acme) = &self.acme {
            stats.extend(acme.stats());
        }
        stats
    }

    /// Reads the `[[tls.certificates]]` files again (SIGHUP) and serves
    /// them to new handshakes; open connections keep theirs. All or
    /// nothing: when one pair cannot be used, the error names its file and
    /// the certificates served stay as they were. Returns how many pairs
    /// were loaded.
    pub fn reload_certificates(&self) -> Result<usize, ConfigError> {
        use std::sync::atomic::Ordering::Relaxed;
        let loaded = self
            .config
            .tls
            .certificates
            .iter()
            .map(|(files, _)| Ok((files.cert.display().to_string(), files.load()?)))
            .collect::<Result<Vec<_>, ConfigError>>()
            .inspect_err(|_| {
                self.reloads.failed.fetch_add(1, Relaxed);
            })?;
        self.reloads.done.fetch_add(1, Relaxed);
        let count = loaded.len();
        serve_config_certificates(self.gateway.certs(), loaded);
        Ok(count)
    }

    /// The endpoints bound on this node.
    pub fn endpoints(&self) -> Vec<Arc<postern_ingress::Endpoint>> {
        self.gateway.endpoints()
    }

    /// Drains: refuse new sessions and connections, let in-flight work
    /// finish within the grace period, then close agent sessions, then
    /// flush the event pipeline (bounded by `events.flush_timeout`).
    pub async fn shutdown(self) -> Result<Drained, ShutdownError> {
        tracing::info!(grace = ?self.config.drain_grace, "draining");
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.registry.start_drain();
        let within_grace = self.gateway.drain(self.config.drain_grace).await;
        self.registry.shutdown().await;
        if let Some((ssh, _)) = self.ssh {
            ssh.shutdown(STOP_WAIT).await;
        }
        if let Some(admin) = self.admin {
            admin.shutdown(STOP_WAIT).await;
        }
        if let Some(acme) = &self.acme {
            acme.shutdown().await;
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
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => Err(ShutdownError::GrpcTask(join)),
            Err(_) => {
                tracing::warn!("agent connections did not close within 5s");
                Ok(())
            }
        };
        self.registry.cut_connections().await;
        // Last, so that the events of connections closed above are in.
        self.events.shutdown().await;
        if let Some(telemetry) = self.telemetry {
            telemetry.shutdown(STOP_WAIT).await;
        }
        grpc?;
        tracing::info!("edge node stopped");
        Ok(Drained { within_grace })
    }
}

/// How a drain went.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// Every visitor connection and the work it started ended within
    /// `drain_grace`; false when the rest were cut.
    pub within_grace: bool,
}

/// Runs a node until `shutdown` resolves, then drains.
pub async fn run(
    config: EdgeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let edge = Edge::start(config, listeners).await?;
    shutdown.await;
    edge.shutdown().await?;
    Ok(())
}

/// The gateway's certificates: the configured ones, and the dev CA's when
/// `tls.dev_ca` is on.
fn cert_store(config: &EdgeConfig) -> Result<CertStore, StartError> {
    let dev_ca = if config.tls.dev_ca {
        Some(DevCa::load_or_create(&config.data_dir).map_err(StartError::DevCa)?)
    } else {
        None
    };
    let certs = CertStore::new(dev_ca);
    let loaded = config
        .tls
        .certificates
        .iter()
        .map(|(files, cert)| (files.cert.display().to_string(), cert.clone()))
        .collect();
    serve_config_certificates(&certs, loaded);
    Ok(certs)
}

/// Serves `[[tls.certificates]]` (by certificate file) instead of those
/// served so far.
fn serve_config_certificates(certs: &CertStore, loaded: Vec<(String, ServingCert)>) {
    for (file, cert) in &loaded {
        let names: Vec<String> = cert.names.iter().map(|n| n.to_string()).collect();
        tracing::info!(cert = %file, ?names, "certificate loaded");
    }
    certs.replace(CertSource::Config, loaded);
}

/// Joins the cluster of `[cluster]`, if any, which then keeps the CAs,
/// the credentials and the uploaded certificates; `agent_addr` is where
/// the agent listener listens.
async fn join_cluster(
    config: &EdgeConfig,
    cas: &Arc<ca_store::CaStore>,
    tokens: &Arc<Authtokens>,
    certs: &Arc<CertStore>,
    link: Option<TcpListener>,
    agent_addr: SocketAddr,
) -> Result<Option<Arc<ClusterNode>>, StartError> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    let node = ClusterNode::start(cluster::Joining {
        config: c,
        node_id: &config.node_id,
        region: &config.region,
        data_dir: config.data_dir.clone(),
        cas: cas.clone(),
        tokens: tokens.clone(),
        certs: certs.clone(),
        link,
        agent_addr: c
            .agent_advertise
            .clone()
            .or_else(|| (!agent_addr.ip().is_unspecified()).then(|| agent_addr.to_string())),
        stream_wait: config.session.stream_wait,
    })
    .await
    .map_err(StartError::Cluster)?;
    Ok(Some(Arc::new(node)))
}

/// The agent listeners' certificates: the configured agent certificate
/// (or one from the dev CA, which also names loopback, so that an SDK can
/// be pointed at `127.0.0.1`), and the agent ingresses' certificates in a
/// cluster.
fn agent_certs(
    config: &EdgeConfig,
    certs: &CertStore,
    cluster: Option<&ClusterNode>,
) -> Result<Arc<cluster::AgentCerts>, StartError> {
    let default = match &config.tls.agent_key {
        Some(key) => key.clone(),
        None => {
            let name = config.agent_ingress_name();
            let ca = certs.dev_ca().ok_or(StartError::NoAgentCertificate)?;
            let names = [name, "localhost".into(), "127.0.0.1".into(), "::1".into()];
            let (cert, key) = ca.issue_pem(&names).map_err(StartError::AgentCertificate)?;
            Arc::new(
                certified_key_from_pem(
                    Pem::new("dev agent certificate", cert.as_bytes()),
                    Pem::new("dev agent key", key.as_bytes()),
                )
                .map_err(StartError::AgentCertificate)?,
            )
        }
    };
    Ok(Arc::new(cluster::AgentCerts {
        default,
        ingresses: cluster.map(|c| c.ingress_certs()),
    }))
}

/// Serves agents on `listener` (gRPC over TLS, the connections' tasks on
/// `connections`) until `stop`: data streams spoken with `h2` directly
/// (`postern_proto::direct`: a connection's task polls its streams'
/// outgoing frames), the control stream by tonic.
fn serve_agents(
    config: &EdgeConfig,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    registry: Arc<Registry>,
    connections: &TaskTracker,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let incoming = service::tls_incoming("agent", listener, tls, connections, &stop, false);
    let service = service::TunnelService::new(registry);
    let control = tonic::service::Routes::new(postern_proto::pb::tunnel_server::TunnelServer::new(
        service.clone(),
    ));
    let settings = postern_proto::direct::ServerSettings {
        heartbeat: config.session.heartbeat_interval,
        tolerance: config.session.heartbeat_tolerance,
        max_header_list_size: service::MAX_HEADER_LIST_SIZE,
    };
    service::serve_direct(
        "agent",
        incoming,
        settings,
        connections,
        stop,
        service,
        control,
    )
}
