//! The time schedules run by, injectable so tests can move it.

use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;

/// A source of "now" for the schedules (SnapshotSchedule runs, Branch
/// refreshes). The operator uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that stands still until told to move (tests, simulations).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: Timestamp) -> Self {
        Self {
            now: Mutex::new(at),
        }
    }

    /// Sets the time.
    pub fn set(&self, at: Timestamp) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Moves the time forward by `by` (saturating at the end of time).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        *now = now
            .saturating_add(jiff::SignedDuration::from_secs(secs))
            .unwrap_or(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::from_second(1_000).unwrap());
        assert_eq!(c.now().as_second(), 1_000);
        c.advance(Duration::from_secs(90));
        assert_eq!(c.now().as_second(), 1_090);
        c.set(Timestamp::from_second(5).unwrap());
        assert_eq!(c.now().as_second(), 5);
    }
}
