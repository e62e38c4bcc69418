//! The JSON Schemas of both events (`events/schemas/`, draft 2020-12), and
//! the field paths they define, which is what a field selection may name.

use std::{collections::BTreeSet, sync::LazyLock};

use serde_json::Value;

use crate::EventType;

/// `events/schemas/http_request_complete.v0.json`
pub const HTTP_REQUEST_COMPLETE_SCHEMA: &str =
    include_str!("../schemas/http_request_complete.v0.json");
/// `events/schemas/tcp_connection_closed.v0.json`
pub const TCP_CONNECTION_CLOSED_SCHEMA: &str =
    include_str!("../schemas/tcp_connection_closed.v0.json");

/// The JSON Schema of an event type.
pub fn schema(event_type: EventType) -> &'static str {
    match event_type {
        EventType::HttpRequestComplete => HTTP_REQUEST_COMPLETE_SCHEMA,
        EventType::TcpConnectionClosed => TCP_CONNECTION_CLOSED_SCHEMA,
    }
}

/// Every dotted path under `object` the schema defines: leaves
/// (`http.request.method`) and the objects above them (`http.request`).
pub fn field_paths(event_type: EventType) -> &'static BTreeSet<String> {
    static HTTP: LazyLock<BTreeSet<String>> =
        LazyLock::new(|| paths_of(HTTP_REQUEST_COMPLETE_SCHEMA));
    static TCP: LazyLock<BTreeSet<String>> =
        LazyLock::new(|| paths_of(TCP_CONNECTION_CLOSED_SCHEMA));
    match event_type {
        EventType::HttpRequestComplete => &HTTP,
        EventType::TcpConnectionClosed => &TCP,
    }
}

fn paths_of(schema: &str) -> BTreeSet<String> {
    let root: Value = serde_json::from_str(schema).expect("the bundled schema is JSON");
    let object = &root["properties"]["object"];
    let mut out = BTreeSet::new();
    walk(&root, object, "", &mut out);
    out
}

fn walk(root: &Value, node: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let node = resolve(root, node);
    let Some(properties) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, child) in properties {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        out.insert(path.clone());
        walk(root, child, &path, out);
    }
}

/// Follows a local `$ref` (`#/$defs/name`).
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            root.pointer(pointer)
                .expect("the bundled schema's $ref resolves")
        }
        None => node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_come_from_the_schema() {
        let http = field_paths(EventType::HttpRequestComplete);
        for path in [
            "conn.server_name",
            "http.request.url.path",
            "http.request.headers",
            "tls.client_cert.subject.cn",
            "ip_policy.decision",
            "traffic_policy.logs",
            "postern.error_code",
            "postern.client_cert.sha256_fingerprint",
        ] {
            assert!(http.contains(path), "{path}");
        }
        let tcp = field_paths(EventType::TcpConnectionClosed);
        assert!(tcp.contains("conn.bytes_in"));
        assert!(!tcp.contains("http.request.method"));
        assert!(!http.contains("conn.bytes_in"));
    }

    #[test]
    fn schemas_are_draft_2020_12_and_compile() {
        for t in EventType::ALL {
            let schema: Value = serde_json::from_str(schema(t)).unwrap();
            assert_eq!(
                schema["$schema"],
                "https://json-schema.org/draft/2020-12/schema"
            );
            assert_eq!(schema["properties"]["event_type"]["const"], t.as_str());
            jsonschema::draft202012::new(&schema).expect("schema compiles");
        }
    }
}
