//! `deny` (a status and no body, or a closed connection) and
//! `close-connection`.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{Built, config};
use crate::policy::{
    ConnectAction, ConnectCx, Flow, Phase, PolicyEnv, RequestAction, RequestCx, respond,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyConfig {
    #[serde(default = "forbidden")]
    status_code: u16,
}

fn forbidden() -> u16 {
    403
}

/// Answers with a bare status (HTTP) or closes the connection.
struct Deny(Option<http::StatusCode>);

pub(super) fn deny(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: DenyConfig = config(value)?;
    let status = http::StatusCode::from_u16(cfg.status_code)
        .ok()
        .filter(|s| (400..600).contains(&s.as_u16()))
        .ok_or_else(|| {
            format!(
                "config.status_code: {} is not a 4xx or 5xx status",
                cfg.status_code
            )
        })?;
    Ok(match phase {
        Phase::Connect => Built::Connect(Box::new(Deny(None))),
        _ => Built::Request(Box::new(Deny(Some(status)))),
    })
}

pub(super) fn close(
    value: &serde_json::Value,
    phase: Phase,
    _: &PolicyEnv,
) -> Result<Built, String> {
    config::<EmptyConfig>(value)?;
    Ok(match phase {
        Phase::Connect => Built::Connect(Box::new(Deny(None))),
        _ => Built::Request(Box::new(Deny(None))),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyConfig {}

impl ConnectAction for Deny {
    fn on_connect(&self, _: &mut ConnectCx<'_>) -> Result<Flow, String> {
        Ok(Flow::Close)
    }
}

impl RequestAction for Deny {
    fn on_request<'a>(&'a self, _: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            Ok(match self.0 {
                Some(status) => Flow::Respond(respond(status, [], Bytes::new())),
                None => Flow::Close,
            })
        })
    }
}
