//! The edge's configuration, in two stages: [`RawConfig`] is what the TOML
//! file says (unknown keys refused, every field documented), [`EdgeConfig`]
//! is the validated form that cannot hold a bad value.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use postern_ingress::{GatewayConfig, OAuthService, RateStore, ServingCert, normalize_name};
use postern_net::{
    MAX_CAS, Pem, Secret, TrustedProxies, certified_key_from_pem, parse_cidr, random_label,
};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

use crate::{
    acl::Acl,
    auth::AuthtokenRecord,
    error::{ConfigError, invalid},
    ssh::HostKey,
};

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This node's name, unique in the cluster. Default: a random `edge-…`.
    pub node_id: Option<String>,
    /// Region code (`us`, `eu`, `ap`, …). Default `us`.
    pub region: Option<String>,
    /// Base domain: agents connect to `tunnel.<region>.connect.<domain>`.
    pub domain: String,
    /// Where the node keeps state (dev CA, …). Default `./postern-data`.
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub public: RawPublic,
    #[serde(default)]
    pub tcp: RawTcp,
    #[serde(default)]
    pub tls: RawTls,
    /// Agent authtokens and their ACLs.
    #[serde(default)]
    pub authtokens: Vec<RawAuthtoken>,
    #[serde(default)]
    pub session: RawSession,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub trusted_proxies: RawTrustedProxies,
    /// Edge-side settings for endpoints by domain, applied whatever the agent asks.
    #[serde(default)]
    pub endpoint_policies: Vec<RawEndpointPolicy>,
    /// How long SIGTERM waits for in-flight work. Default `30s`.
    pub drain_grace: Option<String>,
    /// Trace export over OTLP (`otlp_endpoint`, `service_name`,
    /// `sample_ratio`); unset keys fall back to the `OTEL_*` variables.
    #[serde(default)]
    pub telemetry: postern_telemetry::RawTraceSettings,
    /// Event subscriptions (`[[events.subscriptions]]`), the flush timeout
    /// and the pipeline's limits; see `postern_events::RawEventsConfig`.
    #[serde(default)]
    pub events: postern_events::RawEventsConfig,
    /// OAuth/OIDC: the callback host, the session store (Redis) and its
    /// key; see `crate::oauth::RawOAuth`.
    #[serde(default)]
    pub oauth: crate::oauth::RawOAuth,
    /// Where Traffic Policy `rate-limit` counts live.
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    /// Joining other nodes: gossip, seeds, the cluster key; see
    /// `crate::cluster::RawCluster`. Without it the node runs alone.
    pub cluster: Option<crate::cluster::RawCluster>,
    /// Agentless tunnels over SSH.
    #[serde(default)]
    pub ssh: RawSsh,
    /// Certificates ordered from an ACME CA (Let's Encrypt by default) for
    /// reserved domains with a `certificate_management_policy`; see
    /// `crate::acme::RawAcme`. Needs `[cluster]`, where reserved domains
    /// live.
    pub acme: Option<crate::acme::RawAcme>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Bearer API keys accepted by the admin API.
    #[serde(default)]
    pub api_keys: Vec<Secret>,
    /// The same as SHA-256 hex digests, so the file holds no secret.
    #[serde(default)]
    pub api_key_sha256s: Vec<String>,
    /// Secret that encrypts private keys stored with CAs (AES-256-GCM with
    /// its SHA-256 as the key). Without it, private keys are refused.
    pub key_encryption_secret: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointPolicy {
    /// `app.example.com` or `*.example.com`: endpoints bound on this
    /// pattern, or on names under it.
    pub domain: String,
    /// Ids of CAs in the certificate-authority store that client
    /// certificates must chain to.
    #[serde(default)]
    pub mutual_tls_cas: Vec<String>,
    /// A Traffic Policy document (YAML or JSON text) run before the
    /// agent's on these endpoints; the agent cannot change it.
    pub traffic_policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// `"memory"` (default): each node counts alone. `"redis"`: counts in
    /// the Redis of `[oauth]` (`redis_url` or `redis_cluster`), shared by
    /// every node using it.
    pub store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// Agent listener (gRPC over TLS). Default `0.0.0.0:4443`.
    pub agent: Option<String>,
    /// Public plain HTTP. Default `0.0.0.0:80`; `""` turns it off.
    pub http: Option<String>,
    /// Public HTTPS and TLS endpoints. Default `0.0.0.0:443`.
    pub https: Option<String>,
    /// Admin API. Default `127.0.0.1:9090`; `""` turns it off.
    pub admin: Option<String>,
    /// `/metrics`, `/healthz` and `/readyz`. Default `127.0.0.1:9100`; `""` turns it off.
    pub metrics: Option<String>,
    /// The second agent ingress, for ngrok's SDKs (ngrok's agent protocol
    /// over TLS, with the agent certificate). Off unless set.
    pub ngrok_agent: Option<String>,
    /// The SSH ingress (`ssh -R`, see `[ssh]`). Off unless set, e.g. `"0.0.0.0:22"`.
    pub ssh: Option<String>,
}

/// `[ssh]`: agentless tunnels over `ssh -R` (on when `listen.ssh` is set).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    /// The host key, an OpenSSH private key file (Ed25519 or ECDSA).
    /// Default: `<data_dir>/ssh_host_ed25519_key`, generated on the first
    /// start and kept, so clients' `known_hosts` stay valid.
    pub host_key: Option<PathBuf>,
    /// `-R` forwards one SSH session may hold, each one endpoint. Default 1
    /// (ngrok's); at most `limits.endpoints_per_session`.
    pub forwards_per_session: Option<usize>,
    /// How long a client has from connecting to being logged in and giving
    /// its command.
    /// Default `"30s"`.
    pub login_grace: Option<String>,
    /// Whether a client may log in with an authtoken as its SSH user name
    /// (`ssh -R … <authtoken>@<edge> http`) besides a public key registered
    /// through `/ssh_credentials`. Default `true`, as ngrok; `false`
    /// leaves public keys only.
    pub allow_authtoken_user: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublic {
    /// HTTPS port shown in URLs. Default: the HTTPS listener's port.
    pub https_port: Option<u16>,
    /// Host shown in `tcp://` URLs. Default: the base domain.
    pub tcp_host: Option<String>,
    /// Base for random endpoint names (binds without a domain). Default: none,
    /// so agents must name a domain.
    pub random_domain_base: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcp {
    /// Address TCP endpoints listen on. Default `0.0.0.0`.
    pub bind_ip: Option<String>,
    /// Port range, `"20000-29999"` (the default).
    pub ports: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Issue certificates from a local dev CA (kept in `data_dir`) for names
    /// no configured certificate covers, including the agent ingress name.
    #[serde(default)]
    pub dev_ca: bool,
    /// Certificate and key for `tunnel.<region>.connect.<domain>`.
    pub agent_cert: Option<PathBuf>,
    pub agent_key: Option<PathBuf>,
    /// Certificates for public names; the names come from their DNS SANs.
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
}

/// A certificate chain file and its key file (`[[tls.certificates]]`),
/// read at start-up and again on SIGHUP.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RawCertificate {
    /// Reads and checks the pair.
    pub fn load(&self) -> Result<ServingCert, ConfigError> {
        let (cert_name, key_name) = (
            self.cert.display().to_string(),
            self.key.display().to_string(),
        );
        Ok(ServingCert::from_pem(
            Pem::new(&cert_name, &read(&self.cert)?),
            Pem::new(&key_name, &read(&self.key)?),
        )?)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthtoken {
    /// The token itself, or
    pub token: Option<Secret>,
    /// its SHA-256 in hex, so the file holds no secret.
    pub token_sha256: Option<String>,
    /// ngrok ACL rules: `bind:app.example.com`, `bind:*.example.com`,
    /// `bind:*`, `bind:*:20000` (TCP port). Empty: unrestricted.
    #[serde(default)]
    pub acl: Vec<String>,
    /// Free text, shown in logs.
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSession {
    /// Heartbeat interval. Default `10s` (ngrok's).
    pub heartbeat_interval: Option<String>,
    /// A peer silent this long is dead. Default `15s` (ngrok's).
    pub heartbeat_tolerance: Option<String>,
    /// How long a visitor waits for the agent to open a data stream. Default `10s`.
    pub stream_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Endpoints one agent session may bind. Default 100.
    pub endpoints_per_session: Option<usize>,
    /// Simultaneous sessions per authtoken. Default 100.
    pub sessions_per_token: Option<usize>,
    /// Idle data streams an agent may keep parked. Default 16.
    pub stream_pool: Option<u32>,
    /// Proxied connections one agent session may carry at once. Default 10000.
    pub streams_per_session: Option<usize>,
    /// The rate of an agent's control budget, messages per second: over
    /// it, binds and unbinds are refused one by one (`ERR_POSTERN_9013`),
    /// and an agent that goes on a whole burst beyond it is cut off
    /// (`ERR_POSTERN_9008`). Default 100.
    pub control_messages_per_second: Option<u32>,
    /// The burst of that budget: messages an agent may send at once.
    /// Default `endpoints_per_session` + 20, so a full rebind plus
    /// heartbeats fits.
    pub control_burst: Option<u32>,
    /// Visitor connections open at once across the node. Default 20000.
    pub max_connections: Option<usize>,
    /// Time to receive a whole ClientHello. Default `10s`.
    pub client_hello_timeout: Option<String>,
    /// Largest ClientHello, bytes. Default 65536.
    pub client_hello_max_bytes: Option<usize>,
    /// Time for a TLS handshake once routed. Default `10s`.
    pub tls_handshake_timeout: Option<String>,
    /// Time to receive HTTP/1 request headers (slowloris), on the public,
    /// admin and metrics listeners. Default `30s`.
    pub header_read_timeout: Option<String>,
    /// Largest request head, bytes (431 past it). Default 61440.
    pub max_header_bytes: Option<usize>,
    /// Most request headers (431 past it). Default 100.
    pub max_headers: Option<usize>,
    /// Close TCP/TLS endpoint connections idle this long. Default `1h`.
    pub idle_timeout: Option<String>,
    /// HTTP/2 concurrent streams per visitor connection. Default 100.
    pub h2_max_concurrent_streams: Option<u32>,
    /// HTTP/2 stream window, bytes. Default 65536.
    pub h2_stream_window: Option<u32>,
    /// HTTP/2 connection window, bytes. Default 1048576.
    pub h2_connection_window: Option<u32>,
}

/// Load balancers in front of the edge whose word about the client address
/// is taken. Nobody else's is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustedProxies {
    /// Addresses of the load balancers.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// They send a PROXY protocol header (v1 or v2) first.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Their `X-Forwarded-For` names the client (HTTP).
    #[serde(default)]
    pub forwarded_for: bool,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    pub node_id: String,
    pub region: String,
    pub domain: String,
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub public: Public,
    pub tcp_bind_ip: IpAddr,
    pub tcp_ports: RangeInclusive<u16>,
    pub tls: Tls,
    pub authtokens: Vec<AuthtokenRecord>,
    pub session: SessionSettings,
    pub limits: Limits,
    pub trusted_proxies: TrustedProxies,
    pub admin: Admin,
    pub endpoint_policies: Vec<EndpointPolicy>,
    pub drain_grace: Duration,
    pub telemetry: postern_telemetry::TraceSettings,
    pub events: postern_events::EventsConfig,
    pub oauth: crate::oauth::OAuthConfig,
    /// `rate_limit.store = "redis"`: rate-limit counts in `[oauth]`'s Redis.
    pub rate_limits_in_redis: bool,
    pub cluster: Option<crate::cluster::ClusterConfig>,
    pub ssh: SshSettings,
    pub acme: Option<crate::acme::AcmeConfig>,
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub agent: SocketAddr,
    pub http: Option<SocketAddr>,
    pub https: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub ngrok_agent: Option<SocketAddr>,
    pub ssh: Option<SocketAddr>,
}

/// `[ssh]`, validated.
#[derive(Clone, Debug)]
pub struct SshSettings {
    /// The configured host key, loaded; `None`: the data directory's.
    pub host_key: Option<HostKey>,
    pub forwards_per_session: usize,
    pub login_grace: Duration,
    pub allow_authtoken_user: bool,
}

impl RawSsh {
    fn validate(self, limits: &Limits) -> Result<SshSettings, ConfigError> {
        let host_key = self
            .host_key
            .map(|path| {
                HostKey::read(&path).map_err(|e| invalid!("ssh.host_key: {}: {e}", path.display()))
            })
            .transpose()?;
        let forwards_per_session = self.forwards_per_session.unwrap_or(1);
        if forwards_per_session == 0 || forwards_per_session > limits.endpoints_per_session {
            return Err(invalid!(
                "ssh.forwards_per_session: {forwards_per_session} must be 1 to limits.endpoints_per_session ({})",
                limits.endpoints_per_session
            ));
        }
        Ok(SshSettings {
            host_key,
            forwards_per_session,
            login_grace: duration(
                "ssh.login_grace",
                &self.login_grace,
                Duration::from_secs(30),
            )?,
            allow_authtoken_user: self.allow_authtoken_user.unwrap_or(true),
        })
    }
}

#[derive(Clone)]
pub struct Admin {
    pub key_hashes: Vec<[u8; 32]>,
    pub key_encryption_secret: Option<Secret>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("api_keys", &self.key_hashes.len())
            .field("key_encryption_secret", &self.key_encryption_secret)
            .finish()
    }
}

/// What the edge requires of the endpoints on a domain, whatever their
/// agents ask: from `[[endpoint_policies]]` or the cluster's
/// `/endpoint_policies`.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointPolicy {
    pub domain: postern_ingress::DomainPattern,
    pub mutual_tls_cas: Vec<String>,
    /// The operator's Traffic Policy document, as written.
    pub traffic_policy: Option<String>,
}

/// What the endpoint policies covering a domain require of its endpoints:
/// the CAs (sorted) and the operator's Traffic Policy documents, broadest
/// pattern first. An endpoint is built again when this changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Required {
    pub mutual_tls_cas: Vec<String>,
    pub traffic_policies: Vec<String>,
}

impl EndpointPolicy {
    /// Checks a policy as written; an error names the field.
    pub fn parse(
        domain: &str,
        mutual_tls_cas: Vec<String>,
        traffic_policy: Option<String>,
    ) -> Result<EndpointPolicy, (&'static str, String)> {
        if let Some(text) = &traffic_policy {
            postern_ingress::PolicyDocument::parse(text).map_err(|e| {
                (
                    "traffic_policy",
                    format!("not a Traffic Policy document: {e}"),
                )
            })?;
        }
        let domain = postern_ingress::DomainPattern::parse(domain)
            .map_err(|e| ("domain", format!("{domain:?}: {e:#}")))?;
        if mutual_tls_cas.len() > MAX_CAS {
            return Err(("mutual_tls_cas", format!("at most {MAX_CAS} CAs")));
        }
        if let Some(bad) = mutual_tls_cas.iter().find(|id| !id.starts_with("ca_")) {
            return Err(("mutual_tls_cas", format!("{bad:?} is not a CA id (ca_…)")));
        }
        Ok(EndpointPolicy {
            domain,
            mutual_tls_cas,
            traffic_policy,
        })
    }

    /// What the policies require of endpoints on `domain`.
    pub fn required<'a>(
        policies: impl IntoIterator<Item = &'a EndpointPolicy>,
        domain: &postern_ingress::DomainPattern,
    ) -> Required {
        let mut covering: Vec<&EndpointPolicy> = policies
            .into_iter()
            .filter(|p| p.domain.covers(domain))
            .collect();
        // A `*.` pattern covers more than an exact name: it runs first.
        covering.sort_by_key(|p| !matches!(p.domain, postern_ingress::DomainPattern::Wildcard(_)));
        let mut mutual_tls_cas: Vec<String> = covering
            .iter()
            .flat_map(|p| p.mutual_tls_cas.iter().cloned())
            .collect();
        mutual_tls_cas.sort();
        mutual_tls_cas.dedup();
        Required {
            mutual_tls_cas,
            traffic_policies: covering
                .iter()
                .filter_map(|p| p.traffic_policy.clone())
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Public {
    pub https_port: Option<u16>,
    pub tcp_host: String,
    pub random_domain_base: Option<String>,
}

/// `[tls]`, with its certificates loaded.
#[derive(Clone, Debug)]
pub struct Tls {
    pub dev_ca: bool,
    /// The agent listener's certificate (`tls.agent_cert`, `tls.agent_key`);
    /// without it the dev CA issues one.
    pub agent_key: Option<Arc<CertifiedKey>>,
    /// Certificates for public names (`tls.certificates`), each with its
    /// files.
    pub certificates: Vec<(RawCertificate, ServingCert)>,
}

#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub heartbeat_interval: Duration,
    pub heartbeat_tolerance: Duration,
    pub stream_wait: Duration,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub endpoints_per_session: usize,
    pub sessions_per_token: usize,
    pub stream_pool: u32,
    pub streams_per_session: usize,
    pub control_messages_per_second: u32,
    pub control_burst: u32,
    pub max_connections: usize,
    pub client_hello_timeout: Duration,
    pub client_hello_max_bytes: usize,
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
}

impl EdgeConfig {
    /// The agent ingress name this node serves.
    pub fn agent_ingress_name(&self) -> String {
        format!("tunnel.{}.connect.{}", self.region, self.domain)
    }

    /// Reads and validates a TOML file; `${NAME}` in it is replaced by the
    /// environment variable `NAME` first (see [`expand_env`]).
    pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        expand_env(&text, |name| std::env::var(name).ok())
            .and_then(|text| Self::from_toml(&text))
            .map_err(|source| ConfigError::In {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Validates a config given as TOML text.
    pub fn from_toml(text: &str) -> Result<EdgeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(ConfigError::Syntax)?;
        raw.validate()
    }

    /// The gateway's settings: public ports and names, the limits on
    /// visitors' connections, trusted proxies, OAuth.
    pub(crate) fn gateway(
        &self,
        https_public_port: u16,
        oauth: Arc<OAuthService>,
        rate_store: Option<Arc<dyn RateStore>>,
    ) -> GatewayConfig {
        let limits = &self.limits;
        GatewayConfig {
            https_public_port,
            tcp_bind_ip: self.tcp_bind_ip,
            tcp_public_host: self.public.tcp_host.clone(),
            tcp_ports: self.tcp_ports.clone(),
            random_domain_base: self.public.random_domain_base.clone(),
            default_server_name: Some(self.domain.clone()),
            client_hello_timeout: limits.client_hello_timeout,
            client_hello_max: limits.client_hello_max_bytes,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            header_read_timeout: limits.header_read_timeout,
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            h2_max_concurrent_streams: limits.h2_max_concurrent_streams,
            h2_stream_window: limits.h2_stream_window,
            h2_connection_window: limits.h2_connection_window,
            idle_timeout: limits.idle_timeout,
            trusted_proxies: self.trusted_proxies.clone(),
            oauth: Some(oauth),
            rate_store,
        }
    }
}

/// Replaces every `${NAME}` (letters, digits, `_`) in a config file with
/// `var(NAME)`, so that one file serves every pod of a StatefulSet
/// (`node_id = "${POD_NAME}"`, `gossip_advertise = "${POD_IP}:7946"`).
/// `$${` stands for a literal `${`. An unset variable is an error naming
/// it and its line; nothing else is touched.
pub fn expand_env(text: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let expand = |reason: String| ConfigError::Expand {
            line: n + 1,
            reason,
        };
        let mut rest = line;
        while let Some(at) = rest.find("${") {
            if rest[..at].ends_with('$') {
                out.push_str(&rest[..at]);
                out.push('{');
                rest = &rest[at + 2..];
                continue;
            }
            out.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| expand("`${` without a closing `}`".into()))?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(expand(format!("${{{name}}} is not a variable name")));
            }
            let value = var(name).ok_or_else(|| expand(format!("${{{name}}} is not set")))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// `value` as a duration (`"300ms"`, `"10s"`, `"7d"`), or `default`.
pub(crate) fn duration(
    field: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|e| {
            ConfigError::field(format!("{field}: {v:?} is not a duration like \"10s\""), e)
        }),
    }
}

fn socket_addr(
    field: &str,
    value: &Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let v = value.as_deref().unwrap_or(default);
    v.parse().map_err(|e| {
        ConfigError::field(
            format!("{field}: {v:?} is not an address like \"0.0.0.0:443\""),
            e,
        )
    })
}

fn port_range(field: &str, value: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let parse = |s: &str| s.trim().parse::<u16>();
    let range = match value.split_once('-') {
        Some((a, b)) => parse(a).and_then(|a| parse(b).map(|b| a..=b)),
        None => parse(value).map(|p| p..=p),
    }
    .map_err(|e| {
        ConfigError::field(
            format!("{field}: {value:?} is not a port range like \"20000-29999\""),
            e,
        )
    })?;
    if range.is_empty() || *range.start() == 0 {
        return Err(invalid!(
            "{field}: {value:?} is an empty range or includes port 0"
        ));
    }
    Ok(range)
}

impl RawConfig {
    /// Checks every field and loads the certificates the config names; an
    /// error names the field.
    pub fn validate(self) -> Result<EdgeConfig, ConfigError> {
        let domain = normalize_name(&self.domain)
            .map_err(|e| ConfigError::field(format!("domain: {:?}", self.domain), e))?;
        let region = region(self.region)?;
        let node_id = self
            .node_id
            .unwrap_or_else(|| format!("edge-{}", random_label()));
        let listen = self.listen.validate()?;
        let admin = self.admin.validate()?;
        let endpoint_policies = endpoint_policies(self.endpoint_policies)?;
        let public = self.public.validate(&domain)?;
        let (tcp_bind_ip, tcp_ports) = self.tcp.validate()?;
        let tls = self.tls.validate()?;
        let authtokens = authtokens(self.authtokens)?;
        let session = self.session.validate()?;
        let oauth = self.oauth.validate(&domain)?;
        let rate_limits_in_redis = match self.rate_limit.store.as_deref() {
            None | Some("memory") => false,
            Some("redis") if matches!(oauth.store, crate::oauth::StoreConfig::Redis(_)) => true,
            Some("redis") => {
                return Err(invalid!(
                    "rate_limit.store: \"redis\" counts in the Redis of [oauth], and neither oauth.redis_url nor oauth.redis_cluster is set"
                ));
            }
            Some(other) => {
                return Err(invalid!(
                    "rate_limit.store: {other:?}; the stores are \"memory\" and \"redis\""
                ));
            }
        };
        let limits = self.limits.validate()?;
        let ssh = self.ssh.validate(&limits)?;
        let trusted_proxies = self.trusted_proxies.validate()?;
        if self.acme.is_some() && self.cluster.is_none() {
            return Err(invalid!(
                "acme: certificates are ordered for reserved domains, which live in the cluster: add a [cluster] table (one node may be a cluster of one)"
            ));
        }
        let acme = self.acme.map(|a| a.validate()).transpose()?;
        if let Some(acme) = &acme
            && acme.challenge == crate::acme::Challenge::Http01
            && listen.http.is_none()
        {
            return Err(invalid!(
                "acme.challenge: \"http-01\" (the default) is answered on the plain-HTTP listener, and listen.http is \"\" (off); turn it on, or set acme.challenge = \"tls-alpn-01\" to prove names on the HTTPS listener"
            ));
        }
        Ok(EdgeConfig {
            node_id,
            region,
            public,
            domain,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("postern-data")),
            listen,
            tcp_bind_ip,
            tcp_ports,
            tls,
            authtokens,
            session,
            limits,
            trusted_proxies,
            admin,
            endpoint_policies,
            drain_grace: duration("drain_grace", &self.drain_grace, Duration::from_secs(30))?,
            telemetry: self.telemetry.validate().map_err(ConfigError::Telemetry)?,
            events: self.events.validate()?,
            oauth,
            rate_limits_in_redis,
            cluster: self.cluster.map(|c| c.validate()).transpose()?,
            ssh,
            acme,
        })
    }
}

/// `region`: one lower-case DNS label, `us` by default.
fn region(region: Option<String>) -> Result<String, ConfigError> {
    let region = region.unwrap_or_else(|| "us".into());
    normalize_name(&region)
        .ok()
        .filter(|r| !r.contains('.') && *r == region)
        .ok_or_else(|| {
            invalid!("region: {region:?} must be one lower-case DNS label such as \"us\"")
        })?;
    Ok(region)
}

/// A listener that `""` turns off.
fn optional_addr(
    field: &str,
    value: &Option<String>,
    default: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    match value.as_deref() {
        Some("") => Ok(None),
        _ => socket_addr(field, value, default).map(Some),
    }
}

impl RawListen {
    fn validate(&self) -> Result<Listen, ConfigError> {
        let http = optional_addr("listen.http", &self.http, "0.0.0.0:80")?;
        let metrics = optional_addr("listen.metrics", &self.metrics, "127.0.0.1:9100")?;
        let admin = optional_addr("listen.admin", &self.admin, "127.0.0.1:9090")?;
        Ok(Listen {
            agent: socket_addr("listen.agent", &self.agent, "0.0.0.0:4443")?,
            http,
            https: socket_addr("listen.https", &self.https, "0.0.0.0:443")?,
            admin,
            metrics,
            ngrok_agent: match &self.ngrok_agent {
                None => None,
                Some(_) => Some(socket_addr("listen.ngrok_agent", &self.ngrok_agent, "")?),
            },
            ssh: match &self.ssh {
                None => None,
                Some(_) => optional_addr("listen.ssh", &self.ssh, "")?,
            },
        })
    }
}

impl RawAdmin {
    fn validate(self) -> Result<Admin, ConfigError> {
        let mut key_hashes = Vec::new();
        for (i, key) in self.api_keys.iter().enumerate() {
            if key.expose().len() < 16 {
                return Err(invalid!(
                    "admin.api_keys[{i}]: an API key must be at least 16 characters"
                ));
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, key.expose().as_bytes());
            key_hashes.push(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"));
        }
        for (i, hash) in self.api_key_sha256s.iter().enumerate() {
            let bytes = hex::decode(hash.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    invalid!("admin.api_key_sha256s[{i}]: expected 64 hex characters")
                })?;
            key_hashes.push(bytes);
        }
        Ok(Admin {
            key_hashes,
            key_encryption_secret: self.key_encryption_secret,
        })
    }
}

fn endpoint_policies(raw: Vec<RawEndpointPolicy>) -> Result<Vec<EndpointPolicy>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, policy)| {
            EndpointPolicy::parse(&policy.domain, policy.mutual_tls_cas, policy.traffic_policy)
                .map_err(|(field, reason)| invalid!("endpoint_policies[{i}].{field}: {reason}"))
        })
        .collect()
}

impl RawPublic {
    fn validate(self, domain: &str) -> Result<Public, ConfigError> {
        let random_domain_base = self
            .random_domain_base
            .map(|b| {
                normalize_name(&b)
                    .map_err(|e| ConfigError::field(format!("public.random_domain_base: {b:?}"), e))
            })
            .transpose()?;
        Ok(Public {
            https_port: self.https_port,
            tcp_host: self.tcp_host.unwrap_or_else(|| domain.to_string()),
            random_domain_base,
        })
    }
}

impl RawTcp {
    /// The address and port range of TCP endpoints.
    fn validate(&self) -> Result<(IpAddr, RangeInclusive<u16>), ConfigError> {
        let bind_ip = match &self.bind_ip {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(ip) => ip.parse().map_err(|e| {
                ConfigError::field(format!("tcp.bind_ip: {ip:?} is not an IP address"), e)
            })?,
        };
        let ports = port_range("tcp.ports", self.ports.as_deref().unwrap_or("20000-29999"))?;
        Ok((bind_ip, ports))
    }
}

/// A file the config names.
fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::File {
        path: path.to_path_buf(),
        source,
    })
}

impl RawTls {
    /// Checks the settings and loads the certificates and keys.
    fn validate(self) -> Result<Tls, ConfigError> {
        let agent_files = match (self.agent_cert, self.agent_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(invalid!(
                    "tls.agent_cert and tls.agent_key must be given together"
                ));
            }
        };
        if agent_files.is_none() && !self.dev_ca {
            return Err(invalid!(
                "tls.agent_cert/tls.agent_key are required unless tls.dev_ca = true"
            ));
        }
        let mut certificates = Vec::new();
        for files in self.certificates {
            let serving = files.load()?;
            certificates.push((files, serving));
        }
        let agent_key = match agent_files {
            Some((cert, key)) => Some(Arc::new(certified_key_from_pem(
                Pem::new(&format!("tls.agent_cert {}", cert.display()), &read(&cert)?),
                Pem::new(&format!("tls.agent_key {}", key.display()), &read(&key)?),
            )?)),
            None => None,
        };
        Ok(Tls {
            dev_ca: self.dev_ca,
            agent_key,
            certificates,
        })
    }
}

fn authtokens(raw: Vec<RawAuthtoken>) -> Result<Vec<AuthtokenRecord>, ConfigError> {
    let mut authtokens = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let field = format!("authtokens[{i}]");
        let acl =
            Acl::parse(&raw.acl).map_err(|e| ConfigError::field(format!("{field}.acl"), e))?;
        let record = match (raw.token, raw.token_sha256) {
            (Some(token), None) => {
                AuthtokenRecord::from_token(token.expose(), acl, raw.description)
                    .map_err(|e| ConfigError::field(format!("{field}.token"), e))?
            }
            (None, Some(hash)) => AuthtokenRecord::from_sha256_hex(&hash, acl, raw.description)
                .map_err(|e| ConfigError::field(format!("{field}.token_sha256"), e))?,
            _ => {
                return Err(invalid!(
                    "{field}: give exactly one of token and token_sha256"
                ));
            }
        };
        authtokens.push(record);
    }
    Ok(authtokens)
}

impl RawSession {
    fn validate(&self) -> Result<SessionSettings, ConfigError> {
        let session = SessionSettings {
            heartbeat_interval: duration(
                "session.heartbeat_interval",
                &self.heartbeat_interval,
                Duration::from_secs(10),
            )?,
            heartbeat_tolerance: duration(
                "session.heartbeat_tolerance",
                &self.heartbeat_tolerance,
                Duration::from_secs(15),
            )?,
            stream_wait: duration(
                "session.stream_wait",
                &self.stream_wait,
                Duration::from_secs(10),
            )?,
        };
        if session.heartbeat_interval.is_zero()
            || session.heartbeat_tolerance <= session.heartbeat_interval
        {
            return Err(invalid!(
                "session.heartbeat_tolerance must be longer than session.heartbeat_interval, which must not be zero"
            ));
        }
        Ok(session)
    }
}

impl RawLimits {
    fn validate(&self) -> Result<Limits, ConfigError> {
        let timeout = |field: &str, value: &Option<String>, default_secs: u64| {
            duration(
                &format!("limits.{field}"),
                value,
                Duration::from_secs(default_secs),
            )
        };
        let endpoints_per_session = self.endpoints_per_session.unwrap_or(100);
        Ok(Limits {
            endpoints_per_session,
            sessions_per_token: self.sessions_per_token.unwrap_or(100),
            stream_pool: self.stream_pool.unwrap_or(16),
            streams_per_session: self.streams_per_session.unwrap_or(10_000),
            control_messages_per_second: self.control_messages_per_second.unwrap_or(100).max(1),
            control_burst: self.control_burst.unwrap_or_else(|| {
                u32::try_from(endpoints_per_session)
                    .unwrap_or(u32::MAX)
                    .saturating_add(20)
            }),
            max_connections: self.max_connections.unwrap_or(20_000),
            client_hello_timeout: timeout("client_hello_timeout", &self.client_hello_timeout, 10)?,
            client_hello_max_bytes: self.client_hello_max_bytes.unwrap_or(64 * 1024),
            tls_handshake_timeout: timeout(
                "tls_handshake_timeout",
                &self.tls_handshake_timeout,
                10,
            )?,
            header_read_timeout: timeout("header_read_timeout", &self.header_read_timeout, 30)?,
            max_header_bytes: self.max_header_bytes.unwrap_or(60 * 1024),
            max_headers: self.max_headers.unwrap_or(100),
            idle_timeout: timeout("idle_timeout", &self.idle_timeout, 3600)?,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams.unwrap_or(100),
            h2_stream_window: self.h2_stream_window.unwrap_or(64 * 1024),
            h2_connection_window: self.h2_connection_window.unwrap_or(1024 * 1024),
        })
    }
}

impl RawTrustedProxies {
    fn validate(&self) -> Result<TrustedProxies, ConfigError> {
        Ok(TrustedProxies {
            cidrs: self
                .cidrs
                .iter()
                .map(|c| parse_cidr("trusted_proxies.cidrs", c))
                .collect::<Result<_, _>>()?,
            proxy_protocol: self.proxy_protocol,
            forwarded_for: self.forwarded_for,
        })
    }
}

#[cfg(test)]
mod env_tests {
    use super::expand_env;

    #[test]
    fn variables_are_expanded_and_an_unset_one_is_named() {
        let var = |name: &str| (name == "POD_IP").then(|| "10.1.2.3".to_string());
        assert_eq!(
            expand_env("a = \"${POD_IP}:7946\"\nb = \"$${POD_IP}\"\n", var).unwrap(),
            "a = \"10.1.2.3:7946\"\nb = \"${POD_IP}\"\n"
        );
        let err = expand_env("x = 1\nnode_id = \"${POD_NAME}\"\n", var).unwrap_err();
        assert_eq!(err.to_string(), "line 2: ${POD_NAME} is not set");
        let err = expand_env("a = \"${POD IP}\"", var).unwrap_err();
        assert_eq!(err.to_string(), "line 1: ${POD IP} is not a variable name");
        assert!(expand_env("a = \"${POD_IP\"", var).is_err());
        assert_eq!(expand_env("cost = \"$5\"", var).unwrap(), "cost = \"$5\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
domain = "example.test"
[tls]
dev_ca = true
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = EdgeConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.region, "us");
        assert_eq!(c.agent_ingress_name(), "tunnel.us.connect.example.test");
        assert_eq!(c.listen.https.port(), 443);
        assert_eq!(c.tcp_ports, 20000..=29999);
        assert_eq!(c.session.heartbeat_tolerance, Duration::from_secs(15));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "domain = \"example.test\"\nbogus = 1\n[tls]\ndev_ca = true",
                "bogus",
            ),
            ("domain = \"bad domain\"\n[tls]\ndev_ca = true", "domain"),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[rate_limit]\nstore = \"redis\"",
                "rate_limit.store: \"redis\" counts in the Redis of [oauth]",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[rate_limit]\nstore = \"disk\"",
                "rate_limit.store: \"disk\"",
            ),
            ("domain = \"example.test\"", "tls.agent_cert"),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[tcp]\nports = \"30-20\"",
                "tcp.ports",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[session]\nheartbeat_interval = \"ten\"",
                "session.heartbeat_interval",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[[authtokens]]\ntoken = \"t0k3n-123456\"\nacl = [\"bond:x\"]",
                "authtokens[0].acl",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[[authtokens]]\nacl = []",
                "authtokens[0]",
            ),
            (
                "domain = \"example.test\"\nregion = \"U S\"\n[tls]\ndev_ca = true",
                "region",
            ),
            (
                "domain = \"example.test\"\n[tls]\nagent_cert = \"/nonexistent/agent.pem\"\nagent_key = \"/nonexistent/agent.key\"",
                "reading /nonexistent/agent.pem",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[[tls.certificates]]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/c.key\"",
                "reading /nonexistent/c.pem",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[telemetry]\nsample_ratio = 2.0",
                "telemetry.sample_ratio",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[telemetry]\notlp_endpoint = \"https://c:4317\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[acme]\ncontact_email = \"ops@example.test\"",
                "acme: certificates are ordered for reserved domains, which live in the cluster",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[acme]\nrenew_at = 2.0\n[cluster]\ncluster_id = \"c\"\nkey = \"0123456789abcdef0123456789abcdef\"\ngossip_listen = \"127.0.0.1:7946\"",
                "acme.renew_at",
            ),
            (
                "domain = \"example.test\"\n[listen]\nhttp = \"\"\n[tls]\ndev_ca = true\n[acme]\n[cluster]\ncluster_id = \"c\"\nkey = \"0123456789abcdef0123456789abcdef\"\ngossip_listen = \"127.0.0.1:7946\"",
                "acme.challenge: \"http-01\" (the default) is answered on the plain-HTTP listener, and listen.http is \"\" (off)",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[ssh]\nallow_authtoken_users = false",
                "unknown field `allow_authtoken_users`",
            ),
            (
                "domain = \"example.test\"\n[tls]\ndev_ca = true\n[ssh]\nallow_authtoken_user = \"no\"",
                "allow_authtoken_user",
            ),
        ];
        for (text, field) in cases {
            let err = format!("{:#}", EdgeConfig::from_toml(text).unwrap_err());
            assert!(err.contains(field), "{field:?} not named in: {err}");
        }
        // TLS-ALPN-01 is answered on the HTTPS listener: no plain HTTP needed.
        let config = EdgeConfig::from_toml(
            "domain = \"example.test\"\n[listen]\nhttp = \"\"\n[tls]\ndev_ca = true\n[acme]\nchallenge = \"tls-alpn-01\"\n[cluster]\ncluster_id = \"c\"\nkey = \"0123456789abcdef0123456789abcdef\"\ngossip_listen = \"127.0.0.1:7946\"",
        )
        .unwrap();
        assert_eq!(
            config.acme.unwrap().challenge,
            crate::acme::Challenge::TlsAlpn01
        );
    }
}
