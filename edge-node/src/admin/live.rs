//! What is online, and where: `/endpoints` (every endpoint this node's
//! gateway routes: its own agents' and, in a cluster, those served through
//! other nodes) and `/tunnel_sessions` (every agent session of the
//! cluster, or of this node without one), in ngrok's shapes plus the
//! serving `region` and `node_id`. `POST /tunnel_sessions/{id}/stop`,
//! `/restart` and `/update` run ngrok's commands on a session of this
//! node, or ask the node holding it over the link between nodes.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use postern_ingress::{Endpoint, EndpointKind, Location};
use postern_proto::{ErrorCode, Failure};
use serde_json::{Value, json};

use super::{AdminState, empty, json_response, read_body};
use crate::{
    auth::CredentialRef,
    cluster::{SessionAd, session_ad},
    registry::SessionCommand,
};

fn listing(key: &str, items: Vec<Value>) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &json!({ key: items, "uri": format!("/{key}"), "next_page_uri": null }),
    )
}

fn one(items: Vec<Value>, what: &str, id: &str) -> Result<Response<Full<Bytes>>, Failure> {
    items
        .into_iter()
        .find(|item| item["id"] == id)
        .map(|item| json_response(StatusCode::OK, &item))
        .ok_or_else(|| Failure::new(ErrorCode::API_NOT_FOUND, format!("no {what} {id}")))
}

fn endpoint_json(endpoint: &Endpoint, here: &Location) -> Value {
    let at = endpoint.remote.as_ref().unwrap_or(here);
    let session = endpoint.source.session_id();
    let (hostport, port) = match &endpoint.kind {
        EndpointKind::Tcp { port } => (endpoint.public_url.trim_start_matches("tcp://"), *port),
        _ => {
            let host = endpoint.public_url.split_once("://").map_or("", |(_, h)| h);
            (host, 443)
        }
    };
    json!({
        "id": endpoint.id,
        "type": "ephemeral",
        "proto": endpoint.kind.scheme(),
        "public_url": endpoint.public_url,
        "hostport": if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:{port}") },
        "name": endpoint.name,
        "tunnel_session": { "id": session, "uri": format!("/tunnel_sessions/{session}") },
        "region": at.region,
        "node_id": at.node_id,
    })
}

/// `GET /endpoints`, `GET /endpoints/{id}`.
pub fn endpoints(
    state: &AdminState,
    method: &Method,
    rest: &[&str],
) -> Result<Response<Full<Bytes>>, Failure> {
    let here = state.registry.location();
    let items: Vec<Value> = state
        .registry
        .gateway()
        .endpoints()
        .iter()
        .map(|e| endpoint_json(e, &here))
        .collect();
    match (method, rest) {
        (&Method::GET, []) => Ok(listing("endpoints", items)),
        (&Method::GET, [id]) => one(items, "endpoint", id),
        _ => Err(Failure::new(ErrorCode::API_METHOD, "use GET")),
    }
}

fn session_json(id: &str, at: &Location, ad: &SessionAd) -> Value {
    json!({
        "id": id,
        "uri": format!("/tunnel_sessions/{id}"),
        "agent_version": ad.agent_version,
        "os": ad.os,
        "ip": ad.ip,
        "started_at": ad.started_at,
        "credential": ad.credential_id.as_ref().map(|c| json!({ "id": c, "uri": CredentialRef::uri(c) })),
        "region": at.region,
        "node_id": at.node_id,
    })
}

/// `GET /tunnel_sessions`, `GET /tunnel_sessions/{id}`,
/// `POST /tunnel_sessions/{id}/restart`, `/stop` and `/update` (body
/// `{"version": …, "permit_major_version": …}`, both optional).
pub async fn sessions(
    state: &AdminState,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Full<Bytes>>, Failure> {
    let method = &req.method().clone();
    let items: Vec<Value> = match &state.cluster {
        Some(node) => node
            .live::<SessionAd>()
            .iter()
            .map(|l| {
                let at = Location {
                    node_id: l.node.node_id.clone(),
                    region: l.node.region.clone(),
                };
                session_json(&l.id, &at, &l.value)
            })
            .collect(),
        None => {
            let here = state.registry.location();
            state
                .registry
                .sessions()
                .iter()
                .map(|s| session_json(&s.id, &here, &session_ad(s)))
                .collect()
        }
    };
    match (method, rest) {
        (&Method::GET, []) => Ok(listing("tunnel_sessions", items)),
        (&Method::GET, [id]) => one(items, "tunnel session", id),
        (&Method::POST, [id, action @ ("restart" | "stop" | "update")]) => {
            let command = match *action {
                "restart" => SessionCommand::Restart,
                "stop" => SessionCommand::Stop,
                _ => update_command(&read_body(req).await?)?,
            };
            if let Some(session) = state.registry.session(id) {
                state.registry.command(&session, command).await?;
                return Ok(empty(StatusCode::NO_CONTENT));
            }
            let remote = match &state.cluster {
                Some(node) => node.remote_command(id, &command).await,
                None => None,
            };
            match remote {
                Some(result) => result.map(|()| empty(StatusCode::NO_CONTENT)),
                None => Err(Failure::new(
                    ErrorCode::API_NOT_FOUND,
                    format!("no tunnel session {id}"),
                )),
            }
        }
        _ => Err(Failure::new(
            ErrorCode::API_METHOD,
            "use GET, or POST .../restart, .../stop or .../update",
        )),
    }
}

/// `POST …/update`'s body: ngrok's `version` and `permit_major_version`,
/// both optional, nothing else.
fn update_command(body: &[u8]) -> Result<SessionCommand, Failure> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Update {
        version: String,
        permit_major_version: bool,
    }
    let update: Update = if body.iter().all(u8::is_ascii_whitespace) {
        Update::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            Failure::new(
                ErrorCode::API_BAD_REQUEST,
                format!(
                    "the update's body must be {{\"version\": …, \"permit_major_version\": …}}: {e}"
                ),
            )
        })?
    };
    Ok(SessionCommand::Update {
        version: update.version,
        permit_major_version: update.permit_major_version,
    })
}
