//! Counters of the event pipeline, and a rate limit for the log lines
//! that report drops.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Counters and gauges; one set for the pipeline's memory queue and one
/// per subscription. Names are as in [`MetricsSnapshot::pairs`].
#[derive(Debug, Default)]
pub struct EventMetrics {
    /// Events accepted into the memory queue.
    pub published: AtomicU64,
    /// Events a subscription's filter left out (or failed on).
    pub filtered: AtomicU64,
    /// Records written to a Kafka subscription's spool.
    pub spooled: AtomicU64,
    /// Records handed to the destination: to librdkafka (first attempt
    /// only) or written to a file.
    pub produced: AtomicU64,
    /// Records the destination confirmed: a Kafka delivery report without
    /// error, or a flushed file write.
    pub delivered: AtomicU64,
    /// Delivery attempts that failed; Kafka retries them unless the error
    /// is permanent, which also counts in `dropped`.
    pub failed: AtomicU64,
    /// Events lost: a limit was reached, the pipeline was shut down, a
    /// record was corrupt, or the destination refused it for good.
    pub dropped: AtomicU64,
    /// Events now in the memory queue, and their bytes.
    pub queue_events: AtomicU64,
    pub queue_bytes: AtomicU64,
    /// Highest values of the two above since start.
    pub queue_peak_events: AtomicU64,
    pub queue_peak_bytes: AtomicU64,
    /// Undelivered records in spools, and the spools' bytes on disk.
    pub spool_events: AtomicU64,
    pub spool_bytes: AtomicU64,
}

/// A copy of [`EventMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub published: u64,
    pub filtered: u64,
    pub spooled: u64,
    pub produced: u64,
    pub delivered: u64,
    pub failed: u64,
    pub dropped: u64,
    pub queue_events: u64,
    pub queue_bytes: u64,
    pub queue_peak_events: u64,
    pub queue_peak_bytes: u64,
    pub spool_events: u64,
    pub spool_bytes: u64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl EventMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            published: get(&self.published),
            filtered: get(&self.filtered),
            spooled: get(&self.spooled),
            produced: get(&self.produced),
            delivered: get(&self.delivered),
            failed: get(&self.failed),
            dropped: get(&self.dropped),
            queue_events: get(&self.queue_events),
            queue_bytes: get(&self.queue_bytes),
            queue_peak_events: get(&self.queue_peak_events),
            queue_peak_bytes: get(&self.queue_peak_bytes),
            spool_events: get(&self.spool_events),
            spool_bytes: get(&self.spool_bytes),
        }
    }
}

impl MetricsSnapshot {
    /// Sums counters and gauges; peaks take the maximum.
    pub fn merge(self, other: MetricsSnapshot) -> MetricsSnapshot {
        MetricsSnapshot {
            published: self.published + other.published,
            filtered: self.filtered + other.filtered,
            spooled: self.spooled + other.spooled,
            produced: self.produced + other.produced,
            delivered: self.delivered + other.delivered,
            failed: self.failed + other.failed,
            dropped: self.dropped + other.dropped,
            queue_events: self.queue_events + other.queue_events,
            queue_bytes: self.queue_bytes + other.queue_bytes,
            queue_peak_events: self.queue_peak_events.max(other.queue_peak_events),
            queue_peak_bytes: self.queue_peak_bytes.max(other.queue_peak_bytes),
            spool_events: self.spool_events + other.spool_events,
            spool_bytes: self.spool_bytes + other.spool_bytes,
        }
    }

    /// Named values, as the edge lists them (`events_delivered`, …).
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("events_published", self.published),
            ("events_filtered", self.filtered),
            ("events_spooled", self.spooled),
            ("events_produced", self.produced),
            ("events_delivered", self.delivered),
            ("events_failed", self.failed),
            ("events_dropped", self.dropped),
            ("events_queue_events", self.queue_events),
            ("events_queue_bytes", self.queue_bytes),
            ("events_queue_peak_events", self.queue_peak_events),
            ("events_queue_peak_bytes", self.queue_peak_bytes),
            ("events_spool_events", self.spool_events),
            ("events_spool_bytes", self.spool_bytes),
        ]
    }
}

/// Lets one log line through per interval and counts the rest, so a flood
/// of drops costs an atomic add, not a log line each.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    /// Milliseconds since [`EPOCH`] of the last line let through, plus one
    /// (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line should be written now, `n` being the
    /// occurrences it stands for (this one and those suppressed since the
    /// last line).
    pub(crate) fn hit(&self) -> Option<u64> {
        let now = EPOCH.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed) + 1);
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_standing_for_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.hit(), Some(1));
        for _ in 0..99 {
            assert_eq!(limiter.hit(), None);
        }
        let quick = LogLimiter::new(Duration::ZERO);
        assert_eq!(quick.hit(), Some(1));
        assert_eq!(quick.hit(), Some(1));
    }
}
