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
mod json;
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

/// RFC 3339 in UTC with nanoseconds, as humantime's
/// `format_rfc3339_nanos` writes it (`2026-12-07T06:59:32.180819448Z`),
/// without the formatting machinery: an HTTP event has up to six. Times
/// before 1970 are written as 1970's first instant, after 9999 as its
/// last (an event never has them; a certificate's end might).
pub fn timestamp(at: SystemTime) -> Timestamp {
    /// 10000-01-01T00:00:00Z, in seconds since the epoch.
    const YEAR_10000: u64 = 253_402_300_800;
    let (secs, nanos) = match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => (d.as_secs(), d.subsec_nanos()),
        Ok(_) => (YEAR_10000 - 1, 999_999_999),
        Err(_) => (0, 0),
    };
    let (year, month, day) = civil_date(secs / 86_400);
    let time = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for b in text[at..at + width].iter_mut().rev() {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, time / 3600);
    put(14, 2, time / 60 % 60);
    put(17, 2, time % 60);
    put(20, 9, u64::from(nanos));
    std::str::from_utf8(&text).expect("digits").to_owned()
}

/// Year, month and day of the `days`th day after 1970-01-01 (the
/// proleptic Gregorian calendar, by Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Days since 0000-03-01, in 400-year eras of 146,097 days.
    let z = days + 719_468;
    let (era, day_of_era) = (z / 146_097, z % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March.
    let m = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * m + 2) / 5 + 1;
    let month = if m < 10 { m + 3 } else { m - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
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
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn timestamps_are_written_as_humantime_writes_them() {
        let last = 253_402_300_799u64;
        let mut times = vec![
            (0, 0),
            (0, 999_999_999),
            (951_782_400, 1),   // 2000-02-29
            (951_868_800, 10),  // 2000-03-01
            (4_107_542_400, 5), // 2100-03-01
            (1_796_600_372, 180_819_448),
            (last, 999_999_999),
        ];
        // xorshift64, seeded: the same times every run.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            times.push((state % (last + 1), (state >> 20) as u32 % 1_000_000_000));
        }
        for (secs, nanos) in times {
            let at = UNIX_EPOCH + Duration::new(secs, nanos);
            assert_eq!(
                timestamp(at),
                humantime::format_rfc3339_nanos(at).to_string()
            );
        }
    }

    #[test]
    fn timestamps_out_of_rfc_3339s_range_are_clamped_to_it() {
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(timestamp(before), "1970-01-01T00:00:00.000000000Z");
        let after = UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
        assert_eq!(timestamp(after), "9999-12-31T23:59:59.999999999Z");
    }

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
