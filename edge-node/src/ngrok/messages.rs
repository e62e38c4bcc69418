//! The JSON messages of ngrok's agent protocol that the edge reads and
//! writes. Keys are matched without regard to case (the Rust and Go SDKs
//! spell some differently: `AuthToken`/`Authtoken`), unknown keys of the
//! envelopes are ignored, and the endpoint options are read key by key in
//! `bind.rs` so that none is ignored silently.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Stream types: the first 4 bytes of every stream.
pub mod stream_type {
    pub const AUTH: u32 = 0;
    pub const BIND: u32 = 1;
    pub const UNBIND: u32 = 2;
    pub const PROXY: u32 = 3;
    pub const RESTART: u32 = 4;
    pub const STOP: u32 = 5;
    pub const UPDATE: u32 = 6;
    pub const START_TUNNEL_WITH_LABEL: u32 = 7;
    pub const SRV_INFO: u32 = 8;
    pub const STOP_TUNNEL: u32 = 9;
    pub const PATCH_TUNNEL_STATE: u32 = 10;
    pub const HEARTBEAT: u32 = 0xFFFF_FFFF;
}

/// `value` with every object key lower-cased, at every depth.
pub fn lower_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), lower_keys(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(lower_keys).collect()),
        other => other,
    }
}

/// `Auth`, keys lower-cased.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Auth {
    pub clientid: String,
    pub extra: AuthExtra,
}

/// `AuthExtra`, keys lower-cased (so `AuthToken` and `Authtoken` alike).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthExtra {
    pub os: String,
    pub version: String,
    pub authtoken: String,
    pub useragent: String,
    pub metadata: String,
    /// Nanoseconds.
    pub heartbeatinterval: i64,
    /// Nanoseconds.
    pub heartbeattolerance: i64,
    pub clienttype: String,
    /// Whether the agent takes each command: absent from older agents,
    /// empty when it has a handler, else why not.
    pub restartunsupportederror: Option<String>,
    pub stopunsupportederror: Option<String>,
    pub updateunsupportederror: Option<String>,
}

/// `Update`, the only command with a body (`Restart` and `Stop` are `{}`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Update {
    pub version: String,
    pub permit_major_version: bool,
}

/// The agent's reply to a command, keys lower-cased.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CommandResp {
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AuthResp {
    pub version: String,
    pub client_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub extra: AuthRespExtra,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AuthRespExtra {
    pub version: String,
    pub region: String,
    pub cookie: String,
    pub account_name: String,
}

/// `Bind`, keys lower-cased; `Opts` is read in `bind.rs`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Bind {
    pub id: String,
    pub proto: String,
    pub forwardsto: String,
    pub forwardsproto: String,
    pub opts: Value,
    pub extra: BindExtra,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BindExtra {
    pub ippolicyref: String,
    pub metadata: String,
    pub bindings: Vec<String>,
    pub poolingenabled: bool,
    pub name: String,
    pub description: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BindResp {
    pub id: String,
    #[serde(rename = "URL")]
    pub url: String,
    pub proto: String,
    pub opts: Value,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub extra: BindRespExtra,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BindRespExtra {
    pub token: String,
    #[serde(rename = "TunnelID")]
    pub tunnel_id: String,
}

/// `Unbind` (and `StopTunnel`'s id), keys lower-cased.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Unbind {
    pub id: String,
}

/// The reply of Unbind, SrvInfo's refusals, commands and anything
/// refused: `{"Error": "..."}` (empty on success).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ErrorResp {
    pub error: String,
}

/// A refused `StartTunnelWithLabel`: the Rust SDK needs `Id` present.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StartTunnelWithLabelResp {
    pub id: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SrvInfoResp {
    pub region: String,
}

/// `StopTunnel`: the edge no longer serves one tunnel.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StopTunnel {
    pub id: String,
    pub message: String,
    pub error_code: String,
}

/// The header at the start of every visitor stream. All five keys must be
/// present; `EdgeType` is a string.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProxyHeader {
    pub id: String,
    pub client_addr: String,
    pub proto: String,
    pub edge_type: String,
    #[serde(rename = "PassthroughTLS")]
    pub passthrough_tls: bool,
}

/// An error text the SDKs read a code from: they take a line starting
/// with `ERR_NGROK_` as the code. Postern's numbers follow ngrok's, so the
/// line carries Postern's number; the message keeps `ERR_POSTERN_<n>`.
pub fn error_text(failure: &postern_proto::Failure) -> String {
    format!("{failure}\n\nERR_NGROK_{}", failure.code.number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_the_authtoken_key_are_read() {
        for key in ["AuthToken", "Authtoken", "authtoken"] {
            let json = format!(
                r#"{{"Version":["3","2"],"Extra":{{"{key}":"tok","ClientType":"ngrok-go"}}}}"#
            );
            let auth: Auth =
                serde_json::from_value(lower_keys(serde_json::from_str(&json).unwrap())).unwrap();
            assert_eq!(auth.extra.authtoken, "tok", "{key}");
            assert_eq!(auth.extra.clienttype, "ngrok-go");
        }
    }

    #[test]
    fn the_proxy_header_has_every_key_and_a_string_edge_type() {
        let header = ProxyHeader {
            id: "ep_1".into(),
            client_addr: "127.0.0.1:5000".into(),
            proto: "https".into(),
            edge_type: String::new(),
            passthrough_tls: false,
        };
        assert_eq!(
            serde_json::to_string(&header).unwrap(),
            r#"{"Id":"ep_1","ClientAddr":"127.0.0.1:5000","Proto":"https","EdgeType":"","PassthroughTLS":false}"#
        );
    }

    #[test]
    fn error_texts_carry_a_code_line() {
        let failure = postern_proto::Failure::new(
            postern_proto::ErrorCode::AUTHTOKEN_INVALID,
            "the authtoken is not valid",
        );
        let text = error_text(&failure);
        assert!(text.starts_with("ERR_POSTERN_107: the authtoken is not valid"));
        assert!(text.lines().any(|l| l == "ERR_NGROK_107"));
    }
}
