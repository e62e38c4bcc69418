//! A hybrid logical clock: milliseconds since the epoch in the high 48
//! bits, a counter in the low 16. It never goes backwards, stays close to
//! wall time, and moves past every timestamp a node has seen, so a write
//! made after reading a value always sorts after it.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// A timestamp of the clock. Ties between nodes are broken by node id.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    /// Wall-clock milliseconds since the epoch.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }

    /// The wall-clock time it stands for.
    pub fn time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.millis())
    }
}

fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The node's clock.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    last: Mutex<u64>,
}

impl Clock {
    /// A timestamp after every one issued or observed.
    pub(crate) fn now(&self) -> Hlc {
        let physical = wall_millis() << 16;
        let mut last = self.last.lock().expect("clock lock");
        *last = (*last + 1).max(physical);
        Hlc(*last)
    }

    /// Moves the clock past a timestamp seen elsewhere.
    pub(crate) fn observe(&self, seen: Hlc) {
        let mut last = self.last.lock().expect("clock lock");
        *last = (*last).max(seen.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_past_observed() {
        let clock = Clock::default();
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        let far = Hlc((wall_millis() + 60_000) << 16);
        clock.observe(far);
        assert!(clock.now() > far);
        assert!(a.millis() > 1_600_000_000_000);
    }
}
