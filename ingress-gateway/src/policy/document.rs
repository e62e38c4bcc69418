//! A Traffic Policy document as written: ngrok's YAML or JSON shape, with
//! the older phase names (`inbound`, `outbound`) accepted.

use serde::Deserialize;

/// The phases, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `on_tcp_connect`: every protocol, before any byte is forwarded.
    Connect,
    /// `on_http_request`: HTTP endpoints, before the request goes upstream.
    Request,
    /// `on_http_response`: HTTP endpoints, before the response goes back.
    Response,
}

impl Phase {
    pub fn key(self) -> &'static str {
        match self {
            Phase::Connect => "on_tcp_connect",
            Phase::Request => "on_http_request",
            Phase::Response => "on_http_response",
        }
    }
}

/// The document's top level. Unknown keys are refused, naming them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub on_tcp_connect: Vec<RawRule>,
    #[serde(default)]
    pub on_http_request: Vec<RawRule>,
    #[serde(default)]
    pub on_http_response: Vec<RawRule>,
    /// The name before agent 3.x for `on_http_request` (or, on TCP and TLS
    /// endpoints, `on_tcp_connect`).
    #[serde(default)]
    pub inbound: Vec<RawRule>,
    /// The name before agent 3.x for `on_http_response`.
    #[serde(default)]
    pub outbound: Vec<RawRule>,
}

/// One rule: when every expression holds, its actions run in order.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub expressions: Vec<String>,
    pub actions: Vec<RawAction>,
}

/// One action: its type and its config, checked by the action itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub config: serde_json::Value,
}

impl Document {
    /// Parses YAML or JSON (JSON is YAML).
    pub fn parse(text: &str) -> Result<Document, String> {
        if text.trim().is_empty() {
            return Ok(Document::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    /// Adds `other`'s rules after this document's, phase by phase.
    pub fn append(&mut self, other: Document) {
        self.on_tcp_connect.extend(other.on_tcp_connect);
        self.on_http_request.extend(other.on_http_request);
        self.on_http_response.extend(other.on_http_response);
        self.inbound.extend(other.inbound);
        self.outbound.extend(other.outbound);
    }

    /// The rules of each phase, with the older names merged in: `inbound`
    /// runs in `connect_or_request`, `outbound` in `on_http_response`.
    pub fn phases(self, http: bool) -> [(Phase, Vec<RawRule>); 3] {
        let Document {
            mut on_tcp_connect,
            mut on_http_request,
            mut on_http_response,
            inbound,
            outbound,
        } = self;
        if http {
            on_http_request.extend(inbound);
        } else {
            on_tcp_connect.extend(inbound);
        }
        on_http_response.extend(outbound);
        [
            (Phase::Connect, on_tcp_connect),
            (Phase::Request, on_http_request),
            (Phase::Response, on_http_response),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_json_and_the_old_names() {
        let yaml = "on_http_request:\n  - name: deny\n    expressions: [\"req.method == 'POST'\"]\n    actions:\n      - type: deny\n";
        let doc = Document::parse(yaml).unwrap();
        assert_eq!(doc.on_http_request[0].actions[0].kind, "deny");
        let json =
            r#"{"inbound": [{"actions": [{"type": "deny", "config": {"status_code": 404}}]}]}"#;
        let [(_, connect), (_, request), _] = Document::parse(json).unwrap().phases(false);
        assert_eq!((connect.len(), request.len()), (1, 0));
        assert!(
            Document::parse("on_http_requests: []")
                .unwrap_err()
                .contains("on_http_requests")
        );
        assert!(
            Document::parse("on_http_request: [{expressions: []}]")
                .unwrap_err()
                .contains("actions")
        );
    }
}
