//! `circuit-breaker` (and the `circuit_breaker` module): counts the
//! upstream's answers over a rolling window of 10 buckets; when at least
//! `volume_threshold` requests were seen and the share of 5xx answers
//! reaches `error_threshold`, the breaker trips and visitors get
//! `503 ERR_POSTERN_3202` for `tripped_duration`. Then one request is let
//! through as a probe: a good answer closes the breaker, a 5xx trips it
//! again. State is per endpoint and per edge node, as in ngrok, so the
//! breaker trips approximately in a cluster.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use postern_events::Decision;
use postern_proto::{ErrorCode, Failure};
use serde::Deserialize;

use super::{Built, config, duration};
use crate::policy::{Flow, Phase, PolicyEnv, RequestAction, RequestCx, ResponseObserver};

const BUCKETS: usize = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "half")]
    error_threshold: f64,
    #[serde(default = "ten")]
    volume_threshold: u64,
    #[serde(default)]
    window_duration: Option<String>,
    #[serde(default)]
    tripped_duration: Option<String>,
    #[serde(default)]
    num_buckets: Option<u64>,
    #[serde(default = "yes")]
    enforce: bool,
}

fn half() -> f64 {
    0.5
}

fn ten() -> u64 {
    10
}

fn yes() -> bool {
    true
}

#[derive(Default, Clone, Copy)]
struct Bucket {
    /// Which slice of time the bucket counts (its start, in bucket widths).
    slot: u64,
    total: u64,
    errors: u64,
}

enum State {
    Closed,
    /// Tripped until then.
    Open(Instant),
    /// One probe is out.
    Probing,
}

struct Inner {
    buckets: [Bucket; BUCKETS],
    state: State,
}

pub(crate) struct CircuitBreaker {
    threshold: f64,
    volume: u64,
    width: Duration,
    tripped: Duration,
    enforce: bool,
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub(crate) fn new(
        threshold: f64,
        volume: u64,
        window: Duration,
        tripped: Duration,
        enforce: bool,
    ) -> Result<CircuitBreaker, String> {
        if !(0.0..=1.0).contains(&threshold) || threshold.is_nan() {
            return Err(format!(
                "config.error_threshold: {threshold} is not between 0 and 1"
            ));
        }
        if volume == 0 || volume > 2_000_000_000 {
            return Err("config.volume_threshold: 1 to 2000000000".into());
        }
        let range = Duration::from_secs(1)..=Duration::from_secs(120);
        if !range.contains(&window) {
            return Err("config.window_duration: 1s to 2m".into());
        }
        if !range.contains(&tripped) {
            return Err("config.tripped_duration: 1s to 2m".into());
        }
        Ok(CircuitBreaker {
            threshold,
            volume,
            width: window / BUCKETS as u32,
            tripped,
            enforce,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                buckets: [Bucket::default(); BUCKETS],
                state: State::Closed,
            }),
        })
    }

    fn slot(&self, now: Instant) -> u64 {
        (now.duration_since(self.epoch).as_nanos() / self.width.as_nanos().max(1)) as u64
    }

    /// Whether a request may go on now.
    fn admit(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock().expect("circuit breaker lock");
        match inner.state {
            State::Closed => true,
            State::Open(until) if now >= until => {
                inner.state = State::Probing;
                true
            }
            State::Open(_) | State::Probing => false,
        }
    }

    /// Counts an answer of the upstream.
    fn observe(&self, error: bool, now: Instant) {
        let slot = self.slot(now);
        let mut inner = self.inner.lock().expect("circuit breaker lock");
        if let State::Probing = inner.state {
            inner.state = if error {
                State::Open(now + self.tripped)
            } else {
                inner.buckets = [Bucket::default(); BUCKETS];
                State::Closed
            };
            return;
        }
        let bucket = &mut inner.buckets[(slot % BUCKETS as u64) as usize];
        if bucket.slot != slot {
            *bucket = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        bucket.total += 1;
        bucket.errors += u64::from(error);
        let (total, errors) = inner
            .buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < BUCKETS as u64)
            .fold((0, 0), |(t, e), b| (t + b.total, e + b.errors));
        if matches!(inner.state, State::Closed)
            && total >= self.volume
            && errors as f64 >= self.threshold * total as f64
        {
            inner.state = State::Open(now + self.tripped);
        }
    }
}

/// Counts the upstream's answer once the response is back.
struct Outcome(Arc<CircuitBreaker>);

impl ResponseObserver for Outcome {
    fn observe(&self, status: http::StatusCode) {
        self.0.observe(status.is_server_error(), Instant::now());
    }
}

/// The action: the shared breaker of the endpoint.
struct Action(Arc<CircuitBreaker>);

pub(super) fn build(value: &serde_json::Value, _: Phase, _: &PolicyEnv) -> Result<Built, String> {
    let cfg: Config = config(value)?;
    if cfg.num_buckets.is_some_and(|n| n != BUCKETS as u64) {
        return Err(format!("config.num_buckets: fixed at {BUCKETS}"));
    }
    let breaker = CircuitBreaker::new(
        cfg.error_threshold,
        cfg.volume_threshold,
        duration(
            "window_duration",
            cfg.window_duration.as_deref(),
            Duration::from_secs(10),
        )?,
        duration(
            "tripped_duration",
            cfg.tripped_duration.as_deref(),
            Duration::from_secs(10),
        )?,
        cfg.enforce,
    )?;
    Ok(Built::Request(Box::new(Action(Arc::new(breaker)))))
}

impl RequestAction for Action {
    fn on_request<'a>(&'a self, cx: &'a mut RequestCx<'_>) -> BoxFuture<'a, Result<Flow, String>> {
        let admitted = self.0.admit(Instant::now());
        let decision = if admitted || !self.0.enforce {
            Decision::Allow
        } else {
            Decision::Block
        };
        cx.record.circuit_breaker(decision);
        let flow = if decision == Decision::Allow {
            cx.scratch.observers.push(Arc::new(Outcome(self.0.clone())));
            Flow::Next
        } else {
            Flow::Respond(crate::http::error_response(&Failure::new(
                ErrorCode::CIRCUIT_OPEN,
                "the upstream failed too often",
            )))
        };
        Box::pin(async move { Ok(flow) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_on_errors_then_probes_and_closes() {
        let breaker = CircuitBreaker::new(
            0.5,
            4,
            Duration::from_secs(10),
            Duration::from_secs(5),
            true,
        )
        .unwrap();
        let t0 = breaker.epoch;
        for error in [false, true, true] {
            assert!(breaker.admit(t0));
            breaker.observe(error, t0);
        }
        assert!(breaker.admit(t0), "3 requests are under the volume of 4");
        breaker.observe(true, t0);
        assert!(!breaker.admit(t0), "3 errors in 4 trip it");
        let later = t0 + Duration::from_secs(6);
        assert!(breaker.admit(later), "one probe after the tripped time");
        assert!(!breaker.admit(later), "only one");
        breaker.observe(true, later);
        assert!(!breaker.admit(later), "a failed probe trips it again");
        let after = later + Duration::from_secs(6);
        assert!(breaker.admit(after));
        breaker.observe(false, after);
        assert!(breaker.admit(after) && breaker.admit(after), "closed again");
    }

    #[test]
    fn old_buckets_age_out() {
        let breaker = CircuitBreaker::new(
            0.5,
            2,
            Duration::from_secs(10),
            Duration::from_secs(5),
            true,
        )
        .unwrap();
        let t0 = breaker.epoch;
        breaker.observe(true, t0);
        breaker.observe(false, t0 + Duration::from_secs(11));
        assert!(
            breaker.admit(t0 + Duration::from_secs(11)),
            "the first error aged out"
        );
    }
}
