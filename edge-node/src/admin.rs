//! The edge's admin API: HTTP + JSON on its own listener, bearer API keys,
//! ngrok's resource shapes and error body
//! (`{"error_code", "status_code", "msg", "details"}`).
//!
//! Resources: `/certificate_authorities` (POST a PEM body or JSON
//! `{ca_pem, description, metadata}`; GET list; GET `/{id}` or
//! `/{id},{id}`; DELETE `/{id}`); `/oauth_sessions` (GET `?user_id=` or
//! `?email=`; DELETE `/{id}`, or `?user_id=` for all of a user's).
//!
//! `/endpoints` and `/tunnel_sessions` (`live`): what is online, and
//! where. In a cluster: `/credentials`, `/bot_users`, `/reserved_domains`,
//! `/agent_ingresses`, `/endpoint_policies`, `/event_subscriptions` and
//! `/tls_certificates` (`objects`, `tls_certificates`).
//!
//! In a cluster, every write goes to the cluster and reaches every node.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use postern_proto::{ErrorCode, Failure};
use serde_json::{Value, json};

use crate::{
    ca_store::{CaRecord, CaStore, NewCa, StoredCa},
    cluster::{
        AgentIngress, BotUser, ClusterNode, Credential, EndpointPolicyRecord, EventSubscription,
        ReservedDomain, SshCredential, TlsCertificate,
    },
};

mod live;
mod oauth_sessions;
mod objects;
mod tls_certificates;

/// Largest request body.
const MAX_BODY: usize = 1024 * 1024;

/// Everything the API serves.
pub struct AdminState {
    /// SHA-256 of each accepted API key.
    pub key_hashes: Vec<[u8; 32]>,
    pub cas: Arc<CaStore>,
    /// OAuth sessions, for listing and revocation.
    pub oauth: Arc<postern_ingress::OAuthService>,
    /// Where CA writes go when the node is in a cluster.
    pub cluster: Option<Arc<ClusterNode>>,
    /// This node's sessions and the endpoints its gateway routes.
    pub registry: Arc<crate::registry::Registry>,
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// ngrok's error body.
fn error(failure: &Failure) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(failure.code.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(
        status,
        &json!({
            "error_code": failure.code.id(),
            "status_code": status.as_u16(),
            "msg": failure.detail,
            "details": {},
        }),
    )
}

fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(key) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let hash = ring::digest::digest(&ring::digest::SHA256, key.trim().as_bytes());
    state.key_hashes.iter().any(|k| {
        k.iter()
            .zip(hash.as_ref())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    })
}

/// Answers one request (served by `crate::http_server`).
pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let state = &*state;
    if !authorized(state, &req) {
        tracing::info!(%peer, path = req.uri().path(), "admin API: missing or wrong API key");
        return error(&Failure::new(
            ErrorCode::API_UNAUTHORIZED,
            "send Authorization: Bearer <api key>",
        ));
    }
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (method, segments.as_slice()) {
        (Method::POST, ["certificate_authorities"]) => create_ca(state, req).await,
        (Method::GET, ["certificate_authorities"]) => Ok(json_response(
            StatusCode::OK,
            &json!({
                "certificate_authorities": state.cas.list().iter().map(ca_json).collect::<Vec<_>>(),
                "uri": "/certificate_authorities",
                "next_page_uri": null,
            }),
        )),
        (Method::GET, ["certificate_authorities", ids]) => get_cas(state, ids),
        (Method::DELETE, ["certificate_authorities", id]) => match delete_ca(state, id).await {
            Ok(true) => {
                tracing::info!(id, "certificate authority deleted");
                Ok(empty(StatusCode::NO_CONTENT))
            }
            Ok(false) => Err(Failure::new(
                ErrorCode::API_NOT_FOUND,
                format!("no certificate authority {id}"),
            )),
            Err(f) => Err(f),
        },
        (_, ["certificate_authorities", ..]) => Err(Failure::new(
            ErrorCode::API_METHOD,
            "use GET, POST or DELETE",
        )),
        (_, ["oauth_sessions", ..]) => oauth_sessions::handle(state, req, &segments[1..]).await,
        (_, ["credentials", ..]) => objects::handle::<Credential>(state, req, &segments[1..]).await,
        (_, ["ssh_credentials", ..]) => {
            objects::handle::<SshCredential>(state, req, &segments[1..]).await
        }
        (_, ["bot_users", ..]) => objects::handle::<BotUser>(state, req, &segments[1..]).await,
        (_, ["reserved_domains", ..]) => {
            objects::handle::<ReservedDomain>(state, req, &segments[1..]).await
        }
        (_, ["agent_ingresses", ..]) => {
            objects::handle::<AgentIngress>(state, req, &segments[1..]).await
        }
        (_, ["endpoint_policies", ..]) => {
            objects::handle::<EndpointPolicyRecord>(state, req, &segments[1..]).await
        }
        (_, ["tls_certificates", ..]) => {
            objects::handle::<TlsCertificate>(state, req, &segments[1..]).await
        }
        (_, ["event_subscriptions", ..]) => {
            objects::handle::<EventSubscription>(state, req, &segments[1..]).await
        }
        (_, ["endpoints", ..]) => live::endpoints(state, req.method(), &segments[1..]),
        (_, ["tunnel_sessions", ..]) => live::sessions(state, req, &segments[1..]).await,
        _ => Err(Failure::new(
            ErrorCode::API_NOT_FOUND,
            format!("no resource at {path}"),
        )),
    };
    result.unwrap_or_else(|failure| error(&failure))
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Failure> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("reading the body: {e}")))
}

async fn create_ca(
    state: &AdminState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Failure> {
    let json_body = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = read_body(req).await?;
    let new = if json_body || body.first() == Some(&b'{') {
        serde_json::from_slice::<NewCa>(&body)
            .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("body: {e}")))?
    } else {
        NewCa {
            ca_pem: String::from_utf8(body.to_vec()).map_err(|_| {
                Failure::new(ErrorCode::API_BAD_REQUEST, "the PEM body is not UTF-8")
            })?,
            ..Default::default()
        }
    };
    let stored = match &state.cluster {
        Some(cluster) => {
            let stored = state.cas.prepare(new)?;
            cluster.put_object(&stored.id, &stored.record()).await?;
            stored
        }
        None => state.cas.insert(new)?,
    };
    tracing::info!(id = %stored.id, subject = %stored.ca.subject, "certificate authority stored");
    Ok(json_response(StatusCode::CREATED, &ca_json(&stored)))
}

async fn delete_ca(state: &AdminState, id: &str) -> Result<bool, Failure> {
    match &state.cluster {
        Some(cluster) => cluster.delete_object::<CaRecord>(id).await,
        None => state.cas.delete(id),
    }
}

fn get_cas(state: &AdminState, ids: &str) -> Result<Response<Full<Bytes>>, Failure> {
    let wanted: Vec<&str> = ids.split(',').filter(|s| !s.is_empty()).collect();
    let mut found = Vec::new();
    for id in &wanted {
        let stored = state.cas.get_stored(id).ok_or_else(|| {
            Failure::new(
                ErrorCode::API_NOT_FOUND,
                format!("no certificate authority {id}"),
            )
        })?;
        found.push(ca_json(&stored));
    }
    Ok(match found.len() {
        1 => json_response(StatusCode::OK, &found.remove(0)),
        _ => json_response(
            StatusCode::OK,
            &json!({ "certificate_authorities": found, "uri": format!("/certificate_authorities/{ids}") }),
        ),
    })
}

fn rfc3339(secs: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// ngrok's CertificateAuthority object, plus Tyk's fingerprint and issuer.
fn ca_json(stored: &StoredCa) -> Value {
    let ca = &stored.ca;
    json!({
        "id": stored.id,
        "uri": format!("/certificate_authorities/{}", stored.id),
        "created_at": stored.created_at,
        "description": stored.description,
        "metadata": stored.metadata,
        "fingerprint": ca.fingerprint,
        "subject": ca.subject,
        "subject_common_name": ca.subject_common_name,
        "issuer": ca.issuer,
        "not_before": rfc3339(ca.not_before),
        "not_after": rfc3339(ca.not_after),
        "key_usages": ca.key_usages,
        "extended_key_usages": ca.extended_key_usages,
        "has_private_key": stored.has_private_key(),
    })
}
