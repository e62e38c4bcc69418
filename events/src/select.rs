//! Field selection: a subscription keeps only the fields it names, as
//! ngrok's selectable fields do. The envelope is always kept; naming an
//! object (`http.request`) keeps everything under it.

use serde_json::{Map, Value};

use crate::{EventType, field_paths};

/// A validated list of dotted paths under `object`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSelection {
    paths: Vec<Vec<String>>,
}

impl FieldSelection {
    /// Checks every path against the event type's schema; the error is the
    /// first unknown path.
    pub fn new(event_type: EventType, paths: &[String]) -> Result<FieldSelection, String> {
        let known = field_paths(event_type);
        let mut out: Vec<Vec<String>> = Vec::new();
        for path in paths {
            if !known.contains(path) {
                return Err(path.clone());
            }
            let segments: Vec<String> = path.split('.').map(str::to_string).collect();
            if !out.contains(&segments) {
                out.push(segments);
            }
        }
        Ok(FieldSelection { paths: out })
    }

    /// The selected paths, dotted, as written (duplicates once).
    pub fn paths(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.join(".")).collect()
    }

    /// Prunes `object` of an event (as JSON) to the selected fields.
    pub fn apply(&self, event: &mut Value) {
        let Some(object) = event.get_mut("object") else {
            return;
        };
        let old = std::mem::take(object);
        let mut kept = Map::new();
        for path in &self.paths {
            if let Some(value) = get(&old, path) {
                insert(&mut kept, path, value.clone());
            }
        }
        *object = Value::Object(kept);
    }
}

fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, segment| v.get(segment))
}

fn insert(into: &mut Map<String, Value>, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            into.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let child = into
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(map) = child {
                insert(map, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keeps_what_is_named_and_the_envelope() {
        let sel = FieldSelection::new(
            EventType::HttpRequestComplete,
            &[
                "conn.server_name".into(),
                "http.response".into(),
                "tls.version".into(),
                "conn.server_name".into(),
            ],
        )
        .unwrap();
        let mut event = json!({
            "event_id": "ev_x", "event_type": "http_request_complete.v0",
            "event_timestamp": "t", "principal": null,
            "object": {
                "conn": {"server_name": "a", "client_ip": "1.2.3.4"},
                "http": {"request": {"method": "GET"}, "response": {"status_code": 200, "body_length": 5}},
                "postern": {"node_id": "n"}
            }
        });
        sel.apply(&mut event);
        assert_eq!(
            event,
            json!({
                "event_id": "ev_x", "event_type": "http_request_complete.v0",
                "event_timestamp": "t", "principal": null,
                "object": {
                    "conn": {"server_name": "a"},
                    "http": {"response": {"status_code": 200, "body_length": 5}}
                }
            })
        );
    }

    #[test]
    fn unknown_paths_are_named() {
        assert_eq!(
            FieldSelection::new(
                EventType::TcpConnectionClosed,
                &["conn.bytes_in".into(), "http.request.method".into()]
            ),
            Err("http.request.method".to_string())
        );
        assert!(
            FieldSelection::new(EventType::HttpRequestComplete, &["conn.nope".into()]).is_err()
        );
    }
}
