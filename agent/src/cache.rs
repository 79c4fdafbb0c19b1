//! The agent's in-memory view of what it serves: every installed SVID and the current bundles,
//! published as immutable [`Snapshot`]s through a `tokio::sync::watch` channel.
//!
//! The rotation side is the only writer: it owns the one [`CacheWriter`] (not `Clone`, so the
//! type system keeps it single), and every mutation goes through it. The Workload API, the
//! admin socket, metrics and the upward report hold [`Cache`] readers (cheap to clone, read and
//! subscribe only). A reader holding an `Arc<Snapshot>` never sees a half-updated state.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use meshcert_protocol::{Entry, IdentityReport, SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// `t` in Unix seconds (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wall clock in Unix seconds (what every admin and metrics answer is computed at).
pub fn unix_now_secs() -> u64 {
    unix_secs(SystemTime::now())
}

/// An SVID the agent has installed and may serve.
#[derive(Clone)]
pub struct InstalledSvid {
    /// The entry it was issued for (selectors decide who may receive it), shared with the
    /// rotator's copy.
    pub entry: Arc<Entry>,
    /// The identity in the leaf.
    pub spiffe_id: SpiffeId,
    /// The leaf certificate (DER).
    pub leaf: Vec<u8>,
    /// The intermediates after the leaf (DER), one list shared by every SVID issued under the
    /// same ones.
    pub intermediates: Arc<[Vec<u8>]>,
    /// Unencrypted PKCS#8 DER of the private key. Never logged, never sent off the node.
    pub key_pkcs8: Arc<Zeroizing<Vec<u8>>>,
    /// The leaf's expiry.
    pub not_after: SystemTime,
    /// A hint that tells this SVID from others of the same caller (e.g. `gateway`), or empty.
    pub hint: String,
}

impl fmt::Debug for InstalledSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstalledSvid")
            .field("entry_id", &self.entry.id)
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &(1 + self.intermediates.len()))
            .field("key_pkcs8", &"<redacted>")
            .field("not_after", &self.not_after)
            .field("hint", &self.hint)
            .finish()
    }
}

impl InstalledSvid {
    /// The chain, leaf first, one DER certificate each (a copy).
    pub fn chain(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.leaf.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
    }

    /// The chain as concatenated DER, leaf first (as the Workload API sends it).
    pub fn chain_der(&self) -> Vec<u8> {
        let mut der = self.leaf.clone();
        for cert in self.intermediates.iter() {
            der.extend_from_slice(cert);
        }
        der
    }
}

/// One shared copy of each list of intermediates in use: the SVIDs of a node are mostly
/// issued under the same intermediate, and a copy of it in each would cost its size per SVID.
#[derive(Debug, Default)]
pub struct Intermediates {
    known: std::sync::Mutex<Vec<Arc<[Vec<u8>]>>>,
}

impl Intermediates {
    /// The shared copy of `certs`, remembered if new. Lists no SVID uses any more are
    /// forgotten when a new one comes.
    pub fn share(&self, certs: Vec<Vec<u8>>) -> Arc<[Vec<u8>]> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(same) = known.iter().find(|k| ***k == *certs) {
            return same.clone();
        }
        known.retain(|k| Arc::strong_count(k) > 1);
        let shared: Arc<[Vec<u8>]> = certs.into();
        known.push(shared.clone());
        shared
    }
}

/// Everything the agent serves at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The node's own trust domain (empty snapshot: not joined yet).
    pub trust_domain: Option<TrustDomain>,
    /// The bundle version these bundles carry.
    pub bundle_version: u64,
    /// CA certificates (DER) per trust domain; the node's own domain included.
    pub bundles: BTreeMap<TrustDomain, Vec<Vec<u8>>>,
    /// Extra roots a gateway trusts (the shared root under limited trust).
    pub shared_root: Vec<Vec<u8>>,
    /// Whether federated bundles go to every workload (`federation.mode: PERMISSIVE`).
    pub federate: bool,
    /// Every valid SVID, in entry order (the first matching one is a caller's default).
    pub svids: Vec<Arc<InstalledSvid>>,
}

impl Snapshot {
    /// The bundle of the node's own trust domain, concatenated DER.
    pub fn own_bundle(&self) -> Vec<u8> {
        self.trust_domain
            .as_ref()
            .and_then(|td| self.bundles.get(td))
            .map(|certs| certs.concat())
            .unwrap_or_default()
    }

    /// The bundles of the other trust domains, when federation is on.
    pub fn federated_bundles(&self) -> impl Iterator<Item = (&TrustDomain, &Vec<Vec<u8>>)> {
        self.bundles
            .iter()
            .filter(move |(td, _)| self.federate && Some(*td) != self.trust_domain.as_ref())
    }

    /// SVIDs that have not expired at `now`.
    pub fn valid_svids(&self, now: SystemTime) -> impl Iterator<Item = &Arc<InstalledSvid>> {
        self.svids.iter().filter(move |s| s.not_after > now)
    }
}

/// The agent's own condition, as the admin socket and the upward report show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The node's name, once known.
    pub node: Option<String>,
    /// The node's mesh, once known.
    pub mesh: Option<String>,
    /// The holder's address.
    pub ca_address: String,
    /// Whether the last call to the holder succeeded.
    pub ca_connected: bool,
    /// The last error talking to the holder.
    pub ca_last_error: Option<String>,
    /// Expiry of the node SVID, Unix seconds.
    pub node_svid_not_after: Option<u64>,
    /// The bundle version held.
    pub bundle_version: u64,
    /// Whether every entry has been attempted at least once since start.
    pub all_attempted: bool,
    /// Every identity the agent manages, with its state (shared with the upward report).
    pub identities: Arc<[IdentityReport]>,
    /// What the agent refused or ignored and the operator should know (e.g. a hook in a
    /// holder entry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Since when the holder cannot serve (unreachable, or answering 5xx), Unix seconds;
    /// absent while it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_unreachable_since: Option<u64>,
    /// The identities (SPIFFE IDs) whose SVID expired during that outage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expired_while_unreachable: Vec<Arc<str>>,
}

impl AgentStatus {
    /// Ready: the node SVID is valid at `now_unix` and every entry holds an issued SVID.
    pub fn is_ready(&self, now_unix: u64) -> bool {
        self.node_svid_not_after.is_some_and(|t| t > now_unix)
            && self
                .identities
                .iter()
                .all(|i| i.not_after.is_some_and(|t| t > now_unix))
    }
}

/// A reader of the served state: the current [`Snapshot`] and [`AgentStatus`], and receivers
/// of every later one. Cloned freely; it cannot write (only the [`CacheWriter`] can).
#[derive(Debug, Clone)]
pub struct Cache {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    status: Arc<watch::Sender<Arc<AgentStatus>>>,
}

impl Cache {
    /// A receiver that sees the current snapshot and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver of the agent's status.
    pub fn subscribe_status(&self) -> watch::Receiver<Arc<AgentStatus>> {
        self.status.subscribe()
    }

    /// The current status.
    pub fn status(&self) -> Arc<AgentStatus> {
        self.status.borrow().clone()
    }
}

/// The one writer of [`Snapshot`]s and [`AgentStatus`]. It is deliberately not `Clone`: it is
/// made once, hands out [`Cache`] readers, and is moved to the rotation side, so no reader can
/// write the served state.
///
/// ```compile_fail
/// let writer = meshcert_agent::cache::CacheWriter::new();
/// let second = writer.clone(); // a second writer cannot be made
/// ```
#[derive(Debug)]
pub struct CacheWriter {
    shared: Cache,
}

impl Default for CacheWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CacheWriter {
    /// The writer of an empty cache; [`CacheWriter::reader`] gives its readers.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let (status, _) = watch::channel(Arc::new(AgentStatus::default()));
        Self {
            shared: Cache {
                tx: Arc::new(tx),
                status: Arc::new(status),
            },
        }
    }

    /// A reader of what this writer publishes.
    pub fn reader(&self) -> Cache {
        self.shared.clone()
    }

    /// Replaces the snapshot and wakes every reader.
    pub fn publish(&self, snapshot: Snapshot) {
        self.shared.tx.send_replace(Arc::new(snapshot));
    }

    /// Changes the snapshot with `f` and wakes every reader.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.shared.tx.send_modify(|current| {
            let mut next = (**current).clone();
            f(&mut next);
            *current = Arc::new(next);
        });
    }

    /// Replaces the whole status and wakes every reader (no copy of the previous one is made).
    pub fn set_status(&self, status: AgentStatus) {
        self.shared.status.send_replace(Arc::new(status));
    }

    /// Changes the status with `f` and wakes every reader.
    pub fn update_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        self.shared.status.send_modify(|current| {
            let mut next = (**current).clone();
            f(&mut next);
            *current = Arc::new(next);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_intermediates_are_shared_and_unused_ones_forgotten() {
        let known = Intermediates::default();
        let a = known.share(vec![vec![1, 2], vec![3]]);
        let b = known.share(vec![vec![1, 2], vec![3]]);
        assert!(Arc::ptr_eq(&a, &b), "one copy for equal lists");
        let other = known.share(vec![vec![9]]);
        assert!(!Arc::ptr_eq(&a, &other));
        drop((a, b));
        // The first list is no longer used: a new list makes room by forgetting it.
        let _third = known.share(vec![vec![7]]);
        let lists = known
            .known
            .lock()
            .expect("lock")
            .iter()
            .map(|k| k.to_vec())
            .collect::<Vec<_>>();
        assert_eq!(lists, vec![vec![vec![9]], vec![vec![7]]]);
        assert_eq!(
            InstalledSvid {
                entry: Arc::new(Entry {
                    id: "e".into(),
                    spiffe_id: SpiffeId::new("spiffe://td.test/e").expect("id"),
                    nodes: vec![],
                    mesh: None,
                    selectors: vec![],
                    ttl: std::time::Duration::from_secs(60),
                    dir: "e".into(),
                    owner: None,
                    hook: None,
                    gateway: false,
                }),
                spiffe_id: SpiffeId::new("spiffe://td.test/e").expect("id"),
                leaf: vec![0xa1],
                intermediates: known.share(vec![vec![0xb1], vec![0xc1]]),
                key_pkcs8: Arc::new(Zeroizing::new(vec![])),
                not_after: SystemTime::UNIX_EPOCH,
                hint: String::new(),
            }
            .chain_der(),
            vec![0xa1, 0xb1, 0xc1]
        );
    }

    #[test]
    fn set_status_replaces_the_whole_status_and_wakes_readers() {
        let writer = CacheWriter::new();
        let cache = writer.reader();
        writer.update_status(|s| {
            s.ca_address = "127.0.0.1:1".into();
            s.ca_last_error = Some("down".into());
        });
        let mut rx = cache.subscribe_status();
        rx.borrow_and_update();
        writer.set_status(AgentStatus {
            node: Some("n1".into()),
            bundle_version: 3,
            ..AgentStatus::default()
        });
        assert!(rx.has_changed().expect("open"));
        let status = cache.status();
        assert_eq!(status.node.as_deref(), Some("n1"));
        assert_eq!(status.bundle_version, 3);
        assert_eq!(
            status.ca_address, "",
            "nothing of the previous status is kept"
        );
        assert_eq!(status.ca_last_error, None);
    }
}
