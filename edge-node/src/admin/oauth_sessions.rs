//! `/oauth_sessions`: the OAuth sessions in the shared store, by user, and
//! their revocation (in the spirit of ngrok's App Users / session
//! revocation). Sessions live in Redis, so a revocation on any node ends
//! the session on every node of every region at once.
//!
//! - `GET /oauth_sessions?user_id=<id>` or `?email=<address>`: a list
//! - `DELETE /oauth_sessions/{id}`: one session (`204`, or `404`)
//! - `DELETE /oauth_sessions?user_id=<id>`: all of a user's (`{"deleted": n}`)

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use postern_ingress::{SessionQuery, SessionView, StoreError};
use postern_proto::{ErrorCode, Failure};
use serde_json::{Value, json};

use super::{AdminState, empty, json_response};

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    url_decode_pairs(req.uri().query()?)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// `application/x-www-form-urlencoded` pairs.
fn url_decode_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
            {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn unavailable(e: StoreError) -> Failure {
    Failure::new(ErrorCode::OAUTH_STORE_UNAVAILABLE, e.to_string())
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn session_json(view: &SessionView) -> Value {
    json!({
        "id": view.id,
        "uri": format!("/oauth_sessions/{}", view.id),
        "host": view.host,
        "provider": view.provider,
        "app_client_id": view.app_client_id,
        "user": {
            "id": view.user_id,
            "name": view.user_name,
            "email": view.user_email,
        },
        "created_at": rfc3339_ms(view.created_at_ms),
        "last_active": rfc3339_ms(view.last_active_ms),
        "last_checked": rfc3339_ms(view.last_checked_ms),
    })
}

pub(super) async fn handle(
    state: &AdminState,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Full<Bytes>>, Failure> {
    let oauth = &state.oauth;
    match (req.method().clone(), rest) {
        (Method::GET, []) => {
            let query = match (query_param(&req, "user_id"), query_param(&req, "email")) {
                (Some(id), None) => SessionQuery::UserId(id),
                (None, Some(email)) => SessionQuery::Email(email),
                _ => {
                    return Err(Failure::new(
                        ErrorCode::API_BAD_REQUEST,
                        "give exactly one of ?user_id= and ?email=",
                    ));
                }
            };
            let sessions = oauth.list_sessions(&query).await.map_err(unavailable)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "oauth_sessions": sessions.iter().map(session_json).collect::<Vec<_>>(),
                    "uri": format!("/oauth_sessions?{}", req.uri().query().unwrap_or("")),
                    "next_page_uri": null,
                }),
            ))
        }
        (Method::DELETE, []) => {
            let user_id = query_param(&req, "user_id").ok_or_else(|| {
                Failure::new(
                    ErrorCode::API_BAD_REQUEST,
                    "give ?user_id= to revoke a user's sessions",
                )
            })?;
            let deleted = oauth.revoke_user(&user_id).await.map_err(unavailable)?;
            tracing::info!(user = %user_id, deleted, "OAuth sessions revoked");
            Ok(json_response(
                StatusCode::OK,
                &json!({ "deleted": deleted }),
            ))
        }
        (Method::DELETE, [id]) => {
            if oauth.revoke(id).await.map_err(unavailable)? {
                tracing::info!(session = %id, "OAuth session revoked");
                Ok(empty(StatusCode::NO_CONTENT))
            } else {
                Err(Failure::new(
                    ErrorCode::API_NOT_FOUND,
                    format!("no OAuth session {id}"),
                ))
            }
        }
        _ => Err(Failure::new(ErrorCode::API_METHOD, "use GET or DELETE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            url_decode_pairs("email=a%40b.test&x&user_id=a+b"),
            vec![
                ("email".into(), "a@b.test".into()),
                ("x".into(), String::new()),
                ("user_id".into(), "a b".into())
            ]
        );
    }
}
