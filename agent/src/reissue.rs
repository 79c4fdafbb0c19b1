//! The re-issue rule of a root rotation, pure: once the holder's next root signs (the sync
//! answer's bundles carry a [`RotationHint`]), every SVID that does not chain to an active
//! root is due at `activated_at + window × u`, where `u` in `[0, 1)` comes from a hash of the
//! entry id. The spread keeps the fleet from asking the holder all at once, and the same entry
//! gets the same moment after a restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshcert_protocol::api::RotationHint;

/// Where `id` falls in the window, in `[0, 1)`: FNV-1a of its bytes, finalised (stable across
/// runs and Rust versions).
pub fn spread(id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MurmurHash3's finaliser: FNV alone leaves the high bits of ids that differ only in
    // their last characters close together.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// When the SVID `chain` (leaf first) of entry `id` becomes due because of a root rotation:
/// `None` when it already chains to an active root (or there is no rotation to follow).
pub fn due_at(
    chain: &[Vec<u8>],
    hint: Option<&RotationHint>,
    id: &str,
    now: SystemTime,
) -> Option<SystemTime> {
    let hint = hint?;
    let roots: Vec<Vec<u8>> = hint.active_roots.iter().map(|r| r.0.clone()).collect();
    if crate::svid::verify_chain(chain, &roots, now).is_ok() {
        return None;
    }
    let start = UNIX_EPOCH + Duration::from_secs(hint.activated_at);
    Some(start + Duration::from_secs(hint.window_secs).mul_f64(spread(id)))
}

/// `next_at`, brought forward to the rotation's moment for this chain when that is sooner.
pub fn earliest(
    next_at: SystemTime,
    chain: &[Vec<u8>],
    hint: Option<&RotationHint>,
    id: &str,
    now: SystemTime,
) -> SystemTime {
    due_at(chain, hint, id, now).map_or(next_at, |at| at.min(next_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr;
    use crate::keys::{KeyAlgorithm, PrivateKey};
    use crate::svid::testca::TestCa;
    use meshcert_protocol::SpiffeId;
    use meshcert_protocol::api::Der;

    fn issue(ca: &TestCa, now: SystemTime) -> Vec<Vec<u8>> {
        let id = SpiffeId::new("spiffe://a.test/w").expect("id");
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let csr = csr::build(&key, Some(&id)).expect("csr");
        ca.sign(
            &csr,
            &id,
            now - Duration::from_secs(5),
            Duration::from_secs(3600),
        )
    }

    fn hint(root: &[u8]) -> RotationHint {
        RotationHint {
            active_roots: vec![Der(root.to_vec())],
            activated_at: 1_800_000_000,
            window_secs: 600,
        }
    }

    #[test]
    fn an_svid_under_the_previous_root_is_due_inside_the_window() {
        let old = TestCa::new();
        let new = TestCa::new();
        let now = SystemTime::now();
        let chain = issue(&old, now);
        let h = hint(&new.root);
        let at = due_at(&chain, Some(&h), "entry-1", now).expect("due");
        let start = UNIX_EPOCH + Duration::from_secs(h.activated_at);
        assert!(at >= start && at < start + Duration::from_secs(600));
        assert_eq!(
            due_at(&chain, Some(&h), "entry-1", now),
            Some(at),
            "deterministic"
        );
        assert_eq!(due_at(&chain, None, "entry-1", now), None, "no rotation");
        let fresh = issue(&new, now);
        assert_eq!(
            due_at(&fresh, Some(&h), "entry-1", now),
            None,
            "already under it"
        );
    }

    #[test]
    fn entries_spread_over_the_window() {
        let us: Vec<f64> = (0..1000).map(|i| spread(&format!("entry-{i}"))).collect();
        assert!(us.iter().all(|u| (0.0..1.0).contains(u)));
        let early = us.iter().filter(|u| **u < 0.5).count();
        assert!(
            (400..600).contains(&early),
            "{early} of 1000 in the first half"
        );
    }
}
