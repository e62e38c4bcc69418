//! Postern's traffic events: `http_request_complete.v0` and
//! `tcp_connection_closed.v0`, with ngrok's field names and nesting, their
//! JSON Schemas, the sink trait the edge publishes them through, and the
//! pipeline behind it: ngrok-style subscriptions (event types, CEL
//! filter, field selection) delivering to a JSON-lines file or, with the
//! `kafka` feature, to Kafka through a bounded on-disk spool. Publishing
//! never blocks the request path.
//!
//! This crate must never depend on the gateway or the edge: they build
//! events, this crate defines and delivers them.

mod cel_regex;
mod config;
mod event;
mod filter;
#[cfg(feature = "kafka")]
mod kafka;
mod memory;
mod metrics;
mod pipeline;
mod schema;
mod select;
#[cfg(feature = "kafka")]
mod spool;
#[cfg(feature = "kafka")]
mod tail;

use std::time::SystemTime;

pub use cel_regex::register_matches;
pub use config::{
    ApiSubscription, ByteSize, ConfigError, DEFAULT_TOPIC, Destination, EventsConfig,
    FileDestination, KafkaDestination, Limits, RawDestination, RawEventsConfig, RawFile, RawKafka,
    RawLimits, RawSource, RawSubscription, Source, Subscription, topic_name,
};
pub use event::*;
pub use filter::{FILTERABLE_FIELDS, Filter, FilterError, FilterInput};
pub use memory::MemorySink;
pub use metrics::{EventMetrics, MetricsSnapshot};
pub use pipeline::{
    EventPipeline, EventsError, MetricsHandle, RuntimeSubscriptions, ShutdownReport, event_key,
};
pub use schema::{HTTP_REQUEST_COMPLETE_SCHEMA, TCP_CONNECTION_CLOSED_SCHEMA, field_paths, schema};
pub use select::FieldSelection;
#[cfg(feature = "kafka")]
pub use tail::{TailError, TailOptions, tail};

/// Where events go. `publish` must return at once: a sink queues, spools or
/// drops (and counts), it never makes a request wait.
pub trait EventSink: Send + Sync + 'static {
    fn publish(&self, event: Event);

    /// Whether an event of `event_type` published now would go anywhere:
    /// a producer may skip gathering what no subscription takes.
    fn wants(&self, event_type: EventType) -> bool {
        let _ = event_type;
        true
    }
}

/// RFC 3339 in UTC with nanoseconds (`2026-12-07T00:37:20.447995892Z`),
/// as `humantime::format_rfc3339_nanos` writes it, digit by digit: an
/// event has four or five of them, and the formatting machinery cost more
/// than the rest of building one. A time before 1970 is written as the
/// epoch (humantime would panic on it), one after 9999 with more digits.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let (hour, minute, second) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
    let nanos = u64::from(since.subsec_nanos());
    if year > 9999 {
        // Past what four digits hold (humantime refuses these).
        return format!("{year}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{nanos:09}Z");
    }
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    // (where the field ends, its width, its value)
    let fields = [
        (4, 4, year),
        (7, 2, month),
        (10, 2, day),
        (13, 2, hour),
        (16, 2, minute),
        (19, 2, second),
        (29, 9, nanos),
    ];
    for (end, width, mut value) in fields {
        for digit in text[end - width..end].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The proleptic Gregorian date (year, month, day) of `days` after
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `ev_` + 27 base-62 characters.
pub fn event_id() -> String {
    postern_net::random_id("ev_")
}

impl Event {
    /// A new `http_request_complete.v0`.
    pub fn http(object: HttpRequestComplete, at: SystemTime, account_id: Option<String>) -> Event {
        Event::new(
            HTTP_REQUEST_COMPLETE,
            EventObject::Http(Box::new(object)),
            at,
            account_id,
        )
    }

    /// A new `tcp_connection_closed.v0`.
    pub fn tcp(object: TcpConnectionClosed, at: SystemTime, account_id: Option<String>) -> Event {
        Event::new(
            TCP_CONNECTION_CLOSED,
            EventObject::Tcp(Box::new(object)),
            at,
            account_id,
        )
    }

    fn new(
        event_type: &str,
        object: EventObject,
        at: SystemTime,
        account_id: Option<String>,
    ) -> Event {
        Event {
            event_id: event_id(),
            event_type: event_type.to_string(),
            event_timestamp: timestamp(at),
            account_id,
            object,
            principal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let object = HttpRequestComplete {
            conn: Some(Conn {
                client_ip: Some("127.0.0.1".into()),
                server_port: Some(443),
                ..Default::default()
            }),
            ..Default::default()
        };
        let event = Event::http(object, SystemTime::UNIX_EPOCH, None);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event_type"], "http_request_complete.v0");
        assert_eq!(json["event_timestamp"], "1970-01-01T00:00:00.000000000Z");
        assert!(json["event_id"].as_str().unwrap().starts_with("ev_"));
        assert_eq!(json["event_id"].as_str().unwrap().len(), 30);
        assert_eq!(json["object"]["conn"]["client_ip"], "127.0.0.1");
        assert_eq!(json["object"]["conn"]["server_port"], 443);
        assert!(
            json["object"].get("http").is_none(),
            "absent fields are not written"
        );
        assert!(json["principal"].is_null());
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn timestamps_are_written_as_humantime_writes_them() {
        let at =
            |secs: u64, nanos: u32| SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        // The epoch, leap days, century years, the last moment of a year,
        // and the last second humantime writes (9999-12-31T23:59:59).
        let mut times = vec![
            at(0, 0),
            at(951_782_400, 1),             // 2000-02-29
            at(4_107_542_399, 999_999_999), // 2100-02-28T23:59:59
            at(4_107_542_400, 0),           // 2100-03-01
            at(946_684_799, 999_999_999),   // 1999-12-31T23:59:59
            at(253_402_300_799, 5),
        ];
        // And many others, spread from 1970 to 9999.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            times.push(at((x >> 11) % 253_402_300_800, (x % 1_000_000_000) as u32));
        }
        for t in times {
            assert_eq!(timestamp(t), humantime::format_rfc3339_nanos(t).to_string());
        }
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(1)),
            "1970-01-01T00:00:00.000000000Z",
            "before the epoch: the epoch"
        );
        assert_eq!(
            timestamp(at(253_402_300_800, 7)),
            "10000-01-01T00:00:00.000000007Z",
            "after 9999: five digits"
        );
    }

    #[test]
    fn headers_are_written_normalised_like_ngrok() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "Text/HTML".parse().unwrap());
        h.append("x-multi", "A".parse().unwrap());
        h.append("x-multi", "B".parse().unwrap());
        h.insert("x-unicode", "ÄBC Straße".parse().unwrap());
        // Longer than what is rewritten on the stack.
        let long = format!("x{}", "-long".repeat(30));
        h.insert(
            http::HeaderName::from_bytes(long.as_bytes()).unwrap(),
            "Z".repeat(200).parse().unwrap(),
        );
        h.insert(
            "x-bytes",
            http::HeaderValue::from_bytes(b"AB\xffC").unwrap(),
        );
        let json = serde_json::to_value(Headers::new(&h)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "Content-Type": ["text/html"],
                "X-Multi": ["a", "b"],
                "X-Unicode": ["äbc straße"],
                "X-Bytes": ["ab\u{FFFD}c"],
                format!("X{}", "-Long".repeat(30)): ["z".repeat(200)],
            })
        );
        let back: Headers = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            json,
            "read back, written the same"
        );
    }

    #[test]
    fn headers_that_are_not_http_headers_are_refused_by_name() {
        let e = serde_json::from_value::<Headers>(serde_json::json!({"Bad Name": ["x"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"Bad Name\" is not an HTTP header name"), "{e}");
        let e = serde_json::from_value::<Headers>(serde_json::json!({"X-A": ["a\nb"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("header x-a is not an HTTP header value"), "{e}");
    }
}
