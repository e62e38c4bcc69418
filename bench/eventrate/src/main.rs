//! `postern-eventrate`: how many `http_request_complete.v0` events per
//! second one node's event pipeline takes and delivers into Kafka.
//!
//! It starts the edge's own pipeline (`postern_events::EventPipeline`) with
//! one Kafka subscription, then publishes events shaped like the ones the
//! edge writes for a plain GET answered by nginx (the same fields, six
//! headers), built and published on one thread as the request path does,
//! at each offered rate in turn for a fixed time. After each step it waits
//! for the spool to empty. One JSON line per step on stdout:
//!
//! ```text
//! postern-eventrate --brokers 127.0.0.1:9092 --data-dir DIR \
//!     --rates 25000,50000,100000,max --seconds 10
//! ```
//!
//! `max` publishes as fast as one thread can; the pipeline drops (and
//! counts) what its queue has no room for, as it does under the edge.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use postern_events::{
    Conn, Event, EventPipeline, Headers, Http, HttpRequest, HttpRequestComplete, HttpResponse,
    MetricsSnapshot, PosternFields, RawEventsConfig, Url, timestamp,
};

/// Publishes events at each offered rate into a pipeline with one Kafka
/// subscription; one JSON line per step.
#[derive(clap::Parser)]
struct Args {
    /// The Kafka broker, `host:port`.
    #[arg(long)]
    brokers: String,
    /// Where the pipeline keeps its spool.
    #[arg(long)]
    data_dir: PathBuf,
    /// Events per second, in turn; `max` is as fast as one thread publishes.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate,
          default_value = "25000,50000,100000,max")]
    rates: Vec<Rate>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// How long to wait for the spool to empty after each rate.
    #[arg(long, default_value_t = 60)]
    drain_timeout_secs: u64,
}

/// Events per second; `None` is as fast as one thread publishes.
type Rate = Option<u64>;

fn parse_rate(text: &str) -> Result<Rate, String> {
    match text {
        "max" => Ok(None),
        _ => text
            .parse()
            .map(Some)
            .map_err(|_| format!("{text:?} is not a number of events per second or max")),
    }
}

/// The event the edge publishes for `GET /` answered by nginx with 100
/// bytes, with this moment's times.
fn event(request: &http::HeaderMap, response: &http::HeaderMap) -> Event {
    let now = SystemTime::now();
    let ts = Some(timestamp(now));
    let host = "off.postern.localhost";
    let object = HttpRequestComplete {
        conn: Some(Conn {
            client_ip: Some("127.0.0.1".into()),
            server_ip: Some("127.0.0.1".into()),
            server_name: Some(host.into()),
            server_port: Some(30080),
            start_ts: ts.clone(),
            ..Default::default()
        }),
        http: Some(Http {
            request: Some(HttpRequest {
                method: Some("GET".into()),
                version: Some("HTTP/1.1".into()),
                body_length: Some(0),
                headers: Some(Headers::new(request)),
                user_agent: Some("wrk".into()),
                url: Some(Url {
                    raw: Some(format!("http://{host}/")),
                    scheme: Some("http".into()),
                    host: Some(host.into()),
                    path: Some("/".into()),
                    query: None,
                }),
                first_byte_ts: None,
                last_byte_ts: None,
            }),
            response: Some(HttpResponse {
                status_code: Some(200),
                body_length: Some(100),
                headers: Some(Headers::new(response)),
                first_byte_ts: ts.clone(),
                last_byte_ts: ts,
            }),
        }),
        postern: Some(PosternFields {
            region: Some("us".into()),
            node_id: Some("edge-1".into()),
            serving_region: Some("us".into()),
            serving_node_id: Some("edge-1".into()),
            endpoint_id: Some("ep_2qAB5C7dE9fGhJkLmNpQrStUvWx".into()),
            agent_session_id: Some("ts_2qAB5C7dE9fGhJkLmNpQrStUvWy".into()),
            duration_ms: Some(0.081),
            ..Default::default()
        }),
        ..Default::default()
    };
    Event::http(object, now, None)
}

fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    pairs
        .iter()
        .map(|&(k, v)| {
            (
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            )
        })
        .collect()
}

/// The pipeline's totals and the Kafka subscription's own.
fn sample(pipeline: &EventPipeline) -> (MetricsSnapshot, MetricsSnapshot) {
    let kafka = pipeline
        .subscription_metrics()
        .into_iter()
        .find(|(id, _)| id == "kafka")
        .map(|(_, m)| m)
        .unwrap_or_default();
    (pipeline.metrics(), kafka)
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let raw: RawEventsConfig = serde_json::from_value(serde_json::json!({
        "subscriptions": [{
            "id": "kafka",
            "sources": [{ "type": "http_request_complete.v0" }],
            "destination": { "kafka": { "brokers": [args.brokers] } },
        }],
    }))
    .context("the benchmark's events config")?;
    let config = raw.validate().context("the benchmark's events config")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let pipeline =
        EventPipeline::start(&config, &args.data_dir).context("starting the pipeline")?;
    let sink = pipeline.publisher();
    let request = headers(&[("host", "off.postern.localhost"), ("user-agent", "wrk")]);
    let response = headers(&[
        ("server", "nginx/1.22.1"),
        ("date", "Sun, 06 Dec 2026 23:59:59 GMT"),
        ("content-type", "text/plain"),
        ("content-length", "100"),
        ("connection", "keep-alive"),
    ]);
    let step = Duration::from_secs(args.seconds);
    for rate in &args.rates {
        let (before, kafka_before) = sample(&pipeline);
        let started = Instant::now();
        let mut offered: u64 = 0;
        while started.elapsed() < step {
            let due = match rate {
                Some(r) => (started.elapsed().as_secs_f64() * *r as f64) as u64,
                None => offered + 256,
            };
            while offered < due {
                sink.publish(event(&request, &response));
                offered += 1;
            }
            if rate.is_some() {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let took = started.elapsed().as_secs_f64();
        let (after, kafka_after) = sample(&pipeline);
        let drain_started = Instant::now();
        let mut drained = kafka_after;
        while drained.spool_events > 0
            && drain_started.elapsed() < Duration::from_secs(args.drain_timeout_secs)
        {
            thread::sleep(Duration::from_millis(50));
            drained = sample(&pipeline).1;
        }
        let per_s = |n: u64| (n as f64 / took).round();
        println!(
            "{}",
            serde_json::json!({
                "rate": rate.map_or_else(|| "max".to_string(), |r| r.to_string()),
                "seconds": took,
                "offered_per_s": per_s(offered),
                "accepted_per_s": per_s(after.published - before.published),
                "dropped": after.dropped - before.dropped,
                "delivered_per_s": per_s(kafka_after.delivered - kafka_before.delivered),
                "failed": kafka_after.failed - kafka_before.failed,
                "spool_at_end": kafka_after.spool_events,
                "queue_peak_events": after.queue_peak_events,
                "drain_seconds": drain_started.elapsed().as_secs_f64(),
                "spool_after_drain": drained.spool_events,
            })
        );
    }
    Ok(())
}
