//! `rate-limit`: a sliding window per bucket key (the CEL expressions of
//! `bucket_key`, e.g. `conn.client_ip`): the count of the current window
//! plus the previous window's count weighted by how much of it still
//! overlaps. Past `capacity` per `rate`, visitors get `429` with
//! `Retry-After` (unless `enforce` is false), and
//! `actions.ngrok.rate_limit.limited` is true.
//!
//! Counts live in this node's memory, or, where the edge names a Redis
//! for rate limits, in Redis, shared by every node using it: there each
//! request is one `INCR` of the current window's key and a read of the
//! previous one, so concurrent requests at different nodes are counted
//! exactly and the estimate is the same everywhere. While Redis does not
//! answer, the node counts in its own memory (a per-node limit) and says
//! so in its log, rather than refuse or let through everything.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;
use http::HeaderValue;
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;

use super::{Built, at_most, config, duration};
use crate::{
    oauth::RedisStore,
    policy::{
        Flow, Phase, PolicyEnv, RequestAction, RequestCx,
        cel::{Expression, display, map_value},
    },
};

/// Counts per window: the current window's and the previous one's.
pub trait RateStore: Send + Sync + std::fmt::Debug {
    /// Counts one hit of `key` in window number `window` and returns
    /// (hits in the previous window, hits in this one, this one included).
    fn hit<'a>(
        &'a self,
        key: &'a str,
        window: u64,
        width: Duration,
    ) -> BoxFuture<'a, Result<(u64, u64), String>>;
}

/// This node's memory.
#[derive(Debug, Default)]
pub(crate) struct LocalRates {
    windows: Mutex<HashMap<String, (u64, u64, u64)>>,
}

/// Past this many keys, stale ones are dropped on the next hit.
const MAX_LOCAL_KEYS: usize = 100_000;

impl RateStore for LocalRates {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        window: u64,
        _: Duration,
    ) -> BoxFuture<'a, Result<(u64, u64), String>> {
        let mut windows = self.windows.lock().expect("rate windows lock");
        if windows.len() >= MAX_LOCAL_KEYS {
            windows.retain(|_, (w, _, _)| *w + 1 >= window);
        }
        // (window number, previous count, current count)
        let entry = windows.entry(key.to_string()).or_insert((window, 0, 0));
        if entry.0 != window {
            let previous = if entry.0 + 1 == window { entry.2 } else { 0 };
            *entry = (window, previous, 0);
        }
        entry.2 += 1;
        let counts = (entry.1, entry.2);
        Box::pin(async move { Ok(counts) })
    }
}

/// Counts in Redis, with this node's memory standing in while Redis does
/// not answer.
pub struct RedisRates {
    redis: Arc<RedisStore>,
    local: LocalRates,
}

impl RedisRates {
    pub fn new(redis: Arc<RedisStore>) -> RedisRates {
        RedisRates {
            redis,
            local: LocalRates::default(),
        }
    }
}

impl std::fmt::Debug for RedisRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisRates")
    }
}

impl RateStore for RedisRates {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        window: u64,
        width: Duration,
    ) -> BoxFuture<'a, Result<(u64, u64), String>> {
        Box::pin(async move {
            match self.redis.rate_hit(key, window, width).await {
                Ok(counts) => Ok(counts),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "rate-limit counts: Redis did not answer; this node counts alone until it does"
                    );
                    self.local.hit(key, window, width).await
                }
            }
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    name: String,
    #[serde(default = "yes")]
    enforce: bool,
    algorithm: String,
    capacity: u64,
    rate: String,
    bucket_key: Vec<String>,
}

fn yes() -> bool {
    true
}

struct RateLimit {
    name: String,
    enforce: bool,
    capacity: u64,
    width: Duration,
    keys: Vec<Expression>,
    store: Arc<dyn RateStore>,
}

pub(super) fn build(
    value: &serde_json::Value,
    phase: Phase,
    env: &PolicyEnv,
) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    if cfg.name.is_empty() || cfg.name.len() >= 1024 {
        return Err("config.name: 1 to 1023 characters".into());
    }
    if cfg.algorithm != "sliding_window" {
        return Err(format!(
            "config.algorithm: {:?}; the algorithm is sliding_window",
            cfg.algorithm
        ));
    }
    if !(1..=2_000_000_000).contains(&cfg.capacity) {
        return Err("config.capacity: 1 to 2000000000".into());
    }
    let width = duration("rate", Some(&cfg.rate), Duration::ZERO)?;
    if width < Duration::from_secs(1)
        || width > Duration::from_secs(24 * 3600)
        || width.subsec_nanos() != 0
    {
        return Err(
            "config.rate: whole seconds from 1s to 24h (ngrok asks for 60s or more, in 10 s steps)"
                .into(),
        );
    }
    if cfg.bucket_key.is_empty() {
        return Err("config.bucket_key: at least one expression".into());
    }
    at_most("bucket_key", &cfg.bucket_key, 10)?;
    let keys = cfg
        .bucket_key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            Expression::compile(k, phase).map_err(|e| format!("config.bucket_key[{i}]: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Built::Request(Box::new(RateLimit {
        name: cfg.name,
        enforce: cfg.enforce,
        capacity: cfg.capacity,
        width,
        keys,
        store: env.rates.clone(),
    })))
}

/// The weighted count of a sliding window: the previous window's hits that
/// still overlap it, plus this window's.
fn estimate(previous: u64, current: u64, into_window: Duration, width: Duration) -> f64 {
    let overlap = 1.0 - into_window.as_secs_f64() / width.as_secs_f64();
    previous as f64 * overlap.max(0.0) + current as f64
}

impl RequestAction for RateLimit {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        Box::pin(async move {
            let facts = cx.facts();
            let mut key = self.name.clone();
            for expression in &self.keys {
                key.push('\u{1f}');
                key.push_str(&display(&expression.eval(&facts)?));
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let width = self.width.as_secs();
            let window = now.as_secs() / width;
            let into = now - Duration::from_secs(window * width);
            let (previous, current) = self.store.hit(&key, window, self.width).await?;
            let limited = estimate(previous, current, into, self.width) > self.capacity as f64;
            cx.scratch.actions.insert(
                "rate_limit",
                map_value([("limited", cel::Value::Bool(limited))]),
            );
            if !(limited && self.enforce) {
                return Ok(Flow::Next);
            }
            // The rest of this window: the earliest the count can drop.
            let retry = (self.width - into).as_secs().max(1);
            let mut page = crate::http::error_response(&Failure::new(
                ErrorCode::RATE_LIMITED,
                format!("{} per {}s", self.capacity, width),
            ));
            page.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry));
            Ok(Flow::Respond(page))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_window_weighs_by_its_overlap() {
        let w = Duration::from_secs(60);
        assert_eq!(estimate(10, 1, Duration::ZERO, w), 11.0);
        assert_eq!(estimate(10, 1, Duration::from_secs(30), w), 6.0);
        assert_eq!(estimate(10, 1, Duration::from_secs(60), w), 1.0);
    }

    #[tokio::test]
    async fn local_windows_roll_over() {
        let rates = LocalRates::default();
        let w = Duration::from_secs(1);
        assert_eq!(rates.hit("k", 5, w).await, Ok((0, 1)));
        assert_eq!(rates.hit("k", 5, w).await, Ok((0, 2)));
        assert_eq!(rates.hit("k", 6, w).await, Ok((2, 1)));
        assert_eq!(
            rates.hit("k", 9, w).await,
            Ok((0, 1)),
            "an old window counts nothing"
        );
        assert_eq!(rates.hit("other", 9, w).await, Ok((0, 1)));
    }
}
