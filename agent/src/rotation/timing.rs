//! When to rotate and how long to wait after a failure: pure functions of the certificate's
//! validity, the rotation settings, `now` and a random sample, plus the per-entry [`Schedule`].
//!
//! Times are wall-clock (`SystemTime`) because certificate validity is: a node that was
//! suspended past a rotation time finds the entry due at its next check.

use std::time::{Duration, SystemTime};

use crate::config::Rotation;

/// The smallest wait after a failure, so a zero jitter sample never spins.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Latest fraction of the lifetime a rotation may be scheduled at, whatever the settings: the
/// last safe moment leaves a tenth of the lifetime for retries.
pub const LAST_SAFE_FRACTION: f64 = 0.9;

/// The moment to rotate a certificate valid from `not_before` to `not_after`: at `fraction` of
/// its lifetime, moved by `jitter_sample` (a value in `[-jitter, jitter]`), never before
/// `not_before` and never after [`LAST_SAFE_FRACTION`] of the lifetime.
pub fn refresh_at(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    jitter_sample: f64,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let f = (fraction + jitter_sample).clamp(0.0, LAST_SAFE_FRACTION);
    not_before + lifetime.mul_f64(f)
}

/// How long from `now` until the rotation moment (zero when it has passed).
pub fn refresh_in(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    fraction: f64,
    jitter_sample: f64,
) -> Duration {
    refresh_at(not_before, not_after, fraction, jitter_sample)
        .duration_since(now)
        .unwrap_or_default()
}

/// The wait after the `failures`-th consecutive failure (1 = first): full jitter over an
/// exponential ceiling `initial · 2^(failures-1)` capped at `max`; `random` is in `[0, 1)`.
pub fn backoff(failures: u32, initial: Duration, max: Duration, random: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let ceiling = initial.checked_mul(1u32 << exp).unwrap_or(max).min(max);
    ceiling
        .mul_f64(random.clamp(0.0, 1.0))
        .max(MIN_BACKOFF.min(ceiling))
}

/// A random jitter sample in `[-jitter, jitter]`.
pub fn sample_jitter(jitter: f64) -> f64 {
    (fastrand::f64() * 2.0 - 1.0) * jitter
}

/// The jitter of one certificate, in `[-jitter, jitter]`, derived from its serial: spread
/// across certificates (serials are random) yet the same after a restart, so a restarted agent
/// re-issues exactly when the previous run would have.
pub fn jitter_for(serial: &str, jitter: f64) -> f64 {
    // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
    (unit * 2.0 - 1.0) * jitter
}

/// The moment one identity (an entry, or the node itself) is next due: the one place every
/// "is it due" and "when to wake" question goes through, so that a rule making an SVID due
/// earlier (re-issue under a new root, say) is added here and nowhere else.
pub fn due_at(schedule: &Schedule) -> SystemTime {
    schedule.next_at
}

/// When one identity (an entry, or the node itself) is next due, and how many attempts have
/// failed since the last success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The next attempt.
    pub next_at: SystemTime,
    /// Failures since the last success.
    pub failures: u32,
}

impl Schedule {
    /// Due at once.
    pub fn now(now: SystemTime) -> Self {
        Self {
            next_at: now,
            failures: 0,
        }
    }

    /// Scheduled for the rotation moment of a certificate (a success, or one found on disk).
    pub fn for_certificate(
        not_before: SystemTime,
        not_after: SystemTime,
        rotation: &Rotation,
        jitter_sample: f64,
    ) -> Self {
        Self {
            next_at: refresh_at(not_before, not_after, rotation.fraction, jitter_sample),
            failures: 0,
        }
    }

    /// Whether an attempt is due at `now` (see [`due_at`]).
    pub fn is_due(&self, now: SystemTime) -> bool {
        due_at(self) <= now
    }

    /// Records a failure at `now` and schedules the retry; returns the wait.
    pub fn failed(&mut self, now: SystemTime, rotation: &Rotation, random: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(
            self.failures,
            rotation.backoff_initial,
            rotation.backoff_max,
            random,
        );
        self.next_at = now + wait;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    #[test]
    fn half_life_without_jitter() {
        assert_eq!(refresh_at(at(0), at(3600), 0.5, 0.0), at(1800));
        assert_eq!(
            refresh_in(at(0), at(3600), at(600), 0.5, 0.0),
            Duration::from_secs(1200)
        );
        // Past the moment (a suspended node): due now.
        assert_eq!(
            refresh_in(at(0), at(3600), at(3000), 0.5, 0.0),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_table() {
        let s = Duration::from_secs;
        for (failures, random, want) in [
            (1, 0.999_999, s(1)),
            (2, 0.999_999, s(2)),
            (3, 0.999_999, s(4)),
            (10, 0.999_999, s(120)),
            (u32::MAX, 0.999_999, s(120)),
            (1, 0.0, MIN_BACKOFF),
            (3, 0.5, s(2)),
        ] {
            let got = backoff(failures, s(1), s(120), random);
            let diff = got.abs_diff(want);
            assert!(
                diff < Duration::from_millis(1),
                "{failures} {random}: {got:?}"
            );
        }
    }

    #[test]
    fn schedule_backs_off_then_resets() {
        let r = Rotation::default();
        let mut s = Schedule::now(at(0));
        assert!(s.is_due(at(0)));
        let w1 = s.failed(at(0), &r, 0.999);
        let w2 = s.failed(at(0), &r, 0.999);
        assert!(w2 > w1);
        assert_eq!(s.failures, 2);
        assert!(!s.is_due(at(0)));
        let s = Schedule::for_certificate(at(0), at(100), &r, 0.0);
        assert_eq!(s.failures, 0);
        assert_eq!(s.next_at, at(50));
    }

    proptest! {
        #[test]
        fn refresh_stays_inside_the_lifetime(
            lifetime in 1u64..10_000_000,
            fraction in 0.01f64..0.99,
            jitter in 0.0f64..0.5,
            unit in -1.0f64..=1.0,
            now_offset in 0u64..20_000_000,
        ) {
            let nb = at(0);
            let na = at(lifetime);
            let when = refresh_at(nb, na, fraction, unit * jitter);
            prop_assert!(when >= nb);
            prop_assert!(when < na);
            // never later than the last safe moment
            prop_assert!(when <= nb + Duration::from_secs(lifetime).mul_f64(LAST_SAFE_FRACTION));
            let wait = refresh_in(nb, na, at(now_offset), fraction, unit * jitter);
            prop_assert!(at(now_offset) + wait >= when);
            if at(now_offset) <= when {
                prop_assert_eq!(at(now_offset) + wait, when);
            } else {
                prop_assert_eq!(wait, Duration::ZERO);
            }
        }

        #[test]
        fn backoff_is_bounded(
            failures in 1u32..1000,
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..1_000_000,
            random in 0.0f64..1.0,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial + Duration::from_millis(extra_ms);
            let wait = backoff(failures, initial, max, random);
            prop_assert!(wait <= max);
            prop_assert!(wait >= MIN_BACKOFF.min(initial));
            // the ceiling never shrinks as failures grow
            let ceiling = |f| backoff(f, initial, max, 0.999_999_9);
            prop_assert!(ceiling(failures + 1) >= ceiling(failures));
        }

        #[test]
        fn jitter_samples_are_in_range(jitter in 0.0f64..0.5, serial in "[0-9a-f]{2,40}") {
            let s = sample_jitter(jitter);
            prop_assert!(s >= -jitter && s <= jitter);
            let j = jitter_for(&serial, jitter);
            prop_assert!(j >= -jitter && j <= jitter);
            prop_assert_eq!(j, jitter_for(&serial, jitter), "the same after a restart");
        }
    }
}
