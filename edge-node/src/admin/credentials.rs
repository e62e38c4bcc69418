//! `/credentials`: authtokens created through the API (ngrok's Credential
//! object), kept in the cluster as SHA-256 hashes with their `acl`, so an
//! agent may use one at any node; a delete at any node closes its sessions
//! at every node. Needs `[cluster]`.
//!
//! - `POST /credentials` `{description, metadata, acl}`: `201`, the token
//!   shown this once
//! - `GET /credentials`, `GET /credentials/{id}`
//! - `DELETE /credentials/{id}`: `204`, or `404`

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminState, empty, json_response, read_body};
use crate::cluster::{ClusterNode, Credential};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCredential {
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: String,
    /// ngrok's rules, e.g. `bind:*.customer1.example.com`; none: any name.
    #[serde(default)]
    acl: Vec<String>,
}

fn credential_json(id: &str, c: &Credential, token: Option<&str>) -> Value {
    json!({
        "id": id,
        "uri": format!("/credentials/{id}"),
        "created_at": c.created_at,
        "description": c.description,
        "metadata": c.metadata,
        "token": token,
        "acl": c.acl,
        "owner_id": null,
    })
}

fn not_found(id: &str) -> Failure {
    Failure::new(ErrorCode::API_NOT_FOUND, format!("no credential {id}"))
}

pub async fn handle(
    state: &AdminState,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Full<Bytes>>, Failure> {
    let cluster: &ClusterNode = state.cluster.as_deref().ok_or_else(|| {
        Failure::new(
            ErrorCode::API_NOT_FOUND,
            "/credentials needs a [cluster] table in the edge config",
        )
    })?;
    match (req.method().clone(), rest) {
        (Method::POST, []) => {
            let body = read_body(req).await?;
            let new: NewCredential = serde_json::from_slice(&body)
                .map_err(|e| Failure::new(ErrorCode::API_BAD_REQUEST, format!("body: {e}")))?;
            let (id, token, credential) = cluster
                .create_credential(new.acl, new.description, new.metadata)
                .await?;
            tracing::info!(id, "credential created");
            Ok(json_response(
                StatusCode::CREATED,
                &credential_json(&id, &credential, Some(&token)),
            ))
        }
        (Method::GET, []) => Ok(json_response(
            StatusCode::OK,
            &json!({
                "credentials": cluster
                    .credentials()
                    .iter()
                    .map(|(id, c)| credential_json(id, c, None))
                    .collect::<Vec<_>>(),
                "uri": "/credentials",
                "next_page_uri": null,
            }),
        )),
        (Method::GET, [id]) => cluster
            .credentials()
            .iter()
            .find(|(i, _)| i == id)
            .map(|(i, c)| json_response(StatusCode::OK, &credential_json(i, c, None)))
            .ok_or_else(|| not_found(id)),
        (Method::DELETE, [id]) => match cluster.delete_credential(id).await? {
            true => {
                tracing::info!(id, "credential deleted");
                Ok(empty(StatusCode::NO_CONTENT))
            }
            false => Err(not_found(id)),
        },
        _ => Err(Failure::new(
            ErrorCode::API_METHOD,
            "use GET, POST or DELETE",
        )),
    }
}
