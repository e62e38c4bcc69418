//! The control budget both ends of a session keep: a token bucket that the
//! edge enforces on the agent's control messages and that the agent paces
//! its own messages by. The edge states its rate and burst in `Welcome`.

use std::time::{Duration, Instant};

/// `rate` tokens a second, at most `burst` held; starts full. Tokens may be
/// overdrawn: [`TokenBucket::take`] reports by how much, so the edge can
/// refuse the messages of a throttled peer one by one and close the session
/// only when the peer keeps sending a whole burst beyond its budget.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// What taking one token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Within the budget.
    Granted,
    /// Over the budget by less than one burst: refuse this message.
    Throttled { retry_after: Duration },
    /// Over by a whole burst or more: the peer ignores the budget.
    Exhausted,
}

impl TokenBucket {
    /// A full bucket. `rate` and `burst` are at least 1.
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes a token, overdrawing when there is none.
    pub fn take(&mut self, now: Instant) -> Take {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Take::Granted
        } else if self.tokens > -self.burst {
            Take::Throttled {
                retry_after: self.until_positive(),
            }
        } else {
            Take::Exhausted
        }
    }

    /// Takes a token only when one is there (the pacing side).
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a whole token is there again.
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    /// Empties the bucket (the peer said we are over its budget).
    pub fn drain(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }

    fn until_positive(&self) -> Duration {
        Duration::from_secs_f64((-self.tokens).max(0.0) / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_grants_its_burst_then_throttles_then_is_exhausted() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(10, 5);
        for _ in 0..5 {
            assert_eq!(bucket.take(now), Take::Granted);
        }
        for _ in 0..4 {
            assert!(matches!(bucket.take(now), Take::Throttled { .. }));
        }
        assert_eq!(bucket.take(now), Take::Exhausted);
    }

    #[test]
    fn tokens_come_back_at_the_rate_and_never_above_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3);
        for _ in 0..3 {
            assert!(bucket.try_take(start));
        }
        assert!(!bucket.try_take(start));
        assert_eq!(bucket.wait(start), Duration::from_millis(100));
        let later = start + Duration::from_millis(250);
        assert!(bucket.try_take(later));
        assert!(bucket.try_take(later));
        assert!(!bucket.try_take(later));
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.try_take(much_later));
        }
        assert!(!bucket.try_take(much_later));
    }

    #[test]
    fn a_throttled_take_says_when_to_come_back() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(4, 2);
        assert_eq!(bucket.take(now), Take::Granted);
        assert_eq!(bucket.take(now), Take::Granted);
        match bucket.take(now) {
            Take::Throttled { retry_after } => assert_eq!(retry_after, Duration::from_millis(250)),
            other => panic!("{other:?}"),
        }
    }
}
