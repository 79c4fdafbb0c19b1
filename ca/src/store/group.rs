//! Group commit: concurrent issuance writes share one transaction and one durable commit.
//!
//! Each write is queued for one committer, a thread of its own that owns the commit loop: it
//! takes every write queued so far (the group), records them in one transaction with one
//! durable commit, then answers every member of the group. A write made while a commit is under
//! way joins the next group; while writes arrive concurrently (the last group had several
//! members), the committer lets a group fill for [`GATHER`] before taking it, so that a commit
//! is shared by more writes. Nothing is answered before its issuances are committed, so a
//! kill -9 still loses no acknowledged issuance; what changes is that 64 agents signing at once
//! pay for a few commits (fsyncs) instead of 64.
//!
//! The signing path awaits its answer ([`Store::submit_issuances`] gives a [`Committing`]
//! future): no tokio worker blocks while the group commits, so the worker keeps serving the
//! holder's other connections and more writes can join the group. The synchronous
//! [`Store::record_issuances`] (node SVIDs) joins the same groups and waits for its answer on
//! its own thread (through `block_in_place` on a multi-threaded runtime).
//!
//! A failed commit fails every member of its group with the same error, kept retryable or not
//! (see [`StoreError::GroupFailed`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use meshcert_protocol::Entry;
use tokio::sync::oneshot;

use super::{
    Issuance, KubernetesNodeOutcome, NodeRecord, Pruned, Store, StoreError, StoredReport,
    TokenOutcome, TokenRecord,
};

/// Where a member of a group gets its answer.
enum Answer {
    /// An awaiting caller ([`Committing`]).
    Await(oneshot::Sender<Result<(), StoreError>>),
    /// A caller waiting on its own thread.
    Block(mpsc::SyncSender<Result<(), StoreError>>),
}

impl Answer {
    fn send(self, outcome: Result<(), StoreError>) {
        // A caller that went away (its connection closed) needs no answer.
        let _ = match self {
            Self::Await(tx) => tx.send(outcome).map_err(drop),
            Self::Block(tx) => tx.send(outcome).map_err(drop),
        };
    }
}

/// One queued write: its issuances and where its answer goes.
struct Member {
    issued: Vec<Issuance>,
    answer: Answer,
}

/// Issuances on their way to a durable commit: resolves once they are committed, or with the
/// error that failed their commit.
#[must_use = "the issuances are not known to be committed until this resolves"]
pub struct Committing(State);

enum State {
    Done(Option<Result<(), StoreError>>),
    Waiting(oneshot::Receiver<Result<(), StoreError>>),
}

impl std::fmt::Debug for Committing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committing").finish_non_exhaustive()
    }
}

impl Committing {
    /// A write that already has its outcome (committed on the caller's thread).
    pub fn done(outcome: Result<(), StoreError>) -> Self {
        Self(State::Done(Some(outcome)))
    }
}

/// The committer stopped (the store is closing) before answering.
fn closing() -> StoreError {
    StoreError::Unavailable("the datastore is closing".into())
}

impl Future for Committing {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Done(outcome) => Poll::Ready(outcome.take().unwrap_or_else(|| Err(closing()))),
            State::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(closing()))),
        }
    }
}

/// A store whose issuance writes are group-committed by a committer thread.
pub struct GroupCommit<S> {
    inner: Arc<S>,
    /// The committer's queue; `None` once dropping.
    queue: Option<mpsc::Sender<Member>>,
    committer: Option<std::thread::JoinHandle<()>>,
    /// Groups committed (or failed) so far.
    commits: Arc<AtomicU64>,
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

/// How long the committer lets a group fill before taking it, when the last group had several
/// members (writes are arriving concurrently): more writes then share each durable commit,
/// which costs about the same CPU for one issuance or for twenty. A lone writer never waits for
/// it. Like PostgreSQL's `commit_delay` with `commit_siblings`.
const GATHER: Duration = Duration::from_micros(200);

/// The environment variable that sets [`GATHER`] in microseconds (`0`: take each group at
/// once), for benchmarks that compare both in the same run.
pub const GATHER_ENV: &str = "MESHCERT_CA_GROUP_GATHER_US";

/// [`GATHER`], or what [`GATHER_ENV`] says.
fn gather() -> Duration {
    std::env::var(GATHER_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(GATHER, Duration::from_micros)
}

/// The committer: takes every queued write, commits them at once, answers them all; ends when
/// the store is dropped.
fn commit_loop<S: Store>(
    inner: &S,
    queue: &mpsc::Receiver<Member>,
    commits: &AtomicU64,
    gather: Duration,
) {
    let mut concurrent = false;
    while let Ok(first) = queue.recv() {
        if concurrent && !gather.is_zero() {
            std::thread::sleep(gather);
        }
        let mut members = vec![first];
        members.extend(queue.try_iter());
        concurrent = members.len() > 1;
        let issued: Vec<Issuance> = members
            .iter_mut()
            .flat_map(|m| std::mem::take(&mut m.issued))
            .collect();
        let outcome = inner.record_issuances(&issued);
        commits.fetch_add(1, Ordering::Relaxed);
        let failed = outcome.err().map(|e| {
            tracing::warn!(error = %e, writes = members.len(), issuances = issued.len(), "a group commit failed");
            (e.to_string(), e.is_retryable())
        });
        for m in members {
            m.answer.send(match &failed {
                None => Ok(()),
                Some((reason, retryable)) => Err(StoreError::GroupFailed {
                    reason: reason.clone(),
                    retryable: *retryable,
                }),
            });
        }
    }
}

impl<S: Store + 'static> GroupCommit<S> {
    /// Wraps `inner` and starts its committer thread.
    pub fn new(inner: S) -> Result<Self, StoreError> {
        let inner = Arc::new(inner);
        let commits = Arc::new(AtomicU64::new(0));
        let (queue, rx) = mpsc::channel();
        let committer = {
            let (inner, commits) = (Arc::clone(&inner), Arc::clone(&commits));
            std::thread::Builder::new()
                .name("group-commit".into())
                .spawn(move || commit_loop(inner.as_ref(), &rx, &commits, gather()))
                .map_err(|e| StoreError::Unavailable(format!("cannot start the committer: {e}")))?
        };
        Ok(Self {
            inner,
            queue: Some(queue),
            committer: Some(committer),
            commits,
        })
    }
}

impl<S> GroupCommit<S> {
    /// How many commits wrote issuances so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Queues a write for the committer; false when it has stopped.
    fn enqueue(&self, issued: Vec<Issuance>, answer: Answer) -> Result<(), Answer> {
        let Some(queue) = &self.queue else {
            return Err(answer);
        };
        queue
            .send(Member { issued, answer })
            .map_err(|mpsc::SendError(m)| m.answer)
    }
}

impl<S> Drop for GroupCommit<S> {
    fn drop(&mut self) {
        // Closing the queue ends the committer once it has answered what was queued.
        self.queue = None;
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

/// The [`Store`] methods other than the issuance writes, passed on to the wrapped store in
/// field `$inner` (the group commit and the tests' gated store change only the writes).
macro_rules! pass_on_all_but_issuances {
    ($inner:ident) => {
        fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
            self.$inner.create_token(token)
        }
        fn consume_token(
            &self,
            hash: &str,
            now: u64,
            node_id: &dyn Fn(&str, &str) -> String,
        ) -> Result<TokenOutcome, StoreError> {
            self.$inner.consume_token(hash, now, node_id)
        }
        fn attest_kubernetes_node(
            &self,
            node: &NodeRecord,
        ) -> Result<KubernetesNodeOutcome, StoreError> {
            self.$inner.attest_kubernetes_node(node)
        }
        fn token_used(&self, hash: &str) -> Result<Option<bool>, StoreError> {
            self.$inner.token_used(hash)
        }
        fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
            self.$inner.node(name)
        }
        fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
            self.$inner.nodes()
        }
        fn ban_node(&self, name: &str) -> Result<bool, StoreError> {
            self.$inner.ban_node(name)
        }
        fn insert_entry(&self, entry: &Entry) -> Result<(), StoreError> {
            self.$inner.insert_entry(entry)
        }
        fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
            self.$inner.delete_entry(id)
        }
        fn entries(&self) -> Result<Vec<Entry>, StoreError> {
            self.$inner.entries()
        }
        fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
            self.$inner.entry(id)
        }
        fn registers(&self, spiffe_id: &str) -> Result<bool, StoreError> {
            self.$inner.registers(spiffe_id)
        }
        fn issuances(&self) -> Result<Vec<Issuance>, StoreError> {
            self.$inner.issuances()
        }
        fn issuance_count(&self) -> Result<u64, StoreError> {
            self.$inner.issuance_count()
        }
        fn prune(&self, before: u64) -> Result<Pruned, StoreError> {
            self.$inner.prune(before)
        }
        fn put_report(&self, report: &StoredReport) -> Result<(), StoreError> {
            self.$inner.put_report(report)
        }
        fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
            self.$inner.reports()
        }
        fn settle_bundle_version(&self, digest: &str) -> Result<u64, StoreError> {
            self.$inner.settle_bundle_version(digest)
        }
        fn load_document(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
            self.$inner.load_document(name)
        }
        fn store_document(
            &self,
            name: &str,
            expected: u64,
            value: &[u8],
        ) -> Result<Option<u64>, StoreError> {
            self.$inner.store_document(name, expected, value)
        }
        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.$inner.changes()
        }
    };
}

impl<S: Store> Store for GroupCommit<S> {
    fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError> {
        if issued.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        if self.enqueue(issued.to_vec(), Answer::Block(tx)).is_err() {
            return Err(closing());
        }
        blocking(|| rx.recv().unwrap_or_else(|_| Err(closing())))
    }

    fn submit_issuances(&self, issued: Vec<Issuance>) -> Committing {
        if issued.is_empty() {
            return Committing::done(Ok(()));
        }
        let (tx, rx) = oneshot::channel();
        match self.enqueue(issued, Answer::Await(tx)) {
            Ok(()) => Committing(State::Waiting(rx)),
            Err(_) => Committing::done(Err(closing())),
        }
    }

    pass_on_all_but_issuances!(inner);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

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

    fn sqlite(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("db")).expect("open")
    }

    /// SQLite whose issuance commits wait for the test: each commit reports its group on
    /// `entered`, then takes its outcome from `release` (`Ok`: it really commits).
    struct Gated {
        inner: SqliteStore,
        entered: Mutex<mpsc::Sender<Vec<String>>>,
        release: Mutex<mpsc::Receiver<Result<(), StoreError>>>,
    }

    /// The test's end of a [`Gated`] store.
    struct Gate {
        entered: mpsc::Receiver<Vec<String>>,
        release: mpsc::Sender<Result<(), StoreError>>,
    }

    fn gated(dir: &tempfile::TempDir) -> (GroupCommit<Gated>, Gate) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let store = Gated {
            inner: sqlite(dir),
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
        };
        let gate = Gate { entered, release };
        (GroupCommit::new(store).expect("committer"), gate)
    }

    impl Gate {
        /// Waits for the next commit to start; its group's serials, sorted.
        fn next_group(&self) -> Vec<String> {
            let mut group = self.entered.recv().expect("a commit starts");
            group.sort();
            group
        }
    }

    fn serials(issued: &[Issuance]) -> Vec<String> {
        issued.iter().map(|i| i.serial.clone()).collect()
    }

    impl Store for Gated {
        fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError> {
            let entered = self.entered.lock().expect("lock").clone();
            entered.send(serials(issued)).expect("the test listens");
            let outcome = self.release.lock().expect("lock").recv().expect("released");
            outcome.and_then(|()| self.inner.record_issuances(issued))
        }
        pass_on_all_but_issuances!(inner);
    }

    /// Awaits `serial`'s commit on a task; once answered, reports whether the store held it.
    fn awaiting(
        store: &Arc<GroupCommit<Gated>>,
        serial: &str,
    ) -> tokio::task::JoinHandle<Result<bool, StoreError>> {
        let committing = store.submit_issuances(vec![issuance(serial.to_owned())]);
        let (store, serial) = (Arc::clone(store), serial.to_owned());
        tokio::spawn(async move {
            committing.await?;
            Ok(store.issuances()?.iter().any(|i| i.serial == serial))
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn awaiting_writers_share_commits_and_each_is_answered_after_its_own_group() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, gate) = gated(&dir);
        let store = Arc::new(store);
        let first = awaiting(&store, "a0");
        assert_eq!(gate.next_group(), ["a0"]);
        // Queued while the first group commits: they form the next group, together.
        let later: Vec<String> = (0..16).map(|i| format!("b{i:02}")).collect();
        let waiting: Vec<_> = later.iter().map(|s| awaiting(&store, s)).collect();
        tokio::task::yield_now().await;
        assert!(!first.is_finished(), "answered before its commit ended");
        gate.release.send(Ok(())).expect("release");
        assert!(
            first.await.expect("task").expect("committed"),
            "a0 answered, not stored"
        );
        assert_eq!(gate.next_group(), later);
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "a later write was answered before its own group committed"
        );
        gate.release.send(Ok(())).expect("release");
        for (serial, w) in later.iter().zip(waiting) {
            assert!(
                w.await.expect("task").expect("committed"),
                "{serial} answered, not stored"
            );
        }
        assert_eq!(store.commits(), 2, "17 writes, 2 commits");
        assert_eq!(store.issuance_count().expect("count"), 17);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_fails_every_member_of_its_group_alike() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, gate) = gated(&dir);
        let store = Arc::new(store);
        for (failure, retryable) in [
            (StoreError::Unavailable("connection lost".into()), true),
            (StoreError::Exists("issuance".into()), false),
        ] {
            let holding = awaiting(&store, &format!("hold{retryable}"));
            gate.next_group();
            let members: Vec<_> = (0..4)
                .map(|i| awaiting(&store, &format!("m{retryable}{i}")))
                .collect();
            gate.release.send(Ok(())).expect("release");
            holding.await.expect("task").expect("committed");
            assert_eq!(gate.next_group().len(), 4);
            gate.release.send(Err(failure)).expect("fail the group");
            for m in members {
                let err = m.await.expect("task").expect_err("the group failed");
                assert!(matches!(err, StoreError::GroupFailed { .. }), "{err}");
                assert_eq!(err.is_retryable(), retryable, "{err}");
            }
        }
        // Nothing of the failed groups was stored; the next group commits.
        assert_eq!(store.issuance_count().expect("count"), 2);
        let next = awaiting(&store, "after");
        gate.next_group();
        gate.release.send(Ok(())).expect("release");
        assert!(next.await.expect("task").expect("committed"));
    }

    #[test]
    fn concurrent_blocking_writers_share_commits_and_every_write_is_committed_when_answered() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(GroupCommit::new(sqlite(&dir)).expect("committer"));
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_constraint_failure_is_not_retryable_and_the_next_group_commits() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = GroupCommit::new(sqlite(&dir)).expect("committer");
        store
            .submit_issuances(vec![issuance("01".into())])
            .await
            .expect("first");
        // The same serial again violates the primary key: the group fails, and says so.
        let err = store
            .submit_issuances(vec![issuance("01".into())])
            .await
            .expect_err("duplicate");
        assert!(!err.is_retryable(), "{err}");
        store
            .record_issuances(&[issuance("02".into())])
            .expect("the next group commits");
    }
}
