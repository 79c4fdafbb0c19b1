//! Whether the CA holder can be reached, as the rotator sees it, and when to probe it: pure
//! functions of `now` and a random sample, like [`crate::rotation`].
//!
//! A call that fails because the holder as a whole cannot serve
//! ([`crate::issuer::IssuerError::is_holder_down`]: unreachable, 5xx, `unavailable`) says
//! nothing about the identities it carried. Backing each of them off would keep growing their
//! waits through the outage (to the 2-minute cap), so that a returning holder would find the
//! agent asleep for minutes. Instead the agent marks the holder down and stops sending CSRs;
//! while anything is due it probes the holder cheaply every [`PROBE_MIN`]..[`PROBE_MAX`]
//! (jittered, so a returning holder is not met by the whole fleet at once), and on the first
//! answer every due identity goes out at once in batches. An idle agent (nothing due) sends
//! nothing more than its normal sync and heartbeat. Per-identity backoff stays for
//! per-identity refusals.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The shortest wait between two probes of a holder that is down.
pub const PROBE_MIN: Duration = Duration::from_secs(2);
/// The longest wait between two probes: a returning holder is seen within this.
pub const PROBE_MAX: Duration = Duration::from_secs(4);

/// The wait before the next probe, for a `random` sample in `[0, 1)`: spread evenly between
/// [`PROBE_MIN`] and [`PROBE_MAX`].
pub fn probe_wait(random: f64) -> Duration {
    PROBE_MIN + (PROBE_MAX - PROBE_MIN).mul_f64(random.clamp(0.0, 1.0))
}

/// The holder's reachability and the outage in progress, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reachability {
    /// Since when the holder is down (`None`: it answered the last call).
    since: Option<SystemTime>,
    /// The next probe, while down.
    next_probe: Option<SystemTime>,
    /// A probe is on its way.
    probing: bool,
    /// The identities (SPIFFE IDs) whose SVID expired during this outage, in order.
    expired: Vec<Arc<str>>,
}

impl Reachability {
    /// Whether the holder is down.
    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }

    /// Since when the holder is down.
    pub fn since(&self) -> Option<SystemTime> {
        self.since
    }

    /// The identities whose SVID expired during the outage in progress.
    pub fn expired(&self) -> &[Arc<str>] {
        &self.expired
    }

    /// A call failed because the holder is down, at `now`. The first such failure starts the
    /// outage and schedules the first probe; returns whether it did.
    pub fn down(&mut self, now: SystemTime, random: f64) -> bool {
        if self.since.is_some() {
            return false;
        }
        self.since = Some(now);
        self.next_probe = Some(now + probe_wait(random));
        true
    }

    /// The holder answered a call at `now`: the outage (if any) ends. Returns how long it
    /// lasted and the identities that expired meanwhile.
    pub fn up(&mut self, now: SystemTime) -> Option<(Duration, Vec<Arc<str>>)> {
        let since = self.since.take()?;
        self.next_probe = None;
        let expired = std::mem::take(&mut self.expired);
        Some((now.duration_since(since).unwrap_or_default(), expired))
    }

    /// Records that `spiffe_id`'s SVID expired; kept only while the holder is down.
    pub fn expired_now(&mut self, spiffe_id: &Arc<str>) {
        if self.is_down() && !self.expired.contains(spiffe_id) {
            self.expired.push(spiffe_id.clone());
        }
    }

    /// Whether to send a probe at `now`: the holder is down, something is due (an identity,
    /// the node SVID), no probe is on its way and its moment has come.
    pub fn should_probe(&self, now: SystemTime, anything_due: bool) -> bool {
        anything_due && !self.probing && self.next_probe.is_some_and(|at| at <= now)
    }

    /// A probe is sent.
    pub fn probe_sent(&mut self) {
        self.probing = true;
    }

    /// A probe failed at `now`: the next one after a fresh [`probe_wait`].
    pub fn probe_failed(&mut self, now: SystemTime, random: f64) {
        self.probing = false;
        if self.since.is_some() {
            self.next_probe = Some(now + probe_wait(random));
        }
    }

    /// A probe answered at `now`: see [`Self::up`].
    pub fn probe_answered(&mut self, now: SystemTime) -> Option<(Duration, Vec<Arc<str>>)> {
        self.probing = false;
        self.up(now)
    }

    /// When the rotator must wake for the next probe, while down and idle of probes.
    pub fn next_probe(&self) -> Option<SystemTime> {
        self.next_probe.filter(|_| !self.probing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn an_outage_probes_only_while_something_is_due_and_ends_at_the_first_answer() {
        let mut r = Reachability::default();
        assert!(!r.should_probe(at(0), true), "reachable: no probes");
        assert!(r.down(at(0), 0.0));
        assert!(
            !r.down(at(1), 0.5),
            "a second failure does not restart the outage"
        );
        assert_eq!(r.since(), Some(at(0)));
        assert!(!r.should_probe(at(1), true), "not before the first wait");
        assert!(!r.should_probe(at(2), false), "nothing due: no probe");
        assert!(r.should_probe(at(2), true));
        r.probe_sent();
        assert!(!r.should_probe(at(3), true), "one probe at a time");
        assert_eq!(r.next_probe(), None);
        r.probe_failed(at(3), 0.999_999);
        assert!(!r.should_probe(at(6), true));
        assert!(r.should_probe(at(7), true));
        let web: Arc<str> = "spiffe://td/web".into();
        r.expired_now(&web);
        r.expired_now(&web);
        assert_eq!(r.expired(), std::slice::from_ref(&web));
        r.probe_sent();
        let (lasted, expired) = r.probe_answered(at(60)).expect("an outage ended");
        assert_eq!(lasted, Duration::from_secs(60));
        assert_eq!(expired, vec![web.clone()]);
        assert!(!r.is_down());
        assert!(!r.should_probe(at(100), true));
        r.expired_now(&web);
        assert!(
            r.expired().is_empty(),
            "expiries are counted only during an outage"
        );
        assert_eq!(r.up(at(101)), None);
    }

    proptest! {
        #[test]
        fn probes_are_at_most_probe_max_apart(random in 0.0f64..1.0, start in 0u64..1000) {
            let wait = probe_wait(random);
            prop_assert!(wait >= PROBE_MIN && wait <= PROBE_MAX);
            prop_assert!(PROBE_MAX <= Duration::from_secs(5));
            let mut r = Reachability::default();
            r.down(at(start), random);
            prop_assert!(r.should_probe(at(start) + PROBE_MAX, true));
            prop_assert!(!r.should_probe(at(start) + PROBE_MIN - Duration::from_millis(1), true));
        }
    }
}
