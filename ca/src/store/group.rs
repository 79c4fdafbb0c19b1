//! Group commit: concurrent [`Store::record_issuances`] calls share one transaction and one
//! durable commit. Each caller adds its issuances to the open group and waits; the first caller
//! that finds no commit under way takes the whole group, commits it once, then wakes everyone
//! in it. Nothing is answered before its issuances are committed, so a kill -9 still loses no
//! acknowledged issuance; what changes is that 64 agents signing at once pay for a few commits
//! (fsyncs) instead of 64.
//!
//! A caller on a multi-threaded tokio runtime waits through `block_in_place`, so the holder's
//! other connections keep being served while it waits, and more callers can join the group.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use meshcert_protocol::Entry;

use super::{
    Issuance, KubernetesNodeOutcome, NodeRecord, Pruned, Store, StoreError, StoredReport,
    TokenOutcome, TokenRecord,
};

/// How many failed groups are remembered for their late-waking members.
const FAILURES_KEPT: usize = 64;

#[derive(Default)]
struct Groups {
    /// Issuances waiting for the next commit.
    open: Vec<Issuance>,
    /// The number of the open group.
    open_id: u64,
    /// Every group up to this number is committed (or failed).
    done_id: u64,
    /// A commit is under way.
    committing: bool,
    /// Recent failed groups: (group, reason, retryable).
    failures: VecDeque<(u64, String, bool)>,
    /// Groups committed and issuances in them, for the figures.
    commits: u64,
}

/// A store whose issuance writes are group-committed.
pub struct GroupCommit<S> {
    inner: S,
    groups: Mutex<Groups>,
    done: Condvar,
}

impl<S: std::fmt::Debug> std::fmt::Debug for GroupCommit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Runs `f`, marked as blocking when on a multi-threaded tokio runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl<S: Store> GroupCommit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            groups: Mutex::new(Groups {
                open_id: 1,
                ..Groups::default()
            }),
            done: Condvar::new(),
        }
    }

    /// How many commits wrote issuances so far.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    fn lock(&self) -> MutexGuard<'_, Groups> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn join(&self, issued: &[Issuance]) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.open.extend_from_slice(issued);
        let mine = g.open_id;
        loop {
            if g.done_id >= mine {
                return match g.failures.iter().find(|(id, ..)| *id == mine) {
                    Some((_, reason, retryable)) => Err(StoreError::GroupFailed {
                        reason: reason.clone(),
                        retryable: *retryable,
                    }),
                    None => Ok(()),
                };
            }
            if !g.committing {
                // Every earlier group is done and none is under way: the open group is ours.
                g.committing = true;
                let group = std::mem::take(&mut g.open);
                g.open_id += 1;
                drop(g);
                let outcome = self.inner.record_issuances(&group);
                let mut g = self.lock();
                g.committing = false;
                g.done_id = mine;
                g.commits += 1;
                if let Err(e) = &outcome {
                    g.failures
                        .push_back((mine, e.to_string(), e.is_retryable()));
                    if g.failures.len() > FAILURES_KEPT {
                        g.failures.pop_front();
                    }
                }
                drop(g);
                self.done.notify_all();
                return outcome;
            }
            g = self
                .done
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl<S: Store> Store for GroupCommit<S> {
    fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError> {
        blocking(|| self.join(issued))
    }

    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.create_token(token)
    }
    fn consume_token(
        &self,
        hash: &str,
        now: u64,
        node_id: &dyn Fn(&str, &str) -> String,
    ) -> Result<TokenOutcome, StoreError> {
        self.inner.consume_token(hash, now, node_id)
    }
    fn attest_kubernetes_node(
        &self,
        node: &NodeRecord,
    ) -> Result<KubernetesNodeOutcome, StoreError> {
        self.inner.attest_kubernetes_node(node)
    }
    fn token_used(&self, hash: &str) -> Result<Option<bool>, StoreError> {
        self.inner.token_used(hash)
    }
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.inner.node(name)
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes()
    }
    fn ban_node(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.ban_node(name)
    }
    fn insert_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        self.inner.insert_entry(entry)
    }
    fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_entry(id)
    }
    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.inner.entries()
    }
    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.entry(id)
    }
    fn registers(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        self.inner.registers(spiffe_id)
    }
    fn issuances(&self) -> Result<Vec<Issuance>, StoreError> {
        self.inner.issuances()
    }
    fn issuance_count(&self) -> Result<u64, StoreError> {
        self.inner.issuance_count()
    }
    fn prune(&self, before: u64) -> Result<Pruned, StoreError> {
        self.inner.prune(before)
    }
    fn put_report(&self, report: &StoredReport) -> Result<(), StoreError> {
        self.inner.put_report(report)
    }
    fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        self.inner.reports()
    }
    fn settle_bundle_version(&self, digest: &str) -> Result<u64, StoreError> {
        self.inner.settle_bundle_version(digest)
    }
    fn load_document(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner.load_document(name)
    }
    fn store_document(
        &self,
        name: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        self.inner.store_document(name, expected, value)
    }
    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::SqliteStore;

    fn issuance(serial: String) -> Issuance {
        Issuance {
            serial,
            spiffe_id: "spiffe://a.test/x".into(),
            node: "n".into(),
            not_after: 10,
            issued_at: 1,
            local: false,
        }
    }

    #[test]
    fn concurrent_writers_share_commits_and_every_write_is_committed_when_answered() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(GroupCommit::new(
            SqliteStore::open(&dir.path().join("db")).expect("open"),
        ));
        let writers = 16;
        let each = 20;
        std::thread::scope(|s| {
            for w in 0..writers {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    for i in 0..each {
                        let serial = format!("{w:02x}{i:04x}");
                        store
                            .record_issuances(&[issuance(serial.clone())])
                            .expect("record");
                        // Answered: it is in the database now.
                        assert!(
                            store
                                .issuances()
                                .expect("list")
                                .iter()
                                .any(|x| x.serial == serial),
                            "{serial} acknowledged but not committed"
                        );
                    }
                });
            }
        });
        assert_eq!(store.issuance_count().expect("count"), writers * each);
        eprintln!("{} writes in {} commits", writers * each, store.commits());
    }

    #[test]
    fn a_failed_group_fails_every_member() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = GroupCommit::new(SqliteStore::open(&dir.path().join("db")).expect("open"));
        store
            .record_issuances(&[issuance("01".into())])
            .expect("first");
        // The same serial again violates the primary key: the group fails, and says so.
        let err = store
            .record_issuances(&[issuance("01".into())])
            .expect_err("duplicate");
        assert!(!err.is_retryable(), "{err}");
        store
            .record_issuances(&[issuance("02".into())])
            .expect("the next group commits");
    }
}
