//! Admin-API resources kept as cluster objects, in ngrok's shapes, behind
//! one handler: `POST /<path>` (201 with the object), `GET /<path>` (the
//! list), `GET /<path>/{id}`, `PATCH /<path>/{id}`, `DELETE /<path>/{id}`
//! (204). A write at any node reaches every node. Needs `[cluster]`.
//!
//! - `/bot_users`: `{name, active}`; deleting one deletes its credentials.
//! - `/credentials`: `{description, metadata, acl, owner_id}`; the token
//!   is in the answer to the `POST` only.
//! - `/ssh_credentials`: `{public_key, description, metadata, acl,
//!   owner_id}`, the key in OpenSSH's `authorized_keys` format: SSH clients
//!   log in to the SSH ingress with it and bind under its `acl`; the key is
//!   fixed once created (a `PATCH` changes the rest).
//! - `/reserved_domains`: `{domain, description, metadata, owner_id,
//!   certificate_management_policy | certificate_id}`, exact or `*.`
//!   wildcard: the name and everything under it may be bound only by the
//!   owner's credentials; the certificate named is served for it.
//!   `DELETE /reserved_domains/{id}/certificate` (or
//!   `/certificate_management_policy`) clears the field.
//! - `/agent_ingresses`: `{domain, description, metadata, owner_id}`:
//!   agents connect to `tunnel.<region>.<domain>` at the nodes of each
//!   region; `region_domains` lists them.
//! - `/endpoint_policies`: `{domain, mutual_tls_cas, description,
//!   metadata}`, as `[[endpoint_policies]]`: every node requires the CAs
//!   for the endpoints on the domain, those already bound included.
//! - `/tls_certificates`: `{certificate_pem, private_key_pem,
//!   description, metadata}` (ngrok's TLSCertificate): every node serves
//!   it by SNI for its names; the key is never shown. The certificates
//!   ACME issued are listed too, read-only (see `tls_certificates.rs`).
//! - `/event_subscriptions`: `{description, metadata, sources,
//!   destination}` (ngrok's Event Subscription with the destination
//!   inline, see `postern_events::ApiSubscription`); every node runs it for
//!   its own events. A file destination's path is relative to
//!   `<data_dir>/event-files/`; a Kafka `sasl_password` is never shown.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use postern_config_sync::Kind;
use postern_events::{ApiSubscription, RawDestination, RawSource};
use postern_ingress::{DomainPattern, names_cover};
use postern_net::{Secret, random_id};
use postern_proto::{ErrorCode, Failure};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{AdminState, empty, json_response, read_body, tls_certificates::acme_certificate_id};
use crate::{
    acl::Acl,
    acme::CertStatus,
    auth::{AuthtokenRecord, CredentialRef, SSH_CREDENTIAL_PREFIX},
    ca_store::now_rfc3339,
    cluster::{
        AgentIngress, BotUser, CertificatePolicy, ClusterNode, Credential, CredentialCommon,
        EndpointPolicyRecord, EventSubscription, KeyType, ReservedDomain, SshCredential,
        TlsCertificate, bad, check_text, parse_domain,
    },
    config::EndpointPolicy,
    ssh::AuthorizedKey,
};

/// One kind of object on the admin API.
pub trait Resource: Kind + Clone {
    /// The collection's path and JSON key, e.g. `bot_users`.
    const PATH: &'static str;
    /// Prefix of new ids, e.g. `bot_`.
    const ID_PREFIX: &'static str;
    /// For messages: `bot user`.
    const NAME: &'static str;
    type New: DeserializeOwned;
    type Update: DeserializeOwned;

    /// A new object from a `POST` body, and fields to show only in the
    /// answer to it (a credential's token).
    fn create(node: &ClusterNode, id: &str, new: Self::New) -> Result<(Self, Value), Failure>;
    /// The object after a `PATCH`.
    fn update(self, node: &ClusterNode, update: Self::Update) -> Result<Self, Failure>;
    /// The object as the API shows it.
    fn json(&self, node: &ClusterNode, id: &str) -> Value;
    /// Ids of credentials (tokens' and SSH keys') to delete with it.
    fn owned_credentials(_node: &ClusterNode, _id: &str) -> Vec<String> {
        Vec::new()
    }
    /// Objects of the kind the edge manages itself, shown by id in the
    /// list and by `GET`, refused to `PATCH` and `DELETE`.
    fn read_only(_node: &ClusterNode) -> Vec<(String, Value)> {
        Vec::new()
    }
    /// Refuses to delete object `id` while others need it.
    fn check_delete(_node: &ClusterNode, _id: &str) -> Result<(), Failure> {
        Ok(())
    }
    /// The object after `DELETE /<path>/{id}/<part>` (ngrok's way of
    /// clearing one field); `None`: no such part.
    fn detach(self, _part: &str) -> Option<Self> {
        None
    }
}

/// Serves `/<R::PATH>` and below.
pub async fn handle<R: Resource>(
    state: &AdminState,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Full<Bytes>>, Failure> {
    let node: &ClusterNode = state.cluster.as_deref().ok_or_else(|| {
        Failure::new(
            ErrorCode::API_NOT_FOUND,
            format!("/{} needs a [cluster] table in the edge config", R::PATH),
        )
    })?;
    let not_found =
        |id: &str| Failure::new(ErrorCode::API_NOT_FOUND, format!("no {} {id}", R::NAME));
    let read_only = |id: &str| {
        R::read_only(node)
            .into_iter()
            .find(|(other, _)| other == id)
    };
    if let (method, [id]) = (req.method(), rest)
        && (method == Method::PATCH || method == Method::DELETE)
        && read_only(id).is_some()
    {
        return Err(Failure::new(
            ErrorCode::API_READ_ONLY,
            format!(
                "{} {id} is managed by the edge; it can be read, not changed or deleted",
                R::NAME
            ),
        ));
    }
    match (req.method().clone(), rest) {
        (Method::POST, []) => {
            let new: R::New = body(req).await?;
            let id = random_id(R::ID_PREFIX);
            let (object, shown_once) = R::create(node, &id, new)?;
            node.put_object(&id, &object).await?;
            tracing::info!(id, kind = R::NAME, "created");
            let mut shown = object.json(node, &id);
            if let (Some(shown), Value::Object(extra)) = (shown.as_object_mut(), shown_once) {
                shown.extend(extra);
            }
            Ok(json_response(StatusCode::CREATED, &shown))
        }
        (Method::GET, []) => {
            let mut list: Vec<Value> = node
                .objects::<R>()
                .iter()
                .map(|(id, object)| object.json(node, id))
                .collect();
            list.extend(R::read_only(node).into_iter().map(|(_, shown)| shown));
            Ok(json_response(
                StatusCode::OK,
                &json!({ R::PATH: list, "uri": format!("/{}", R::PATH), "next_page_uri": null }),
            ))
        }
        (Method::GET, [id]) => node
            .object::<R>(id)
            .map(|object| object.json(node, id))
            .or_else(|| read_only(id).map(|(_, shown)| shown))
            .map(|shown| json_response(StatusCode::OK, &shown))
            .ok_or_else(|| not_found(id)),
        (Method::PATCH, [id]) => {
            let object = node.object::<R>(id).ok_or_else(|| not_found(id))?;
            let update: R::Update = body(req).await?;
            let object = object.update(node, update)?;
            node.put_object(id, &object).await?;
            tracing::info!(id, kind = R::NAME, "updated");
            Ok(json_response(StatusCode::OK, &object.json(node, id)))
        }
        (Method::DELETE, [id, part]) => {
            let object = node.object::<R>(id).ok_or_else(|| not_found(id))?;
            let object = object.detach(part).ok_or_else(|| {
                Failure::new(
                    ErrorCode::API_NOT_FOUND,
                    format!("{} has no {part} to delete", R::NAME),
                )
            })?;
            node.put_object(id, &object).await?;
            tracing::info!(id, kind = R::NAME, part, "detached");
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Method::DELETE, [id]) => {
            R::check_delete(node, id)?;
            let owned = R::owned_credentials(node, id);
            if !node.delete_object::<R>(id).await? {
                return Err(not_found(id));
            }
            for credential in owned {
                if CredentialRef::is_ssh_key(&credential) {
                    node.delete_object::<SshCredential>(&credential).await?;
                } else {
                    node.delete_object::<Credential>(&credential).await?;
                }
            }
            tracing::info!(id, kind = R::NAME, "deleted");
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(Failure::new(
            ErrorCode::API_METHOD,
            "use GET, POST, PATCH or DELETE",
        )),
    }
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Failure> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("body: {e}")))
}

/// An `owner_id` must name a bot user.
fn check_owner(node: &ClusterNode, owner: &Option<String>) -> Result<(), Failure> {
    match owner {
        Some(id) if node.object::<BotUser>(id).is_none() => {
            Err(bad("owner_id", format!("no bot user {id}")))
        }
        _ => Ok(()),
    }
}

/// Refuses a second object of a kind on one domain.
fn unique_domain<R: Resource>(
    node: &ClusterNode,
    domain: &str,
    domain_of: fn(&R) -> &str,
) -> Result<(), Failure> {
    match node
        .objects::<R>()
        .into_iter()
        .find(|(_, other)| domain_of(other) == domain)
    {
        Some((id, _)) => Err(bad(
            "domain",
            format!("{domain} is {} {id} already", R::NAME),
        )),
        None => Ok(()),
    }
}

/// `description` and `metadata`, as a `PATCH` may change them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextUpdate {
    pub(super) description: Option<String>,
    pub(super) metadata: Option<String>,
}

impl TextUpdate {
    pub(super) fn apply(
        self,
        description: &mut String,
        metadata: &mut String,
    ) -> Result<(), Failure> {
        let new_description = self.description.unwrap_or_else(|| description.clone());
        let new_metadata = self.metadata.unwrap_or_else(|| metadata.clone());
        check_text(&new_description, &new_metadata)?;
        (*description, *metadata) = (new_description, new_metadata);
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBotUser {
    #[serde(default)]
    name: String,
    active: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotUserUpdate {
    name: Option<String>,
    active: Option<bool>,
}

fn check_name(name: &str) -> Result<(), Failure> {
    if name.trim().is_empty() || name.len() > 255 {
        return Err(bad("name", "1 to 255 bytes"));
    }
    Ok(())
}

impl Resource for BotUser {
    const PATH: &'static str = "bot_users";
    const ID_PREFIX: &'static str = "bot_";
    const NAME: &'static str = "bot user";
    type New = NewBotUser;
    type Update = BotUserUpdate;

    fn create(_node: &ClusterNode, _id: &str, new: NewBotUser) -> Result<(Self, Value), Failure> {
        check_name(&new.name)?;
        let bot = BotUser {
            name: new.name,
            active: new.active.unwrap_or(true),
            created_at: now_rfc3339(),
        };
        Ok((bot, Value::Null))
    }

    fn update(mut self, _node: &ClusterNode, update: BotUserUpdate) -> Result<Self, Failure> {
        if let Some(name) = update.name {
            check_name(&name)?;
            self.name = name;
        }
        if let Some(active) = update.active {
            self.active = active;
        }
        Ok(self)
    }

    fn json(&self, _node: &ClusterNode, id: &str) -> Value {
        json!({
            "id": id,
            "uri": format!("/bot_users/{id}"),
            "name": self.name,
            "active": self.active,
            "created_at": self.created_at,
        })
    }

    fn owned_credentials(node: &ClusterNode, id: &str) -> Vec<String> {
        let mut owned = owned_by::<Credential>(node, id, |c| &c.common.owner_id);
        owned.extend(owned_by::<SshCredential>(node, id, |c| &c.common.owner_id));
        owned
    }
}

/// Ids of the objects of a kind that `owner` owns.
fn owned_by<R: Resource>(
    node: &ClusterNode,
    owner: &str,
    owner_of: fn(&R) -> &Option<String>,
) -> Vec<String> {
    node.objects::<R>()
        .into_iter()
        .filter(|(_, object)| owner_of(object).as_deref() == Some(owner))
        .map(|(id, _)| id)
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    /// ngrok's rules, e.g. `bind:*.customer1.example.com`; none: any name.
    #[serde(default)]
    acl: Vec<String>,
    owner_id: Option<String>,
}

/// What a `PATCH` may change of a credential, a token's or an SSH key's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialUpdate {
    #[serde(flatten)]
    text: TextUpdate,
    acl: Option<Vec<String>>,
}

impl CredentialUpdate {
    fn apply(self, common: &mut CredentialCommon) -> Result<(), Failure> {
        if let Some(acl) = &self.acl {
            check_acl(acl)?;
        }
        self.text
            .apply(&mut common.description, &mut common.metadata)?;
        if let Some(acl) = self.acl {
            common.acl = acl;
        }
        Ok(())
    }
}

/// A new credential's checked fields, from a `POST` body's.
fn new_credential(
    node: &ClusterNode,
    description: String,
    metadata: String,
    acl: Vec<String>,
    owner_id: Option<String>,
) -> Result<CredentialCommon, Failure> {
    check_acl(&acl)?;
    check_text(&description, &metadata)?;
    check_owner(node, &owner_id)?;
    Ok(CredentialCommon {
        acl,
        description,
        metadata,
        created_at: now_rfc3339(),
        owner_id,
    })
}

/// A credential as the API shows it: the common fields, and `secret`
/// (the token, never shown again, or the public key).
fn credential_json(
    common: &CredentialCommon,
    path: &str,
    id: &str,
    secret: (&str, Value),
) -> Value {
    let mut shown = json!({
        "id": id,
        "uri": format!("/{path}/{id}"),
        "created_at": common.created_at,
        "description": common.description,
        "metadata": common.metadata,
        "acl": common.acl,
        "owner_id": common.owner_id,
    });
    shown[secret.0] = secret.1;
    shown
}

fn check_acl(acl: &[String]) -> Result<(), Failure> {
    Acl::parse(acl)
        .map(|_| ())
        .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("acl: {e:#}")))
}

impl Resource for Credential {
    const PATH: &'static str = "credentials";
    const ID_PREFIX: &'static str = "cr_";
    const NAME: &'static str = "credential";
    type New = NewCredential;
    type Update = CredentialUpdate;

    fn create(node: &ClusterNode, _id: &str, new: NewCredential) -> Result<(Self, Value), Failure> {
        let common = new_credential(node, new.description, new.metadata, new.acl, new.owner_id)?;
        let token = random_id("pt_");
        let record = AuthtokenRecord::from_token(&token, Acl::default(), String::new())
            .map_err(|e| Failure::new(ErrorCode::INTERNAL, format!("a new token: {e:#}")))?;
        let credential = Credential {
            token_sha256: record.sha256,
            common,
        };
        Ok((credential, json!({ "token": token })))
    }

    fn update(mut self, _node: &ClusterNode, update: CredentialUpdate) -> Result<Self, Failure> {
        update.apply(&mut self.common)?;
        Ok(self)
    }

    fn json(&self, _node: &ClusterNode, id: &str) -> Value {
        credential_json(&self.common, Self::PATH, id, ("token", Value::Null))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSshCredential {
    /// One key in OpenSSH's `authorized_keys` format.
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    /// ngrok's rules, as a credential's; none: any name.
    #[serde(default)]
    acl: Vec<String>,
    owner_id: Option<String>,
}

impl Resource for SshCredential {
    const PATH: &'static str = "ssh_credentials";
    const ID_PREFIX: &'static str = SSH_CREDENTIAL_PREFIX;
    const NAME: &'static str = "ssh credential";
    type New = NewSshCredential;
    type Update = CredentialUpdate;

    fn create(
        node: &ClusterNode,
        _id: &str,
        new: NewSshCredential,
    ) -> Result<(Self, Value), Failure> {
        let key = AuthorizedKey::parse(&new.public_key).map_err(|e| bad("public_key", e))?;
        let common = new_credential(node, new.description, new.metadata, new.acl, new.owner_id)?;
        let registered = node.objects::<SshCredential>().into_iter().find(|(_, c)| {
            AuthorizedKey::parse(&c.public_key).is_ok_and(|other| other.sha256 == key.sha256)
        });
        if let Some((id, _)) = registered {
            return Err(bad(
                "public_key",
                format!("this key is registered already, as ssh credential {id}"),
            ));
        }
        let credential = SshCredential {
            public_key: key.line,
            common,
        };
        Ok((credential, Value::Null))
    }

    fn update(mut self, _node: &ClusterNode, update: CredentialUpdate) -> Result<Self, Failure> {
        update.apply(&mut self.common)?;
        Ok(self)
    }

    fn json(&self, _node: &ClusterNode, id: &str) -> Value {
        let key = ("public_key", Value::String(self.public_key.clone()));
        credential_json(&self.common, Self::PATH, id, key)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgentIngress {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    owner_id: Option<String>,
    /// ngrok's deprecated region of a reserved domain: names are served in
    /// every region, so it is accepted and ignored.
    #[serde(default, rename = "region")]
    _region: Option<String>,
    /// ngrok's `{authority, private_key_type}` (key `rsa` by default, as
    /// ngrok's): each region's nodes order the certificate of their name
    /// `tunnel.<region>.<domain>` from the CA of `[acme]`, renew it, and
    /// serve it to agents instead of the agent-ingress CA's.
    certificate_management_policy: Option<RawCertificatePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewReservedDomain {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    owner_id: Option<String>,
    /// As [`NewAgentIngress`]'s: accepted and ignored.
    #[serde(default, rename = "region")]
    _region: Option<String>,
    /// ngrok's `{authority, private_key_type}`: the edge orders the name's
    /// certificate from the CA of `[acme]` and renews it.
    certificate_management_policy: Option<RawCertificatePolicy>,
    /// The id of an uploaded certificate covering the domain, served for
    /// it over any other; not with a `certificate_management_policy`.
    certificate_id: Option<String>,
}

/// A `PATCH` of a reserved domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservedDomainUpdate {
    #[serde(flatten)]
    managed: ManagedUpdate,
    /// An id names (or replaces) the certificate; `""` or `null`
    /// detaches it.
    #[serde(default, deserialize_with = "present")]
    certificate_id: Option<Option<String>>,
}

/// ngrok's `certificate_management_policy` as a body gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificatePolicy {
    authority: Option<String>,
    private_key_type: Option<String>,
}

/// A `PATCH` of a reserved domain or an agent ingress.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedUpdate {
    description: Option<String>,
    metadata: Option<String>,
    /// A policy sets or replaces it; `null` stops managing the
    /// certificate (the one issued stays until it expires).
    #[serde(default, deserialize_with = "present")]
    certificate_management_policy: Option<Option<RawCertificatePolicy>>,
}

impl ManagedUpdate {
    /// Applies the update to an object of `domain`: its texts, and its
    /// policy (a new one's key defaulting to `default_key`).
    fn apply(
        self,
        node: &ClusterNode,
        domain: &str,
        (description, metadata): (&mut String, &mut String),
        (policy, default_key): (&mut Option<CertificatePolicy>, KeyType),
    ) -> Result<(), Failure> {
        let text = TextUpdate {
            description: self.description,
            metadata: self.metadata,
        };
        text.apply(description, metadata)?;
        if let Some(raw) = self.certificate_management_policy {
            *policy = certificate_policy(node, domain, raw, default_key)?;
        }
        Ok(())
    }
}

/// A field that may be given as `null`: `Some(None)`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A policy checked: its fields (`private_key_type` defaulting to
/// `default_key`), a node that can order, and for a wildcard a node that
/// can prove it (DNS-01) or order the names bound under it (on demand).
fn certificate_policy(
    node: &ClusterNode,
    domain: &str,
    raw: Option<RawCertificatePolicy>,
    default_key: KeyType,
) -> Result<Option<CertificatePolicy>, Failure> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let policy = CertificatePolicy::parse(
        raw.authority.as_deref(),
        raw.private_key_type.as_deref(),
        default_key,
    )?;
    let Some(acme) = node.acme() else {
        return Err(bad(
            "certificate_management_policy",
            "this edge has no [acme] table in its config, so it cannot order certificates",
        ));
    };
    if domain.starts_with("*.") && !acme.orders_wildcards() && !acme.on_demand() {
        return Err(bad(
            "certificate_management_policy",
            format!(
                "{domain} is a wildcard, which is proved by the DNS-01 challenge, and this edge has no acme.dns_hook to publish its TXT record, nor acme.on_demand to order the names agents bind under it"
            ),
        ));
    }
    Ok(Some(policy))
}

/// A `certificate_id` checked for `domain`: `None` for none (or `""`),
/// else the id of an uploaded certificate valid for every name of the
/// domain (a wildcard domain needs the same wildcard).
fn named_certificate(
    node: &ClusterNode,
    domain: &DomainPattern,
    id: Option<String>,
) -> Result<Option<String>, Failure> {
    let Some(id) = id.filter(|id| !id.is_empty()) else {
        return Ok(None);
    };
    if id.starts_with(&acme_certificate_id("")) {
        return Err(Failure::new(
            ErrorCode::CERT_UNKNOWN,
            format!(
                "certificate_id: {id} was issued by ACME and is managed by a certificate_management_policy; name a certificate uploaded through /tls_certificates"
            ),
        ));
    }
    let Some(cert) = node.object::<TlsCertificate>(&id) else {
        return Err(Failure::new(
            ErrorCode::CERT_UNKNOWN,
            format!("certificate_id: there is no TLS certificate {id}"),
        ));
    };
    let names = cert.names();
    if !names_cover(&names, domain) {
        let carried: Vec<String> = names.iter().map(ToString::to_string).collect();
        let wildcard = match domain {
            DomainPattern::Wildcard(_) => {
                " (a wildcard reserved domain needs a certificate for the same wildcard)"
            }
            DomainPattern::Exact(_) => "",
        };
        return Err(Failure::new(
            ErrorCode::CERT_NOT_COVERING,
            format!(
                "certificate_id: TLS certificate {id} is for {}, which does not cover {domain}{wildcard}",
                carried.join(", ")
            ),
        ));
    }
    Ok(Some(id))
}

/// Refuses a reserved domain that would have both a `certificate_id` and
/// a `certificate_management_policy`.
fn one_certificate_source(certificate_id: bool, policy: bool) -> Result<(), Failure> {
    if certificate_id && policy {
        return Err(Failure::new(
            ErrorCode::CERT_EXCLUSIVE,
            "certificate_id: a reserved domain takes either certificate_id (an uploaded certificate) or certificate_management_policy (certificates from ACME), not both; set the other to null in the same request",
        ));
    }
    Ok(())
}

impl Resource for ReservedDomain {
    const PATH: &'static str = "reserved_domains";
    const ID_PREFIX: &'static str = "rd_";
    const NAME: &'static str = "reserved domain";
    type New = NewReservedDomain;
    type Update = ReservedDomainUpdate;

    fn create(
        node: &ClusterNode,
        _id: &str,
        new: NewReservedDomain,
    ) -> Result<(Self, Value), Failure> {
        let domain = parse_domain(&new.domain, true)?;
        check_text(&new.description, &new.metadata)?;
        check_owner(node, &new.owner_id)?;
        one_certificate_source(
            new.certificate_id.as_ref().is_some_and(|id| !id.is_empty()),
            new.certificate_management_policy.is_some(),
        )?;
        let certificate_id = named_certificate(node, &domain, new.certificate_id)?;
        let reserved = ReservedDomain {
            domain: domain.to_string(),
            description: new.description,
            metadata: new.metadata,
            owner_id: new.owner_id,
            created_at: now_rfc3339(),
            certificate_management_policy: certificate_policy(
                node,
                &domain.to_string(),
                new.certificate_management_policy,
                KeyType::Ecdsa,
            )?,
            certificate_id,
        };
        let overlap = node
            .objects::<ReservedDomain>()
            .into_iter()
            .find(|(_, other)| {
                let other_pattern = parse_domain(&other.domain, true).ok();
                other.domain == reserved.domain
                    || (other.owner_id != reserved.owner_id
                        && (other.covers(&domain)
                            || other_pattern.is_some_and(|p| reserved.covers(&p))))
            });
        if let Some((id, other)) = overlap {
            return Err(Failure::new(
                ErrorCode::DOMAIN_RESERVED,
                format!(
                    "domain: {} overlaps {} (reserved domain {id})",
                    reserved.domain, other.domain
                ),
            ));
        }
        Ok((reserved, Value::Null))
    }

    fn update(mut self, node: &ClusterNode, update: ReservedDomainUpdate) -> Result<Self, Failure> {
        let ReservedDomainUpdate {
            managed,
            certificate_id,
        } = update;
        one_certificate_source(
            match &certificate_id {
                Some(id) => id.as_ref().is_some_and(|id| !id.is_empty()),
                None => self.certificate_id.is_some(),
            },
            match &managed.certificate_management_policy {
                Some(policy) => policy.is_some(),
                None => self.certificate_management_policy.is_some(),
            },
        )?;
        managed.apply(
            node,
            &self.domain,
            (&mut self.description, &mut self.metadata),
            (&mut self.certificate_management_policy, KeyType::Ecdsa),
        )?;
        if let Some(id) = certificate_id {
            let domain = parse_domain(&self.domain, true)?;
            self.certificate_id = named_certificate(node, &domain, id)?;
        }
        Ok(self)
    }

    /// `certificate` detaches the certificate named, and
    /// `certificate_management_policy` stops managing one, as ngrok's.
    fn detach(mut self, part: &str) -> Option<Self> {
        match part {
            "certificate" => self.certificate_id = None,
            "certificate_management_policy" => self.certificate_management_policy = None,
            _ => return None,
        }
        Some(self)
    }

    fn json(&self, node: &ClusterNode, id: &str) -> Value {
        let (policy, status) = managed_certificate(
            node,
            self.certificate_management_policy.as_ref(),
            &self.domain,
        );
        // The certificate named, or the ACME one served, as
        // `/tls_certificates` lists it.
        let certificate = match &self.certificate_id {
            Some(cert) => Some(cert.clone()),
            None => status
                .as_ref()
                .filter(|s| s.not_after.is_some())
                .map(|_| acme_certificate_id(&self.domain)),
        }
        .map(|cert| json!({ "id": cert, "uri": format!("/tls_certificates/{cert}") }));
        let status = status.as_ref().map(certificate_status);
        json!({
            "id": id,
            "uri": format!("/reserved_domains/{id}"),
            "created_at": self.created_at,
            "description": self.description,
            "metadata": self.metadata,
            "domain": self.domain,
            "region": null,
            "cname_target": null,
            "certificate": certificate,
            "certificate_management_policy": policy,
            "certificate_management_status": status,
            "acme_challenge_cname_target": null,
            "owner_id": self.owner_id,
        })
    }
}

/// A `certificate_management_policy` as ngrok shows it, and what this
/// node knows of `name`'s managed certificate when there is a policy.
fn managed_certificate(
    node: &ClusterNode,
    policy: Option<&CertificatePolicy>,
    name: &str,
) -> (Value, Option<CertStatus>) {
    let Some(policy) = policy else {
        return (Value::Null, None);
    };
    let key_type = match policy.private_key_type {
        KeyType::Ecdsa => "ecdsa",
        KeyType::Rsa => "rsa",
    };
    let status = node
        .acme()
        .and_then(|acme| acme.status(name))
        .unwrap_or_default();
    (
        json!({ "authority": policy.authority, "private_key_type": key_type }),
        Some(status),
    )
}

/// ngrok's `certificate_management_status` from what this node knows:
/// when the served certificate renews, the order running or failed (`msg`
/// the last error, `retries_at` the next try), here or at the node holding
/// the cluster's lease for the name; and, beside ngrok's fields, the node
/// that ordered the served certificate (`ordered_by`) and the lease
/// (`lease`: `holder`, `taken_at`, `expires_at`).
fn certificate_status(status: &CertStatus) -> Value {
    let time = |t: Option<std::time::SystemTime>| {
        t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
    };
    let elsewhere = status.lease.as_ref().filter(|l| !l.this_node);
    let job = match (&status.ordering_since, &status.last_error, elsewhere) {
        (None, None, None) => Value::Null,
        (None, None, Some(lease)) => {
            let in_progress = format!(
                "Managed certificate provisioning in progress at node {}.",
                lease.holder
            );
            json!({
                "error_code": null,
                "msg": lease.last_error.clone().unwrap_or(in_progress),
                "started_at": time(Some(lease.taken_at)),
                "retries_at": time(lease.retries_at),
                "failures": lease.failures,
            })
        }
        (started, error, _) => json!({
            "error_code": null,
            "msg": error.as_deref().unwrap_or("Managed certificate provisioning in progress."),
            "started_at": time(*started),
            "retries_at": time(status.retries_at),
            "failures": status.failures,
        }),
    };
    let lease = status.lease.as_ref().map(|l| {
        json!({
            "holder": l.holder,
            "taken_at": time(Some(l.taken_at)),
            "expires_at": time(Some(l.expires_at)),
        })
    });
    json!({
        "renews_at": time(status.renews_at),
        "not_after": time(status.not_after),
        "provisioning_job": job,
        "ordered_by": status.ordered_by,
        "lease": lease,
    })
}

impl Resource for AgentIngress {
    const PATH: &'static str = "agent_ingresses";
    const ID_PREFIX: &'static str = "agin_";
    const NAME: &'static str = "agent ingress";
    type New = NewAgentIngress;
    type Update = ManagedUpdate;

    fn create(
        node: &ClusterNode,
        _id: &str,
        new: NewAgentIngress,
    ) -> Result<(Self, Value), Failure> {
        let domain = parse_domain(&new.domain, false)?.to_string();
        check_text(&new.description, &new.metadata)?;
        check_owner(node, &new.owner_id)?;
        unique_domain::<AgentIngress>(node, &domain, |i| &i.domain)?;
        let certificate_management_policy = certificate_policy(
            node,
            &domain,
            new.certificate_management_policy,
            KeyType::Rsa,
        )?;
        let ingress = AgentIngress {
            domain,
            description: new.description,
            metadata: new.metadata,
            owner_id: new.owner_id,
            created_at: now_rfc3339(),
            certificate_management_policy,
        };
        Ok((ingress, Value::Null))
    }

    fn update(mut self, node: &ClusterNode, update: ManagedUpdate) -> Result<Self, Failure> {
        update.apply(
            node,
            &self.domain,
            (&mut self.description, &mut self.metadata),
            (&mut self.certificate_management_policy, KeyType::Rsa),
        )?;
        Ok(self)
    }

    /// `certificate_management_status` is that of this node's region's
    /// name, as this node knows it.
    fn json(&self, node: &ClusterNode, id: &str) -> Value {
        let region_domains: Vec<String> = node
            .regions()
            .iter()
            .map(|region| self.region_domain(region))
            .collect();
        let (policy, status) = managed_certificate(
            node,
            self.certificate_management_policy.as_ref(),
            &self.region_domain(node.region()),
        );
        json!({
            "id": id,
            "uri": format!("/agent_ingresses/{id}"),
            "description": self.description,
            "metadata": self.metadata,
            "domain": self.domain,
            "ns_targets": [],
            "region_domains": region_domains,
            "created_at": self.created_at,
            "certificate_management_policy": policy,
            "certificate_management_status": status.as_ref().map(certificate_status),
            "owner_id": self.owner_id,
            "certificate_authority_pem": node.ingress_certs().ca_pem(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEventSubscription {
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    destination: RawDestination,
    /// ngrok's references to Event Destination objects: refused with a
    /// message saying what to send instead.
    destination_ids: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSubscriptionUpdate {
    description: Option<String>,
    metadata: Option<String>,
    sources: Option<Vec<RawSource>>,
    destination: Option<RawDestination>,
    destination_ids: Option<Vec<String>>,
}

fn refuse_destination_ids(ids: &Option<Vec<String>>) -> Result<(), Failure> {
    match ids {
        Some(_) => Err(bad(
            "destination_ids",
            "Postern takes the destination inline: \"destination\": {\"kafka\": {\"brokers\": [...], \"topic\": ...}} \
             or {\"file\": {\"path\": ...}}",
        )),
        None => Ok(()),
    }
}

/// Checks a subscription as the events pipeline will, and seals a
/// password not sealed yet.
fn checked_subscription(
    node: &ClusterNode,
    mut api: ApiSubscription,
    seal_password: bool,
) -> Result<ApiSubscription, Failure> {
    api.clone()
        .validate()
        .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, e.to_string()))?;
    if seal_password
        && let Some(kafka) = &mut api.destination.kafka
        && let Some(password) = &kafka.sasl_password
    {
        kafka.sasl_password = Some(Secret::new(node.seal(password.expose().as_bytes())));
    }
    Ok(api)
}

impl Resource for EventSubscription {
    const PATH: &'static str = "event_subscriptions";
    const ID_PREFIX: &'static str = "esb_";
    const NAME: &'static str = "event subscription";
    type New = NewEventSubscription;
    type Update = EventSubscriptionUpdate;

    fn create(
        node: &ClusterNode,
        id: &str,
        new: NewEventSubscription,
    ) -> Result<(Self, Value), Failure> {
        refuse_destination_ids(&new.destination_ids)?;
        check_text(&new.description, &new.metadata)?;
        let api = ApiSubscription {
            id: id.to_string(),
            description: new.description,
            metadata: new.metadata,
            sources: new.sources,
            destination: new.destination,
        };
        let subscription = EventSubscription {
            subscription: checked_subscription(node, api, true)?,
            created_at: now_rfc3339(),
        };
        Ok((subscription, Value::Null))
    }

    fn update(
        mut self,
        node: &ClusterNode,
        update: EventSubscriptionUpdate,
    ) -> Result<Self, Failure> {
        refuse_destination_ids(&update.destination_ids)?;
        let api = &mut self.subscription;
        TextUpdate {
            description: update.description,
            metadata: update.metadata,
        }
        .apply(&mut api.description, &mut api.metadata)?;
        if let Some(sources) = update.sources {
            api.sources = sources;
        }
        let new_destination = update.destination.is_some();
        if let Some(destination) = update.destination {
            api.destination = destination;
        }
        self.subscription = checked_subscription(node, self.subscription, new_destination)?;
        Ok(self)
    }

    fn json(&self, _node: &ClusterNode, id: &str) -> Value {
        let mut shown = serde_json::to_value(self.subscription.clone().redacted())
            .unwrap_or_else(|_| json!({}));
        if let Some(fields) = shown.as_object_mut() {
            fields.insert("id".into(), json!(id));
            fields.insert("uri".into(), json!(format!("/event_subscriptions/{id}")));
            fields.insert("created_at".into(), json!(self.created_at));
        }
        shown
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpointPolicy {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    mutual_tls_cas: Vec<String>,
    /// A Traffic Policy document: an object, or its YAML or JSON text.
    #[serde(default)]
    traffic_policy: Option<Value>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointPolicyUpdate {
    #[serde(flatten)]
    text: TextUpdate,
    mutual_tls_cas: Option<Vec<String>>,
    traffic_policy: Option<Value>,
}

/// A Traffic Policy given to the API as its text.
fn policy_text(value: Option<Value>) -> Result<Option<String>, Failure> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(object @ Value::Object(_)) => Ok(Some(object.to_string())),
        Some(_) => Err(bad(
            "traffic_policy",
            "a Traffic Policy document: an object, or its YAML or JSON text",
        )),
    }
}

/// What a policy may require: CAs (each in the store) and/or a Traffic
/// Policy; at least one of them.
fn check_policy(
    node: &ClusterNode,
    domain: &str,
    cas: &[String],
    traffic_policy: Option<&str>,
) -> Result<(), Failure> {
    EndpointPolicy::parse(domain, cas.to_vec(), traffic_policy.map(str::to_string))
        .map_err(|(field, reason)| bad(field, reason))?;
    if cas.is_empty() && traffic_policy.is_none() {
        return Err(bad(
            "mutual_tls_cas",
            "name at least one CA id, or give a traffic_policy",
        ));
    }
    match cas.iter().find(|id| !node.has_ca(id)) {
        Some(id) => Err(Failure::new(
            ErrorCode::MTLS_UNKNOWN_CA,
            format!("mutual_tls_cas: no certificate authority {id}"),
        )),
        None => Ok(()),
    }
}

impl EndpointPolicyRecord {
    /// The operator's Traffic Policy, unsealed.
    fn traffic_policy(&self, node: &ClusterNode) -> Option<String> {
        self.traffic_policy_sealed
            .as_deref()
            .and_then(|sealed| node.open_sealed(sealed))
    }
}

impl Resource for EndpointPolicyRecord {
    const PATH: &'static str = "endpoint_policies";
    const ID_PREFIX: &'static str = "epp_";
    const NAME: &'static str = "endpoint policy";
    type New = NewEndpointPolicy;
    type Update = EndpointPolicyUpdate;

    fn create(
        node: &ClusterNode,
        _id: &str,
        new: NewEndpointPolicy,
    ) -> Result<(Self, Value), Failure> {
        let domain = parse_domain(&new.domain, true)?.to_string();
        let traffic_policy = policy_text(new.traffic_policy)?;
        check_policy(
            node,
            &domain,
            &new.mutual_tls_cas,
            traffic_policy.as_deref(),
        )?;
        check_text(&new.description, &new.metadata)?;
        unique_domain::<EndpointPolicyRecord>(node, &domain, |p| &p.domain)?;
        let policy = EndpointPolicyRecord {
            domain,
            mutual_tls_cas: new.mutual_tls_cas,
            traffic_policy_sealed: traffic_policy.map(|t| node.seal(t.as_bytes())),
            description: new.description,
            metadata: new.metadata,
            created_at: now_rfc3339(),
        };
        Ok((policy, Value::Null))
    }

    fn update(mut self, node: &ClusterNode, update: EndpointPolicyUpdate) -> Result<Self, Failure> {
        update
            .text
            .apply(&mut self.description, &mut self.metadata)?;
        let traffic_policy = match update.traffic_policy {
            Some(value) => policy_text(Some(value))?,
            None => self.traffic_policy(node),
        };
        let cas = update.mutual_tls_cas.unwrap_or(self.mutual_tls_cas.clone());
        check_policy(node, &self.domain, &cas, traffic_policy.as_deref())?;
        self.mutual_tls_cas = cas;
        self.traffic_policy_sealed = traffic_policy.map(|t| node.seal(t.as_bytes()));
        Ok(self)
    }

    fn json(&self, node: &ClusterNode, id: &str) -> Value {
        json!({
            "id": id,
            "uri": format!("/endpoint_policies/{id}"),
            "created_at": self.created_at,
            "description": self.description,
            "metadata": self.metadata,
            "domain": self.domain,
            "mutual_tls_cas": self.mutual_tls_cas,
            "traffic_policy": self.traffic_policy(node),
        })
    }
}
