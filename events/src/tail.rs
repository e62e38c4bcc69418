//! `postern events tail`: reads event topics with a consumer group and
//! prints each event as one JSON line, optionally only some types or
//! those a CEL filter (the subscription language) matches.

use std::{future::Future, io::Write, time::Duration};

use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
};

use crate::{EventType, Filter, FilterInput, metrics::LogLimiter};

/// What to read and print.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    pub topics: Vec<String>,
    /// The consumer group; its committed offsets say where to resume.
    pub group: String,
    /// Without committed offsets: start at the oldest event (else at new ones).
    pub from_beginning: bool,
    /// Only these event types (all when empty).
    pub types: Vec<EventType>,
    pub filter: Option<Filter>,
    /// Stop after printing this many.
    pub max_events: Option<u64>,
    /// More librdkafka settings (`security.protocol`, `session.timeout.ms`, …).
    pub properties: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Prints events to `out` until `stop` resolves or `max_events` were
/// printed; returns how many were printed.
pub async fn tail(
    options: &TailOptions,
    out: &mut (dyn Write + Send),
    stop: impl Future<Output = ()>,
) -> Result<u64, TailError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("group.id", &options.group)
        .set(
            "auto.offset.reset",
            if options.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        )
        // Kafka brokers refuse sessions under 6 s by default.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000");
    for (key, value) in &options.properties {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config.create()?;
    let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tokio::pin!(stop);
    let warnings = LogLimiter::new(Duration::from_secs(10));
    let mut printed = 0u64;
    while options.max_events.is_none_or(|max| printed < max) {
        let message = tokio::select! {
            _ = &mut stop => break,
            m = consumer.recv() => m,
        };
        // A missing topic or a broker away is worth a warning, not an exit:
        // the consumer keeps trying.
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                if let Some(n) = warnings.hit() {
                    tracing::warn!(error = %e, occurrences = n, "Kafka consumer");
                }
                continue;
            }
        };
        let Some(payload) = message.payload() else {
            continue;
        };
        let event: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(topic = message.topic(), offset = message.offset(), error = %e, "not a JSON event; skipped");
                continue;
            }
        };
        let event_type = event["event_type"].as_str().and_then(EventType::parse);
        if !options.types.is_empty() && !event_type.is_some_and(|t| options.types.contains(&t)) {
            continue;
        }
        if let Some(filter) = &options.filter {
            match filter.matches(&FilterInput::of_json(&event)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the filter failed on an event; skipped");
                    continue;
                }
            }
        }
        // As produced: one line, the producer's field order.
        out.write_all(payload.trim_ascii())?;
        out.write_all(b"\n")?;
        out.flush()?;
        printed += 1;
    }
    // Commit what was printed before leaving the group.
    if printed > 0 {
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    }
    Ok(printed)
}
