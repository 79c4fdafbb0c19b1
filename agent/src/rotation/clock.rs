//! The wall clock the executor reads once per wake-up, behind a seam so that tests move it
//! by hand (certificate validity is wall-clock time; scheduling is `tokio::time`, pausable).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock for tests: starts at a given time and follows tokio's (pausable) time from there,
/// plus whatever [`ManualClock::advance`] adds (a suspend, a clock jump).
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<(SystemTime, tokio::time::Instant)>>,
}

impl ManualClock {
    /// A clock that reads `start` now.
    pub fn new(start: SystemTime) -> Self {
        Self {
            inner: Arc::new(Mutex::new((start, tokio::time::Instant::now()))),
        }
    }

    /// Moves the clock forward by `by` without any tokio time passing.
    pub fn advance(&self, by: Duration) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.0 += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.inner
            .lock()
            .map(|inner| inner.0 + inner.1.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}
