//! What the cluster carries: config objects (written through the admin API
//! at any node) and live state (which node serves what). Field names follow
//! ngrok's API objects where ngrok has them.

use postern_config_sync::Kind;
use serde::{Deserialize, Serialize};

/// A certificate authority for mutual TLS (`/certificate_authorities`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaObject {
    pub ca_pem: String,
    pub created_at: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// AES-256-GCM under `admin.key_encryption_secret`, which every node
    /// that should use it must share.
    #[serde(default)]
    pub encrypted_key: Option<String>,
}

impl Kind for CaObject {
    const KIND: &'static str = "ca";
}

/// A reserved domain (`/reserved_domains`): the name and every name under
/// it belong to `owner_id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReservedDomain {
    pub domain: String,
    pub created_at: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// The bot user that may bind it; `None`: authtokens without an owner.
    #[serde(default)]
    pub owner_id: Option<String>,
}

impl Kind for ReservedDomain {
    const KIND: &'static str = "reserved_domain";
}

/// A custom agent connect address (`/agent_ingresses`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentIngress {
    pub domain: String,
    pub created_at: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    /// Only authtokens of this owner may connect through it; `None`: any.
    #[serde(default)]
    pub owner_id: Option<String>,
}

impl Kind for AgentIngress {
    const KIND: &'static str = "agent_ingress";
}

/// A service account that owns authtokens (`/bot_users`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BotUser {
    pub name: String,
    pub active: bool,
    pub created_at: String,
}

impl Kind for BotUser {
    const KIND: &'static str = "bot_user";
}

/// An authtoken created through the API (`/credentials`); only its hash
/// is kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credential {
    pub token_sha256: String,
    #[serde(default)]
    pub acl: Vec<String>,
    #[serde(default)]
    pub owner_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub metadata: String,
    pub created_at: String,
}

impl Kind for Credential {
    const KIND: &'static str = "credential";
}

/// Edge-side settings for endpoints on a domain (`/endpoint_policies`),
/// alongside the config file's `[[endpoint_policies]]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointPolicyObject {
    pub domain: String,
    #[serde(default)]
    pub mutual_tls_cas: Vec<String>,
    pub created_at: String,
    #[serde(default)]
    pub description: String,
}

impl Kind for EndpointPolicyObject {
    const KIND: &'static str = "endpoint_policy";
}

/// Live: an endpoint an agent of this node serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// The routing key: the domain pattern, or `tcp:<port>`.
    pub name: String,
    pub proto: String,
    pub public_url: String,
    /// Who may pool with it: `owner:<id>` or `token:<sha256>`.
    pub identity: String,
    /// The endpoint id at the serving node.
    pub endpoint_id: String,
    pub session_id: String,
    /// Milliseconds since the epoch; the earliest bind wins a conflict.
    pub bound_at: u64,
    /// The bind request (protobuf), sealed with the cluster key: other
    /// nodes rebuild the endpoint from it (it may hold a private key).
    pub spec: String,
}

impl Kind for RouteEntry {
    const KIND: &'static str = "route";
}

/// Live: an agent session on this node (`/tunnel_sessions`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub agent_version: String,
    pub os: String,
    pub ip: String,
    pub started_at: String,
    #[serde(default)]
    pub credential_id: Option<String>,
}

impl Kind for SessionEntry {
    const KIND: &'static str = "session";
}
