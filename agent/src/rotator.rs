//! The rotator: the single writer of the agent's credentials. One task that syncs entries and
//! bundles, schedules every entry (see [`crate::rotation`]), sends batched CSRs under a cap on
//! concurrent signing requests, checks and installs what comes back, renews the node SVID,
//! restores a tampered volume, and publishes every change to the [`Cache`] and the report.
//!
//! Network calls run in spawned tasks that send their results back as events; everything that
//! writes (volume, state folder, cache) happens on this task, one step at a time, so a SIGTERM
//! is only handled between two complete installs.
//!
//! A call that fails because the holder as a whole is down backs nothing off: the rotator
//! stops sending CSRs, probes the holder while anything is due, and sends every due identity
//! at the first answer (see [`crate::reachability`]).

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use meshcert_protocol::api::{
    AttestRequest, Bundles, CsrRequest, RenewRequest, SignOutcome, SignRequest, SyncResponse,
};
use meshcert_protocol::{CertState, Enforcement, Entry, IdentityReport, NodeReport, TrustDomain};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::cache::{AgentStatus, Cache, InstalledSvid, Intermediates, Snapshot};
use crate::config::Config;
use crate::heap::Trimmer;
use crate::issuer::{Issuer, IssuerError};
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};
use crate::node::{self, NodeError, NodeIdentity};
use crate::reachability::Reachability;
use crate::reissue;
use crate::rotation::{self, Schedule};
use crate::svid::{self, LeafInfo};
use crate::volume::{Contents, Volume};
use crate::{csr, hook, report, systemd};

/// How often the rotator looks at the wall clock.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the volume is compared with memory even without a file event (the watcher does
/// not see writes into served files: see [`crate::changes`]).
pub const VOLUME_CHECK_EVERY: Duration = Duration::from_secs(5);
/// The heap's free pages go back to the kernel at most this often (after a publish).
const HEAP_TRIM_EVERY: Duration = Duration::from_secs(1);

/// Why joining or starting the rotator failed.
#[derive(Debug, thiserror::Error)]
pub enum RotatorError {
    /// The state folder failed.
    #[error(transparent)]
    State(#[from] NodeError),
    /// A key could not be generated.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A CSR could not be built.
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    /// The holder refused or could not be reached.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The holder's answer was not a usable SVID.
    #[error("the holder's node SVID is unusable: {0}")]
    Svid(#[from] svid::SvidError),
    /// The shared volume could not be created.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
}

/// What the daemon asks of the rotator.
#[derive(Debug)]
pub enum Command {
    /// A new, valid configuration (SIGHUP or a change of the file).
    Reload(Box<Config>),
    /// Sync with the holder now.
    SyncNow,
}

/// CSRs per signing request. The holder takes up to [`meshcert_protocol::api::MAX_BATCH`]; smaller batches keep
/// the agent's peak memory (keys, CSRs, request and answer bodies of the batches in flight,
/// `rotation.maxConcurrentSigning` of them) low, for a few more round trips.
const SIGN_BATCH: usize = 64;

/// Blocking tasks one batch of keys is split into (RSA keys take a while: two cores).
const KEYGEN_TASKS: usize = 2;

/// Generates a key (RSA keys off the async threads: they take a while).
pub(crate) async fn generate_key(algorithm: KeyAlgorithm) -> Result<PrivateKey, KeyError> {
    let mut keys = generate_keys(algorithm, 1).await?;
    keys.pop()
        .map_or_else(|| PrivateKey::generate(algorithm), Ok)
}

/// Generates `count` keys: ECDSA keys at once, RSA keys (slow) off the async threads in at
/// most [`KEYGEN_TASKS`] blocking tasks (not one per key), so that a batch of 256 rotations
/// does not spread over a large blocking pool, each thread of which keeps its own malloc arena.
async fn generate_keys(algorithm: KeyAlgorithm, count: usize) -> Result<Vec<PrivateKey>, KeyError> {
    let some = move |n: usize| {
        (0..n)
            .map(|_| PrivateKey::generate(algorithm))
            .collect::<Result<Vec<_>, _>>()
    };
    if matches!(algorithm, KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384) {
        // Tens of µs each: made on this thread, the keys (which live as long as their SVID)
        // stay in this thread's malloc arena instead of pinning one per blocking thread.
        return some(count);
    }
    let per_task = count.div_ceil(KEYGEN_TASKS).max(1);
    let mut tasks = Vec::with_capacity(KEYGEN_TASKS);
    let mut left = count;
    while left > 0 {
        let n = left.min(per_task);
        left -= n;
        tasks.push((n, tokio::task::spawn_blocking(move || some(n))));
    }
    let mut keys = Vec::with_capacity(count);
    for (n, task) in tasks {
        keys.extend(match task.await {
            Ok(result) => result?,
            Err(_) => some(n)?,
        });
    }
    Ok(keys)
}

/// Joins the holder with a one-time token: a fresh node key, a CSR, the node SVID back; stored
/// in the state folder and returned.
pub async fn join<I: Issuer>(
    issuer: &I,
    config: &Config,
    token: &str,
) -> Result<(NodeIdentity, SyncResponse), RotatorError> {
    let key = generate_key(config.key_algorithm).await?;
    let request = AttestRequest {
        token: token.to_owned(),
        csr: csr::build(&key, None)?.into(),
    };
    let response = issuer.attest(request).await?;
    let identity = NodeIdentity::new(
        key,
        response.svid.chain.iter().map(|c| c.0.clone()).collect(),
    )?;
    if response.node != config.node_name || response.mesh != config.mesh {
        tracing::warn!(
            holder_node = %response.node,
            holder_mesh = %response.mesh,
            node = %config.node_name,
            mesh = %config.mesh,
            "the join token was for another node name or mesh than the config says; using the holder's"
        );
    }
    node::store(&config.state_dir, &identity)?;
    let seed = SyncResponse {
        node: response.node,
        mesh: response.mesh,
        trust_domain: identity.info.spiffe_id.trust_domain().clone(),
        enforcement: Enforcement::MeshDefault,
        entries: Vec::new(),
        bundles: response.bundles,
    };
    Ok((identity, seed))
}

/// An installed SVID. Its chain is held once, in `served` (shared with the snapshots).
#[derive(Clone)]
struct Installed {
    key: PrivateKey,
    info: LeafInfo,
    served: Arc<InstalledSvid>,
    /// A gateway's second SVID (same key, chained to the shared root), under limited trust.
    gateway: Option<Gateway>,
}

/// A gateway's second SVID; its chain is `served.chain`.
#[derive(Clone)]
struct Gateway {
    served: Arc<InstalledSvid>,
}

/// A chain that passed [`svid::check`], with what the check read from its leaf.
type CheckedChain = (Vec<Vec<u8>>, LeafInfo);

/// The hint of a gateway's second SVID in the Workload API.
pub const GATEWAY_HINT: &str = "gateway";

struct Managed {
    /// Shared with the served SVIDs (`InstalledSvid::entry`) and the signing jobs.
    entry: Arc<Entry>,
    /// The entry's id, shared with every status and report that lists it.
    id: Arc<str>,
    local: bool,
    current: Option<Installed>,
    schedule: Schedule,
    state: CertState,
    last_error: Option<Arc<str>>,
    attempted: bool,
    in_flight: Option<u64>,
    /// An agent-local entry the holder refused by a local-entry rule
    /// ([`meshcert_protocol::api::ErrorCode::refuses_local_entry`]): not asked for again until
    /// the entry or the enforcement mode changes (the status keeps showing the refusal).
    denied: bool,
    /// The folder may hold [`crate::volume::STATE_FILE`] (an expiry, or a previous run's):
    /// removed at the next install.
    marked_expired: bool,
}

impl Managed {
    fn new(entry: Arc<Entry>, local: bool, now: SystemTime) -> Self {
        Self {
            id: entry.id.as_str().into(),
            entry,
            local,
            current: None,
            schedule: Schedule::now(now),
            state: CertState::Pending,
            last_error: None,
            attempted: false,
            in_flight: None,
            denied: false,
            marked_expired: true,
        }
    }

    fn report(&self) -> IdentityReport {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok();
        IdentityReport {
            entry_id: self.id.clone(),
            spiffe_id: self.entry.spiffe_id.clone(),
            state: self.state,
            serial: self.current.as_ref().map(|c| c.info.serial.clone()),
            not_after: self.current.as_ref().and_then(|c| unix(c.info.not_after)),
            next_rotation: unix(self.schedule.next_at),
            last_error: self.last_error.clone(),
            attempts: self.schedule.failures,
        }
    }
}

/// Runs a background task's `work`; a panic inside it (a bug) becomes
/// [`IssuerError::Internal`], so the task still reports an outcome and nothing it carried
/// stays in flight.
async fn unless_panicked<T>(work: impl Future<Output = T>) -> Result<T, IssuerError> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".to_owned());
            IssuerError::Internal(message)
        })
}

type SignedBatch = Result<(Vec<(String, PrivateKey, SignOutcome)>, Bundles), IssuerError>;

fn ders(chain: Vec<meshcert_protocol::api::Der>) -> Vec<Vec<u8>> {
    chain.into_iter().map(|c| c.0).collect()
}

/// Why a node SVID renewal failed, and whether it was because the holder is down.
struct RenewFailure {
    message: String,
    holder_down: bool,
}

impl RenewFailure {
    fn other(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            holder_down: false,
        }
    }
}

enum Event {
    Synced(Result<SyncResponse, IssuerError>),
    Signed {
        request: u64,
        ids: Vec<String>,
        result: SignedBatch,
    },
    Renewed(Result<NodeIdentity, RenewFailure>),
    Probed(Result<(), IssuerError>),
    HookDone {
        entry_id: String,
        error: Option<String>,
    },
}

/// The single writer of credentials; see the module documentation.
pub struct Rotator<I: Issuer> {
    issuer: Arc<I>,
    cache: Cache,
    volume: Volume,
    config: Config,
    node: NodeIdentity,
    node_schedule: Schedule,
    node_renewing: bool,
    /// The last sync answer without its entries (they are in `holder_entries`).
    last_sync: SyncResponse,
    /// The holder's entries of the last sync, in its order; each is shared with `managed`, so
    /// that 1000 entries are held once, not twice.
    holder_entries: Vec<Arc<Entry>>,
    have_sync: bool,
    sync_attempted: bool,
    sync_in_flight: bool,
    sync_failures: u32,
    next_sync: SystemTime,
    managed: BTreeMap<String, Managed>,
    order: Vec<String>,
    semaphore: Arc<Semaphore>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
    reports: watch::Sender<NodeReport>,
    ca_connected: bool,
    ca_last_error: Option<String>,
    /// Whether the holder answers, and the outage in progress.
    reach: Reachability,
    requests: u64,
    ready_sent: bool,
    node_expired_logged: bool,
    status_line: String,
    volume_changed: Arc<crate::changes::Changes>,
    heap: Trimmer,
    intermediates: Intermediates,
    /// Holder entries whose hook was stripped (shown in the status).
    hooks_stripped: Vec<String>,
}

/// Whether a sync answer equals the last one (`b`, whose entries are `b_entries`), field by
/// field (without building two JSON trees of every entry, as comparing their serialized forms
/// would).
fn same_sync(a: &SyncResponse, b: &SyncResponse, b_entries: &[Arc<Entry>]) -> bool {
    // Destructured so that a field added to the contract cannot be left out here.
    let SyncResponse {
        node,
        mesh,
        trust_domain,
        enforcement,
        entries,
        bundles,
    } = a;
    *node == b.node
        && *mesh == b.mesh
        && *trust_domain == b.trust_domain
        && *enforcement == b.enforcement
        && entries.len() == b_entries.len()
        && entries.iter().zip(b_entries).all(|(a, b)| *a == **b)
        && *bundles == b.bundles
}

fn bundle_map(b: &Bundles) -> BTreeMap<TrustDomain, Vec<Vec<u8>>> {
    b.trust_domains
        .iter()
        .map(|(td, certs)| (td.clone(), certs.iter().map(|c| c.0.clone()).collect()))
        .collect()
}

impl<I: Issuer> Rotator<I> {
    /// A rotator for a joined node. `last_sync` is what the state folder holds (or what the
    /// join returned): the entries found there are loaded from the volume and served at once
    /// when they are still valid.
    pub fn new(
        issuer: Arc<I>,
        cache: Cache,
        config: Config,
        node: NodeIdentity,
        last_sync: Option<SyncResponse>,
        volume_changed: Arc<crate::changes::Changes>,
    ) -> Self {
        let now = SystemTime::now();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (reports, _) = watch::channel(NodeReport::default());
        let node_schedule = Schedule::for_certificate(
            node.info.not_before,
            node.info.not_after,
            &config.rotation,
            rotation::jitter_for(&node.info.serial, config.rotation.jitter),
        );
        let have_sync = last_sync.is_some();
        let last_sync = last_sync.unwrap_or_else(|| SyncResponse {
            node: config.node_name.clone(),
            mesh: config.mesh.clone(),
            trust_domain: node.info.spiffe_id.trust_domain().clone(),
            enforcement: Enforcement::MeshDefault,
            entries: Vec::new(),
            bundles: Bundles::default(),
        });
        let mut rotator = Self {
            issuer,
            cache,
            volume: Volume::new(config.volume_dir.clone()),
            semaphore: Arc::new(Semaphore::new(config.rotation.max_concurrent_signing)),
            config,
            node,
            node_schedule,
            node_renewing: false,
            last_sync,
            holder_entries: Vec::new(),
            have_sync,
            sync_attempted: false,
            sync_in_flight: false,
            sync_failures: 0,
            next_sync: now,
            managed: BTreeMap::new(),
            order: Vec::new(),
            events_tx,
            events_rx,
            tasks: JoinSet::new(),
            reports,
            ca_connected: false,
            ca_last_error: None,
            reach: Reachability::default(),
            requests: 0,
            ready_sent: false,
            node_expired_logged: false,
            status_line: String::new(),
            volume_changed,
            heap: Trimmer::new(HEAP_TRIM_EVERY),
            intermediates: Intermediates::default(),
            hooks_stripped: Vec::new(),
        };
        let seed = std::mem::take(&mut rotator.last_sync.entries);
        rotator.apply_sync(
            SyncResponse {
                entries: seed,
                ..rotator.last_sync.clone()
            },
            now,
        );
        rotator
    }

    /// A receiver of the node report, for [`report::run`].
    pub fn reports(&self) -> watch::Receiver<NodeReport> {
        self.reports.subscribe()
    }

    /// Runs until `shutdown` completes; an install in progress always completes first.
    /// Returns how many of its background tasks (signing, sync, hooks) were still held when it
    /// stopped: those in flight, as finished ones are freed as they end.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> usize {
        tokio::pin!(shutdown);
        // By the clock, not by wake-ups: while rotations run back to back the rotator wakes far
        // more often than once per TICK, and a check reads every folder.
        let mut next_check = tokio::time::Instant::now() + VOLUME_CHECK_EVERY;
        let volume_changed = self.volume_changed.clone();
        self.on_tick(SystemTime::now(), false);
        loop {
            // Wake at the next due moment, and at least every TICK to re-read the wall clock
            // (a suspend or a clock jump forward makes rotations due at once).
            let wake = tokio::time::Instant::now() + self.next_wake(SystemTime::now());
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(command) = commands.recv() => self.on_command(command),
                Some(event) = self.events_rx.recv() => self.on_event(event),
                () = volume_changed.changed() => self.on_volume_changes(),
                () = tokio::time::sleep_until(wake) => {
                    let check = tokio::time::Instant::now() >= next_check;
                    if check {
                        next_check = tokio::time::Instant::now() + VOLUME_CHECK_EVERY;
                    }
                    self.on_tick(SystemTime::now(), check);
                }
            }
        }
        self.reap_tasks();
        let held = self.tasks.len();
        self.tasks.abort_all();
        tracing::info!("rotator stopped");
        held
    }

    /// How long until something is due (an entry, the node SVID, a sync), at most [`TICK`].
    /// While the holder is down, due entries and the node SVID wait for the next probe.
    fn next_wake(&self, now: SystemTime) -> Duration {
        let mut next = now + TICK;
        if self.reach.is_down() {
            if let Some(probe) = self.reach.next_probe() {
                next = next.min(probe);
            }
        } else {
            let can_sign = self.can_sign();
            for m in self.managed.values() {
                if can_sign && m.in_flight.is_none() && !m.denied {
                    next = next.min(m.schedule.next_at);
                }
            }
            if !self.node_renewing {
                next = next.min(self.node_schedule.next_at);
            }
        }
        if !self.sync_in_flight {
            next = next.min(self.next_sync);
        }
        next.duration_since(now).unwrap_or_default()
    }

    /// The entries due at `now` (not in flight, not refused for good), in entry order.
    fn due_entries(&self, now: SystemTime) -> Vec<String> {
        if !self.can_sign() {
            return Vec::new();
        }
        self.order
            .iter()
            .filter(|id| {
                self.managed
                    .get(*id)
                    .is_some_and(|m| m.in_flight.is_none() && !m.denied && m.schedule.is_due(now))
            })
            .cloned()
            .collect()
    }

    fn can_sign(&self) -> bool {
        self.have_sync || !self.last_sync.bundles.trust_domains.is_empty()
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::SyncNow => {
                self.next_sync = SystemTime::now();
                self.on_tick(SystemTime::now(), false);
            }
            Command::Reload(config) => self.reload(*config),
        }
    }

    fn reload(&mut self, config: Config) {
        let old = &self.config;
        for (what, changed) in [
            ("caAddress", old.ca_address != config.ca_address),
            ("trustBundle", old.trust_roots != config.trust_roots),
            ("stateDir", old.state_dir != config.state_dir),
            ("volumeDir", old.volume_dir != config.volume_dir),
            (
                "workloadSocket",
                old.workload_socket != config.workload_socket,
            ),
            ("adminSocket", old.admin_socket != config.admin_socket),
            ("nodeName", old.node_name != config.node_name),
            ("mesh", old.mesh != config.mesh),
        ] {
            if changed {
                tracing::warn!(
                    setting = what,
                    "changing this setting needs a restart; keeping the running value"
                );
            }
        }
        let mut next = config;
        next.ca_address = old.ca_address.clone();
        next.ca_server_name = old.ca_server_name.clone();
        next.trust_bundle = old.trust_bundle.clone();
        next.trust_roots = old.trust_roots.clone();
        next.state_dir = old.state_dir.clone();
        next.volume_dir = old.volume_dir.clone();
        next.workload_socket = old.workload_socket.clone();
        next.admin_socket = old.admin_socket.clone();
        next.node_name = old.node_name.clone();
        next.mesh = old.mesh.clone();
        if next.rotation.max_concurrent_signing != old.rotation.max_concurrent_signing {
            self.semaphore = Arc::new(Semaphore::new(next.rotation.max_concurrent_signing));
        }
        self.config = next;
        self.reapply(self.last_sync.clone(), SystemTime::now());
        self.next_sync = SystemTime::now();
        tracing::info!("configuration reloaded");
    }

    // ---- sync -------------------------------------------------------------------------

    fn start_sync(&mut self) {
        self.sync_in_flight = true;
        let issuer = self.issuer.clone();
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let result = unless_panicked(issuer.sync()).await.and_then(|r| r);
            let _ = tx.send(Event::Synced(result));
        });
    }

    fn on_synced(&mut self, result: Result<SyncResponse, IssuerError>, now: SystemTime) {
        self.sync_in_flight = false;
        self.sync_attempted = true;
        match result {
            Ok(response) => {
                self.holder_answered(now);
                self.sync_failures = 0;
                self.next_sync = now + self.config.sync_interval;
                let changed =
                    !self.have_sync || !same_sync(&response, &self.last_sync, &self.holder_entries);
                if changed && let Err(e) = node::store_last_sync(&self.config.state_dir, &response)
                {
                    tracing::warn!(error = %e, "cannot store the last sync");
                }
                self.have_sync = true;
                self.apply_sync(response, now);
            }
            Err(e) if e.is_holder_down() => {
                // The normal schedule: probes (while something is due) see the return first.
                self.next_sync = now + self.config.sync_interval;
                self.holder_down(now, &e);
            }
            Err(e) => {
                self.sync_failures = self.sync_failures.saturating_add(1);
                let wait = rotation::backoff(
                    self.sync_failures,
                    self.config.rotation.backoff_initial,
                    self.config.rotation.backoff_max,
                    fastrand::f64(),
                )
                .min(self.config.sync_interval);
                self.next_sync = now + wait;
                self.log_failure("sync", &e, self.sync_failures);
                self.holder_answered(now);
                self.connected(!e.is_unreachable(), Some(e.to_string()));
            }
        }
    }

    /// Makes the managed entries those of `response` plus the config's local entries inside
    /// the trust domain (signed only under DISABLED; see [`Self::apply_enforcement`]), adopting
    /// valid SVIDs already on disk. New bundles are written into every folder at once, and an
    /// SVID that no longer verifies against them is issued again.
    fn apply_sync(&mut self, mut response: SyncResponse, now: SystemTime) {
        let stripped = hook::strip_from_holder(&mut response.entries);
        if stripped != self.hooks_stripped {
            for id in stripped
                .iter()
                .filter(|id| !self.hooks_stripped.contains(id))
            {
                tracing::warn!(entry_id = %id, "the holder's entry carries a hook: ignored (hooks are node configuration, set in the agent's config)");
            }
            self.hooks_stripped = stripped;
        }
        // An entry equal to the one already managed keeps that one's allocation.
        let entries = std::mem::take(&mut response.entries)
            .into_iter()
            .map(|e| match self.managed.get(&e.id) {
                Some(m) if *m.entry == e => m.entry.clone(),
                _ => Arc::new(e),
            })
            .collect();
        self.holder_entries = entries;
        self.reapply(response, now);
    }

    /// [`Self::apply_sync`] with `header` (a sync answer without its entries) and the holder's
    /// entries already held (after a reload, or new bundles from a signing answer).
    fn reapply(&mut self, header: SyncResponse, now: SystemTime) {
        debug_assert!(header.entries.is_empty());
        let bundles_changed = header.bundles != self.last_sync.bundles;
        let enforcement_changed = header.enforcement != self.last_sync.enforcement;
        self.last_sync = header;
        let td = self.last_sync.trust_domain.clone();
        let local_allowed = self.last_sync.enforcement == Enforcement::Disabled;
        let mut desired: Vec<(Arc<Entry>, bool)> = self
            .holder_entries
            .iter()
            .map(|e| (e.clone(), false))
            .collect();
        // Local entries are asked for under every mode, once per mode: the holder signs them
        // under DISABLED when its local-entry rules allow them and refuses them otherwise (the
        // refusal's code names the rule), and the status shows which.
        let known: BTreeSet<String> = desired.iter().map(|(e, _)| e.id.clone()).collect();
        for e in &self.config.entries {
            if known.contains(&e.id) {
                tracing::warn!(entry_id = %e.id, "a local entry has the id of a holder entry; the holder's wins");
            } else {
                desired.push((Arc::new(e.clone()), true));
            }
        }
        // Two entries cannot share a folder: the first one keeps it.
        let mut dirs = BTreeSet::new();
        desired.retain(|(e, _)| {
            let fresh = dirs.insert(e.dir.clone());
            if !fresh {
                tracing::warn!(entry_id = %e.id, dir = %e.dir, "another entry already uses this folder; ignored");
            }
            fresh && meshcert_protocol::entry::valid_dir(&e.dir)
        });

        let wanted: BTreeSet<&str> = desired.iter().map(|(e, _)| e.id.as_str()).collect();
        let removed: Vec<String> = self
            .managed
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in removed {
            if let Some(m) = self.managed.remove(&id) {
                tracing::info!(entry_id = %id, dir = %m.entry.dir, "entry removed; removing its folder");
                if let Err(e) = self.volume.remove(&m.entry.dir) {
                    tracing::warn!(entry_id = %id, error = %e, "cannot remove the folder of a removed entry");
                }
            }
        }

        for (entry, local) in &desired {
            match self.managed.get_mut(&entry.id) {
                None => {
                    let mut m = Managed::new(entry.clone(), *local, now);
                    let outside = *local && !td.contains(&entry.spiffe_id);
                    if outside {
                        tracing::warn!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, trust_domain = %td, "a local entry is outside the node's trust domain: the holder refuses it under every mode");
                    }
                    if outside || (*local && !local_allowed) {
                        // Enforced: a local SVID left on disk is not served.
                        if let Err(e) = self.volume.remove(&entry.dir) {
                            tracing::warn!(entry_id = %entry.id, error = %e, "cannot remove the folder of a local entry");
                        }
                    } else {
                        self.adopt_from_disk(&mut m, now);
                    }
                    self.managed.insert(entry.id.clone(), m);
                }
                Some(m) if *m.entry == **entry && !bundles_changed => m.local = *local,
                Some(m) => {
                    let old = std::mem::replace(&mut m.entry, entry.clone());
                    m.local = *local;
                    if *old != **entry {
                        m.denied = false;
                    }
                    if old.spiffe_id != entry.spiffe_id {
                        tracing::info!(entry_id = %entry.id, "entry's SPIFFE ID changed; issuing a new SVID");
                        m.current = None;
                        m.in_flight = None;
                        m.state = CertState::Pending;
                        m.schedule = Schedule::now(now);
                        if old.dir != entry.dir {
                            let _ = self.volume.remove(&old.dir);
                        }
                        continue;
                    }
                    if old.dir != entry.dir {
                        let _ = self.volume.remove(&old.dir);
                    }
                    if old.owner != entry.owner {
                        // The old owner could read the key: the new one gets a fresh key now.
                        tracing::info!(entry_id = %entry.id, "entry's owner changed; issuing an SVID with a new key");
                        m.schedule = Schedule::now(now);
                    }
                    if let Some(current) = m.current.clone() {
                        // Selectors, folder, owner or bundles changed: the same SVID is served
                        // under the new entry (and written again where needed).
                        let gateway = current.gateway.clone().map(|g| Gateway {
                            served: Arc::new(InstalledSvid {
                                entry: m.entry.clone(),
                                ..(*g.served).clone()
                            }),
                        });
                        m.current = Some(Installed {
                            served: Arc::new(InstalledSvid {
                                entry: m.entry.clone(),
                                ..(*current.served).clone()
                            }),
                            gateway,
                            ..current
                        });
                    }
                }
            }
        }
        // Not `into_iter()`: collecting in place would keep the entries' whole buffer as the
        // capacity of this list of ids (about 300 KB at 1000 entries instead of 24 KB).
        self.order = desired.iter().map(|(e, _)| e.id.clone()).collect();
        if enforcement_changed {
            self.apply_enforcement(local_allowed, now);
        }
        if bundles_changed {
            self.reissue_unverifiable(now);
            self.rewrite_all();
        } else {
            self.check_volume_quiet();
        }
        // A root rotation's activation brings every SVID under the previous root forward.
        let hint = self.last_sync.bundles.rotation.clone();
        for m in self.managed.values_mut() {
            if let Some(c) = &m.current {
                let (at, chain) = (m.schedule.next_at, c.served.chain());
                m.schedule.next_at = reissue::earliest(at, &chain, hint.as_ref(), &m.entry.id, now);
                // A gateway's second SVID chains to the shared root: it counts the same.
                if let Some(g) = &c.gateway {
                    let (at, chain) = (m.schedule.next_at, g.served.chain());
                    m.schedule.next_at =
                        reissue::earliest(at, &chain, hint.as_ref(), &m.entry.id, now);
                }
            }
        }
        let (at, node) = (self.node_schedule.next_at, &self.node.chain);
        let name = &self.config.node_name;
        self.node_schedule.next_at = reissue::earliest(at, node, hint.as_ref(), name, now);
        self.publish();
    }

    /// A new enforcement mode for the local entries: under DISABLED they are asked for at once
    /// (again, if the holder refused them before); otherwise their SVIDs stop being served and
    /// their folders go at once (the node reports the mode applied only once it is), and the
    /// holder is asked once more so the status shows its answer (`policy_denied`).
    fn apply_enforcement(&mut self, local_allowed: bool, now: SystemTime) {
        for m in self.managed.values_mut().filter(|m| m.local) {
            m.denied = false;
            // An answer to a request sent under the previous mode is not used.
            m.in_flight = None;
            if !local_allowed && m.current.take().is_some() {
                tracing::info!(entry_id = %m.entry.id, dir = %m.entry.dir, "access control is enforced: the local entry's SVID is no longer served");
                if let Err(e) = self.volume.remove(&m.entry.dir) {
                    tracing::warn!(entry_id = %m.entry.id, error = %e, "cannot remove the folder of a local entry");
                }
                m.state = CertState::Pending;
            }
            if m.current.is_none() {
                m.schedule = Schedule::now(now);
            }
        }
    }

    /// After a bundle change, every SVID that no longer verifies against its trust domain's
    /// new roots (a mesh root replaced) is issued again at once; the old one is served until
    /// then.
    fn reissue_unverifiable(&mut self, now: SystemTime) {
        let stale: Vec<String> = self
            .managed
            .values()
            .filter(|m| {
                m.current.as_ref().is_some_and(|c| {
                    let roots = self.roots_for(&m.entry);
                    let main =
                        svid::check(&c.served.chain(), &c.key, &roots, &m.entry.spiffe_id, now);
                    let gateway = c.gateway.as_ref().map(|g| {
                        svid::check(
                            &g.served.chain(),
                            &c.key,
                            &self.shared_root(),
                            &m.entry.spiffe_id,
                            now,
                        )
                    });
                    main.is_err() || gateway.is_some_and(|g| g.is_err())
                })
            })
            .map(|m| m.entry.id.clone())
            .collect();
        for id in stale {
            if let Some(m) = self.managed.get_mut(&id) {
                tracing::info!(entry_id = %id, "the SVID does not verify against the new bundle; issuing a new one");
                m.schedule = Schedule::now(now);
            }
        }
    }

    /// Loads a still-valid SVID of `m` from the volume (after a restart), if there is one.
    fn adopt_from_disk(&self, m: &mut Managed, now: SystemTime) {
        let roots = self.roots_for(&m.entry);
        let loaded = match self.volume.load(&m.entry.dir) {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(entry_id = %m.entry.id, error = %e, "the SVID on disk is unusable; issuing a new one");
                return;
            }
        };
        let crate::volume::OnDisk {
            chain,
            key,
            gateway_chain,
        } = loaded;
        let gateway = match self.check_gateway(&m.entry, &key, gateway_chain, now) {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(entry_id = %m.entry.id, error = %e, "the gateway SVID on disk does not check out; issuing a new one");
                return;
            }
        };
        let skew = self.config.clock_skew;
        match svid::check_with_skew(&chain, &key, &roots, &m.entry.spiffe_id, now, skew) {
            Ok(info) => {
                tracing::info!(entry_id = %m.entry.id, serial = %info.serial, "serving the SVID found on disk");
                m.schedule = Schedule::for_certificate(
                    info.not_before,
                    info.not_after,
                    &self.config.rotation,
                    rotation::jitter_for(&info.serial, self.config.rotation.jitter),
                );
                m.current = Some(self.installed(&m.entry, key, chain, info, gateway));
                m.state = CertState::Issued;
                m.attempted = true;
            }
            Err(e) => {
                tracing::info!(entry_id = %m.entry.id, error = %e, "the SVID on disk does not check out; issuing a new one");
            }
        }
    }

    fn roots_for(&self, entry: &Entry) -> Vec<Vec<u8>> {
        self.last_sync
            .bundles
            .trust_domains
            .get(entry.spiffe_id.trust_domain())
            .map(|certs| certs.iter().map(|c| c.0.clone()).collect())
            .unwrap_or_default()
    }

    /// The leaf, and the intermediates after it as the shared copy.
    fn split_chain(&self, chain: Vec<Vec<u8>>) -> (Vec<u8>, Arc<[Vec<u8>]>) {
        let mut certs = chain.into_iter();
        let leaf = certs.next().unwrap_or_default();
        (leaf, self.intermediates.share(certs.collect()))
    }

    fn installed(
        &self,
        entry: &Arc<Entry>,
        key: PrivateKey,
        chain: Vec<Vec<u8>>,
        info: LeafInfo,
        gateway: Option<CheckedChain>,
    ) -> Installed {
        let key_pkcs8 = key.shared_pkcs8();
        let (leaf, intermediates) = self.split_chain(chain);
        let served = Arc::new(InstalledSvid {
            entry: entry.clone(),
            spiffe_id: info.spiffe_id.clone(),
            leaf,
            intermediates,
            key_pkcs8: key_pkcs8.clone(),
            not_after: info.not_after,
            hint: entry.id.clone(),
        });
        let gateway = gateway.map(|(chain, ginfo)| {
            let (leaf, intermediates) = self.split_chain(chain);
            Gateway {
                served: Arc::new(InstalledSvid {
                    entry: entry.clone(),
                    spiffe_id: ginfo.spiffe_id.clone(),
                    leaf,
                    intermediates,
                    key_pkcs8,
                    not_after: ginfo.not_after,
                    hint: GATEWAY_HINT.into(),
                }),
            }
        });
        Installed {
            key,
            info,
            served,
            gateway,
        }
    }

    /// Checks a gateway's second chain against the shared root. `Ok(None)` when the entry needs
    /// none (not a gateway, or no limited trust).
    fn check_gateway(
        &self,
        entry: &Entry,
        key: &PrivateKey,
        chain: Option<Vec<Vec<u8>>>,
        now: SystemTime,
    ) -> Result<Option<CheckedChain>, svid::SvidError> {
        let shared = self.shared_root();
        if !entry.gateway || shared.is_empty() {
            return Ok(None);
        }
        let chain = chain.ok_or(svid::SvidError::Empty)?;
        let info = svid::check(&chain, key, &shared, &entry.spiffe_id, now)?;
        Ok(Some((chain, info)))
    }

    fn shared_root(&self) -> Vec<Vec<u8>> {
        self.last_sync
            .bundles
            .shared_root
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }

    // ---- volume -----------------------------------------------------------------------

    fn write(&self, entry: &Entry, current: &Installed) -> Result<(), crate::volume::VolumeError> {
        let volume = &self.volume;
        self.with_contents(entry, current, |contents| {
            tokio::task::block_in_place(|| volume.install(&entry.dir, contents, SystemTime::now()))
        })
    }

    /// What `entry`'s folder holds while `current` is served: the one description both writing
    /// and checking the volume use.
    fn with_contents<R>(
        &self,
        entry: &Entry,
        current: &Installed,
        f: impl FnOnce(&Contents<'_>) -> R,
    ) -> R {
        let bundle = self.roots_for(entry);
        let federated = self.federated_for(entry);
        let shared = self.shared_root();
        let chain = current.served.chain();
        let gateway_chain = current.gateway.as_ref().map(|g| g.served.chain());
        f(&Contents {
            chain: &chain,
            key: &current.key,
            bundle: &bundle,
            federated: &federated,
            owner: entry.owner,
            gateway: gateway_chain.as_deref().map(|g| (g, shared.as_slice())),
        })
    }

    fn federated_for(&self, entry: &Entry) -> BTreeMap<TrustDomain, Vec<Vec<u8>>> {
        let mut all = bundle_map(&self.last_sync.bundles);
        all.remove(entry.spiffe_id.trust_domain());
        all
    }

    fn matches(&self, entry: &Entry, current: &Installed) -> bool {
        self.with_contents(entry, current, |contents| {
            self.volume.matches(&entry.dir, contents)
        })
    }

    fn rewrite_all(&mut self) {
        for id in self.order.clone() {
            let Some(m) = self.managed.get(&id) else {
                continue;
            };
            let Some(current) = &m.current else { continue };
            if let Err(e) = self.write(&m.entry, current) {
                tracing::warn!(entry_id = %id, error = %e, "cannot rewrite the folder with the new bundles");
            }
        }
    }

    /// Restores every folder whose files differ from memory (deleted, changed, replaced).
    fn check_volume(&mut self) {
        let restored = self.restore_volume();
        tracing::debug!(restored, "volume checked");
        if restored > 0 {
            tracing::warn!(
                restored,
                "files of the shared volume were changed or deleted by someone else; restored"
            );
        }
    }

    /// Checks what the volume watcher saw changed by someone else: only those entry folders.
    fn on_volume_changes(&mut self) {
        match self.volume_changed.take() {
            None => {}
            Some(crate::changes::Check::All) => self.check_volume(),
            Some(crate::changes::Check::Dirs(dirs)) => {
                let restored = self.restore_volume_dirs(Some(&dirs));
                if restored > 0 {
                    tracing::warn!(
                        restored,
                        "files of the shared volume were changed or deleted by someone else; restored"
                    );
                }
            }
        }
    }

    fn check_volume_quiet(&mut self) {
        self.restore_volume();
    }

    fn restore_volume(&mut self) -> usize {
        self.restore_volume_dirs(None)
    }

    /// Restores the folders (of `dirs` only, when given) whose files differ from memory.
    fn restore_volume_dirs(&mut self, dirs: Option<&BTreeSet<String>>) -> usize {
        let mut restored = 0;
        for id in &self.order {
            let Some(m) = self.managed.get(id) else {
                continue;
            };
            if dirs.is_some_and(|d| !d.contains(&m.entry.dir)) {
                continue;
            }
            let Some(current) = &m.current else { continue };
            if current.info.not_after <= SystemTime::now() || self.matches(&m.entry, current) {
                continue;
            }
            match self.write(&m.entry, current) {
                Ok(()) => {
                    tracing::info!(entry_id = %id, dir = %m.entry.dir, "folder restored from memory");
                    restored += 1;
                }
                Err(e) => tracing::warn!(entry_id = %id, error = %e, "cannot restore the folder"),
            }
        }
        restored
    }

    // ---- signing ----------------------------------------------------------------------

    fn on_tick(&mut self, now: SystemTime, check_volume: bool) {
        self.reap_tasks();
        let mut changed = false;
        // Expired SVIDs stop being served (their files stay until replaced).
        for m in self.managed.values_mut() {
            if let Some(c) = m.current.as_ref().filter(|c| c.info.not_after <= now) {
                tracing::warn!(entry_id = %m.entry.id, holder_down = self.reach.is_down(), "the SVID expired before it could be rotated; no longer served");
                self.reach
                    .expired_now(&Arc::from(m.entry.spiffe_id.to_string()));
                // The files stay, with a state that says they expired.
                m.marked_expired = true;
                if let Err(e) = self.volume.mark_expired(&m.entry.dir, c.info.not_after) {
                    tracing::warn!(entry_id = %m.entry.id, error = %e, "cannot mark the folder expired");
                }
                m.current = None;
                if m.state == CertState::Issued {
                    m.state = CertState::Pending;
                }
                changed = true;
            }
        }
        if !self.sync_in_flight && self.next_sync <= now {
            self.start_sync();
        }
        if self.node.info.not_after <= now && !self.node_expired_logged {
            self.node_expired_logged = true;
            tracing::error!(
                node = %self.config.node_name,
                mesh = %self.config.mesh,
                "the node SVID expired before it could be renewed (the CA holder was unreachable for its whole lifetime); the agent keeps serving what is valid but cannot obtain anything new: re-join with a new token (meshcert-ca token create, then restart the agent with it in --join-token-file or MESHCERT_JOIN_TOKEN)"
            );
        }
        let renew_due = !self.node_renewing && self.node_schedule.is_due(now);
        // Without a sync there are no bundles to check SVIDs against yet (no entry is due).
        let due = self.due_entries(now);
        if self.reach.is_down() {
            if self.reach.should_probe(now, renew_due || !due.is_empty()) {
                self.start_probe();
            }
        } else {
            if renew_due {
                self.start_renew();
            }
            for batch in due.chunks(SIGN_BATCH) {
                self.start_sign(batch.to_vec());
                changed = true;
            }
        }
        if check_volume {
            self.check_volume();
        }
        if changed {
            self.publish();
        }
    }

    fn start_sign(&mut self, ids: Vec<String>) {
        self.requests += 1;
        let request = self.requests;
        let mut jobs = Vec::new();
        for id in &ids {
            if let Some(m) = self.managed.get_mut(id) {
                m.in_flight = Some(request);
                m.state = CertState::Requested;
                jobs.push((m.entry.clone(), m.local));
            }
        }
        let issuer = self.issuer.clone();
        let semaphore = self.semaphore.clone();
        let algorithm = self.config.key_algorithm;
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            // A panic inside becomes a failed batch: its entries must not stay in flight.
            let result = unless_panicked(sign_batch(&*issuer, &semaphore, algorithm, jobs))
                .await
                .and_then(|r| r);
            let _ = tx.send(Event::Signed {
                request,
                ids,
                result,
            });
        });
    }

    fn on_signed(&mut self, request: u64, ids: Vec<String>, result: SignedBatch, now: SystemTime) {
        match result {
            Ok((results, bundles)) => {
                self.holder_answered(now);
                if bundles.version > self.last_sync.bundles.version
                    && !bundles.trust_domains.is_empty()
                {
                    let mut next = self.last_sync.clone();
                    next.bundles = bundles;
                    self.reapply(next, now);
                }
                let mut answered = BTreeSet::new();
                for (entry_id, key, outcome) in results {
                    answered.insert(entry_id.clone());
                    match outcome {
                        SignOutcome::Issued { svid, gateway_svid } => {
                            let chain = ders(svid.chain);
                            let gateway = gateway_svid.map(|g| ders(g.chain));
                            self.install(&entry_id, request, key, chain, gateway, now);
                        }
                        SignOutcome::Refused { error } => {
                            if error.code.refuses_local_entry()
                                && let Some(m) = self.managed.get_mut(&entry_id)
                                && m.local
                                && m.in_flight == Some(request)
                            {
                                tracing::info!(entry_id = %entry_id, code = %error.code, "the holder refuses this local entry: not asked for again until the entry or the enforcement mode changes");
                                m.denied = true;
                            }
                            self.failed(
                                &entry_id,
                                request,
                                format!("refused by the holder: {error}"),
                                now,
                            );
                        }
                    }
                }
                for id in ids.iter().filter(|id| !answered.contains(*id)) {
                    self.failed(
                        id,
                        request,
                        "the holder's answer has no result for this entry".into(),
                        now,
                    );
                }
            }
            Err(e) if e.is_holder_down() => {
                self.holder_down(now, &e);
                let error = format!("waiting for the CA holder: {e}");
                for id in &ids {
                    self.requeue(id, request, &error);
                }
            }
            Err(e) => {
                self.connected(!e.is_unreachable(), Some(e.to_string()));
                for id in &ids {
                    self.failed(id, request, e.to_string(), now);
                }
            }
        }
        self.publish();
    }

    /// An entry whose request failed because the holder is down: still due, not backed off;
    /// it goes out again once the holder answers.
    fn requeue(&mut self, entry_id: &str, request: u64, error: &str) {
        let Some(m) = self.managed.get_mut(entry_id) else {
            return;
        };
        if m.in_flight != Some(request) {
            return;
        }
        m.in_flight = None;
        m.attempted = true;
        m.state = CertState::Failed;
        m.last_error = Some(error.into());
    }

    fn install(
        &mut self,
        entry_id: &str,
        request: u64,
        key: PrivateKey,
        chain: Vec<Vec<u8>>,
        gateway_chain: Option<Vec<Vec<u8>>>,
        now: SystemTime,
    ) {
        let Some(m) = self.managed.get(entry_id) else {
            return;
        };
        if m.in_flight != Some(request) {
            return;
        }
        let entry = m.entry.clone();
        let local = m.local;
        let roots = self.roots_for(&entry);
        let skew = self.config.clock_skew;
        let info = match svid::check_with_skew(&chain, &key, &roots, &entry.spiffe_id, now, skew) {
            Ok(info) => info,
            Err(e) => {
                self.failed(
                    entry_id,
                    request,
                    format!("the issued SVID does not check out: {e}"),
                    now,
                );
                return;
            }
        };
        let gateway = match self.check_gateway(&entry, &key, gateway_chain, now) {
            Ok(g) => g,
            Err(e) => {
                self.failed(
                    entry_id,
                    request,
                    format!("the gateway SVID does not check out: {e}"),
                    now,
                );
                return;
            }
        };
        let installed = self.installed(&entry, key, chain, info, gateway);
        if let Err(e) = self.write(&entry, &installed) {
            self.failed(entry_id, request, format!("cannot install: {e}"), now);
            return;
        }
        let rotation = self.config.rotation;
        let Some(m) = self.managed.get_mut(entry_id) else {
            return;
        };
        tracing::info!(
            entry_id = %entry_id,
            spiffe_id = %entry.spiffe_id,
            serial = %installed.info.serial,
            not_after = installed.info.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "SVID installed"
        );
        m.schedule = Schedule::for_certificate(
            installed.info.not_before,
            installed.info.not_after,
            &rotation,
            rotation::jitter_for(&installed.info.serial, rotation.jitter),
        );
        m.current = Some(installed);
        m.state = CertState::Issued;
        m.last_error = None;
        m.attempted = true;
        m.in_flight = None;
        if std::mem::take(&mut m.marked_expired)
            && let Err(e) = self.volume.clear_expired(&entry.dir)
        {
            tracing::warn!(entry_id = %entry_id, error = %e, "cannot remove the expired state");
        }
        if let Some(h) = hook::for_entry(&self.config.hooks, &entry, local).cloned() {
            let dir: PathBuf = self.volume.entry_path(&entry.dir);
            let tx = self.events_tx.clone();
            let entry_id = entry_id.to_owned();
            self.tasks.spawn(async move {
                let error = hook::run(&h, &dir).await.err().map(|e| e.to_string());
                let _ = tx.send(Event::HookDone { entry_id, error });
            });
        }
    }

    fn failed(&mut self, entry_id: &str, request: u64, error: String, now: SystemTime) {
        let rotation = self.config.rotation;
        let Some(m) = self.managed.get_mut(entry_id) else {
            return;
        };
        if m.in_flight != Some(request) {
            return;
        }
        m.in_flight = None;
        m.attempted = true;
        m.state = CertState::Failed;
        let wait = m.schedule.failed(now, &rotation, fastrand::f64());
        if m.schedule.failures == 1 {
            tracing::warn!(entry_id = %entry_id, error = %error, retry_in = ?wait, "cannot obtain an SVID");
        } else {
            tracing::debug!(entry_id = %entry_id, error = %error, retry_in = ?wait, failures = m.schedule.failures, "cannot obtain an SVID");
        }
        m.last_error = Some(error.into());
    }

    // ---- node SVID --------------------------------------------------------------------

    fn start_renew(&mut self) {
        self.node_renewing = true;
        let issuer = self.issuer.clone();
        let algorithm = self.config.key_algorithm;
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let renewal = async {
                let key = generate_key(algorithm).await.map_err(RenewFailure::other)?;
                let csr = csr::build(&key, None).map_err(RenewFailure::other)?;
                let response = issuer
                    .renew(RenewRequest { csr: csr.into() })
                    .await
                    .map_err(|e| RenewFailure {
                        message: e.to_string(),
                        holder_down: e.is_holder_down(),
                    })?;
                let chain = response.svid.chain.into_iter().map(|c| c.0).collect();
                NodeIdentity::new(key, chain).map_err(RenewFailure::other)
            };
            let result = unless_panicked(renewal)
                .await
                .map_err(RenewFailure::other)
                .and_then(|r| r);
            let _ = tx.send(Event::Renewed(result));
        });
    }

    fn on_renewed(&mut self, result: Result<NodeIdentity, RenewFailure>, now: SystemTime) {
        self.node_renewing = false;
        if result.is_ok() || result.as_ref().is_err_and(|f| !f.holder_down) {
            self.holder_answered(now);
        }
        let stored = result.and_then(|identity| {
            node::store(&self.config.state_dir, &identity).map_err(RenewFailure::other)?;
            self.issuer
                .set_identity(&identity.chain, &identity.key)
                .map_err(RenewFailure::other)?;
            Ok(identity)
        });
        match stored {
            Err(f) if f.holder_down => {
                // Still due: renewed once the holder answers again.
                self.holder_down(now, &f.message);
            }
            Ok(identity) => {
                tracing::info!(serial = %identity.info.serial, "node SVID renewed");
                self.node_schedule = Schedule::for_certificate(
                    identity.info.not_before,
                    identity.info.not_after,
                    &self.config.rotation,
                    rotation::jitter_for(&identity.info.serial, self.config.rotation.jitter),
                );
                self.node = identity;
                self.node_expired_logged = false;
                self.publish();
            }
            Err(f) => {
                let wait = self
                    .node_schedule
                    .failed(now, &self.config.rotation, fastrand::f64());
                tracing::warn!(error = %f.message, retry_in = ?wait, "cannot renew the node SVID");
            }
        }
    }

    // ---- events and publication -------------------------------------------------------

    /// Frees the tasks that have finished: a `JoinSet` keeps each task (its whole state
    /// machine's allocation) until it is joined, which over a long run of rotations added up
    /// to one allocation per batch, sync and hook ever started.
    fn reap_tasks(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "a rotator task panicked");
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        self.reap_tasks();
        let now = SystemTime::now();
        match event {
            Event::Synced(result) => self.on_synced(result, now),
            Event::Signed {
                request,
                ids,
                result,
            } => self.on_signed(request, ids, result, now),
            Event::Renewed(result) => self.on_renewed(result, now),
            Event::Probed(result) => self.on_probed(result, now),
            Event::HookDone { entry_id, error } => {
                if let Some(error) = error {
                    tracing::warn!(entry_id = %entry_id, error = %error, "rotation hook failed");
                    if let Some(m) = self.managed.get_mut(&entry_id) {
                        m.last_error = Some(format!("hook: {error}").into());
                    }
                    self.publish();
                }
            }
        }
    }

    // ---- the holder's reachability ------------------------------------------------------

    fn start_probe(&mut self) {
        self.reach.probe_sent();
        let issuer = self.issuer.clone();
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let result = unless_panicked(issuer.probe()).await.and_then(|r| r);
            let _ = tx.send(Event::Probed(result));
        });
    }

    fn on_probed(&mut self, result: Result<(), IssuerError>, now: SystemTime) {
        match result {
            Err(e) if e.is_holder_down() => {
                self.reach.probe_failed(now, fastrand::f64());
                tracing::debug!(error = %e, "the CA holder still does not answer");
                self.connected(false, Some(e.to_string()));
            }
            // Any other answer means the holder is back.
            _ => {
                self.holder_answered(now);
                // Every due identity goes out now, in batches.
                self.on_tick(now, false);
            }
        }
    }

    /// A call failed at `now` because the holder as a whole cannot serve.
    fn holder_down(&mut self, now: SystemTime, e: &dyn std::fmt::Display) {
        if self.reach.down(now, fastrand::f64()) {
            tracing::warn!(ca = %self.config.ca_address, error = %e, "the CA holder cannot serve; probing it until it answers, identities are not backed off meanwhile");
            self.publish();
        }
        self.connected(false, Some(e.to_string()));
    }

    /// The holder answered a call at `now` (a refusal included): an outage ends.
    fn holder_answered(&mut self, now: SystemTime) {
        if let Some((lasted, expired)) = self.reach.up(now) {
            let due = self.due_entries(now).len();
            tracing::info!(
                ca = %self.config.ca_address,
                outage_secs = lasted.as_secs(),
                expired_meanwhile = expired.len(),
                due,
                "the CA holder answers again; sending every due identity"
            );
        }
        self.connected(true, None);
    }

    fn connected(&mut self, connected: bool, error: Option<String>) {
        if connected && !self.ca_connected {
            tracing::info!(ca = %self.config.ca_address, "connected to the CA holder");
        }
        self.ca_connected = connected;
        if error.is_some() || connected {
            self.ca_last_error = error;
        }
    }

    fn log_failure(&self, what: &str, e: &IssuerError, failures: u32) {
        if failures == 1 {
            tracing::warn!(error = %e, "{what} with the CA holder failed; backing off");
        } else {
            tracing::debug!(error = %e, failures, "{what} with the CA holder failed again");
        }
    }

    /// Publishes the snapshot, the status, the report and the systemd state.
    fn publish(&mut self) {
        let now = SystemTime::now();
        let bundles = &self.last_sync.bundles;
        let svids: Vec<Arc<InstalledSvid>> = self
            .order
            .iter()
            .filter_map(|id| self.managed.get(id))
            .filter_map(|m| m.current.as_ref())
            .filter(|c| c.info.not_after > now)
            .flat_map(|c| {
                let gateway = c
                    .gateway
                    .as_ref()
                    .filter(|g| g.served.not_after > now)
                    .map(|g| g.served.clone());
                std::iter::once(c.served.clone()).chain(gateway)
            })
            .collect();
        let snapshot = Snapshot {
            trust_domain: Some(self.last_sync.trust_domain.clone()),
            bundle_version: bundles.version,
            bundles: bundle_map(bundles),
            shared_root: bundles.shared_root.iter().map(|c| c.0.clone()).collect(),
            federate: bundles.trust_domains.len() > 1,
            svids,
        };
        self.cache.publish(snapshot);

        let identities: Arc<[IdentityReport]> = self
            .order
            .iter()
            .filter_map(|id| self.managed.get(id))
            .map(Managed::report)
            .collect();
        let all_attempted = self.sync_attempted && self.managed.values().all(|m| m.attempted);
        let node_not_after = self
            .node
            .info
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let bundle_version = bundles.version;
        // The report and the status share one list of the identities. The status is replaced
        // whole (every field is the rotator's), not cloned and then changed.
        let next = report::build(
            bundle_version,
            Some(self.last_sync.enforcement),
            identities.clone(),
        );
        let issued = identities.iter().filter(|i| i.not_after.is_some()).count();
        let total = identities.len();
        self.cache.set_status(AgentStatus {
            node: Some(self.last_sync.node.clone()),
            mesh: Some(self.last_sync.mesh.clone()),
            ca_address: self.config.ca_address.clone(),
            ca_connected: self.ca_connected,
            ca_last_error: self.ca_last_error.clone(),
            node_svid_not_after: node_not_after,
            bundle_version,
            all_attempted,
            identities,
            warnings: self
                .hooks_stripped
                .iter()
                .map(|id| hook::stripped_warning(id))
                .collect(),
            ca_unreachable_since: self
                .reach
                .since()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            expired_while_unreachable: self.reach.expired().to_vec(),
        });
        self.reports.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
        // A publish ends a burst (a batch, a sync): its buffers are freed now.
        self.heap.after_burst(Instant::now());

        let line = format!("{issued}/{total} SVIDs issued");
        if !self.ready_sent && all_attempted {
            self.ready_sent = true;
            tracing::info!(status = %line, "ready");
            systemd::ready(&line);
            self.status_line = line;
        } else if line != self.status_line {
            systemd::status(&line);
            self.status_line = line;
        }
    }
}

async fn sign_batch<I: Issuer>(
    issuer: &I,
    semaphore: &Semaphore,
    algorithm: KeyAlgorithm,
    jobs: Vec<(Arc<Entry>, bool)>,
) -> SignedBatch {
    // The permit first: only the batches being signed hold their fresh keys, CSRs and
    // bodies in memory, not every due entry at once.
    let _permit = semaphore
        .acquire()
        .await
        .map_err(|_| IssuerError::Setup("signing closed".into()))?;
    let mut keys = Vec::with_capacity(jobs.len());
    let mut csrs = Vec::with_capacity(jobs.len());
    let generated = generate_keys(algorithm, jobs.len())
        .await
        .map_err(|e| IssuerError::Setup(e.to_string()))?;
    for ((entry, local), key) in jobs.into_iter().zip(generated) {
        let der = csr::build(&key, Some(&entry.spiffe_id))
            .map_err(|e| IssuerError::Setup(e.to_string()))?;
        csrs.push(CsrRequest {
            entry_id: entry.id.clone(),
            csr: der.into(),
            local: local.then(|| (*entry).clone()),
        });
        keys.push((entry.id.clone(), key));
    }
    // Boxed: a batch waiting for its permit stays a small task, not one the size of a whole
    // HTTPS exchange.
    let response = Box::pin(issuer.sign(SignRequest { csrs })).await?;
    let mut keys: BTreeMap<String, PrivateKey> = keys.into_iter().collect();
    let results = response
        .results
        .into_iter()
        .filter_map(|r| keys.remove(&r.entry_id).map(|k| (r.entry_id, k, r.outcome)))
        .collect();
    Ok((results, response.bundles))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use meshcert_protocol::api::{
        ApiError, Der, ErrorCode, NodeSvidResponse, SignResponse, SignResult, Svid,
    };
    use meshcert_protocol::{NodeReport, SpiffeId};

    use super::*;
    use crate::config::Rotation;
    use crate::svid::testca::TestCa;

    const TD: &str = "mesh-a.test";

    struct FakeState {
        entries: Vec<Entry>,
        refuse: BTreeSet<String>,
        down: bool,
        signed: u32,
        ttl: Duration,
        /// The effective enforcement the holder sends and decides local entries by.
        enforcement: Enforcement,
        /// CSRs received for agent-local entries.
        local_requests: u32,
        /// The mesh root was replaced: `rotated_ca` signs, and is the bundle.
        rotated: bool,
        /// The next this many syncs and signing calls panic (a bug in the agent's task).
        panics: u32,
        /// Probes received (while "down" too).
        probes: u32,
        /// Syncs received (while "down" too).
        syncs: u32,
        /// Signing calls are answered `unavailable` (HTTP 503) as a whole.
        unavailable: bool,
    }

    /// A holder in memory: signs with a test CA, can refuse entries or be "down".
    struct FakeIssuer {
        ca: TestCa,
        /// The mesh's CA after a root change.
        rotated_ca: TestCa,
        /// Signs gateways' second SVIDs (limited trust).
        shared: TestCa,
        state: Mutex<FakeState>,
    }

    impl FakeIssuer {
        fn new(entries: Vec<Entry>) -> Self {
            Self {
                ca: TestCa::new(),
                rotated_ca: TestCa::new(),
                shared: TestCa::new(),
                state: Mutex::new(FakeState {
                    entries,
                    refuse: BTreeSet::new(),
                    down: false,
                    signed: 0,
                    ttl: Duration::from_secs(3600),
                    enforcement: Enforcement::Enabled,
                    local_requests: 0,
                    rotated: false,
                    panics: 0,
                    probes: 0,
                    syncs: 0,
                    unavailable: false,
                }),
            }
        }
        /// The CA signing the mesh's SVIDs now.
        fn mesh_ca(&self) -> &TestCa {
            if self.with(|s| s.rotated) {
                &self.rotated_ca
            } else {
                &self.ca
            }
        }
        fn bundles(&self) -> Bundles {
            Bundles {
                version: if self.with(|s| s.rotated) { 2 } else { 1 },
                trust_domains: BTreeMap::from([(
                    TrustDomain::new(TD).expect("td"),
                    vec![Der(self.mesh_ca().root.clone())],
                )]),
                shared_root: vec![Der(self.shared.root.clone())],
                ..Bundles::default()
            }
        }
        fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
            f(&mut self.state.lock().expect("lock"))
        }
        fn check_up(&self) -> Result<(), IssuerError> {
            let panic = self.with(|s| {
                let panic = s.panics > 0;
                s.panics = s.panics.saturating_sub(1);
                panic
            });
            assert!(!panic, "a bug in the task");
            if self.with(|s| s.down) {
                return Err(IssuerError::Http("connection refused".into()));
            }
            Ok(())
        }
        fn node_identity(&self) -> NodeIdentity {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
            let id = SpiffeId::new("spiffe://mesh-a.test/meshcert/node/n1").expect("id");
            let chain = self.ca.sign(
                &csr::build(&key, None).expect("csr"),
                &id,
                SystemTime::now(),
                Duration::from_secs(3600),
            );
            NodeIdentity::new(key, chain).expect("node")
        }
    }

    impl Issuer for FakeIssuer {
        async fn attest(&self, _: AttestRequest) -> Result<NodeSvidResponse, IssuerError> {
            Err(IssuerError::Api(ApiError::new(
                ErrorCode::TokenUsed,
                "used",
            )))
        }
        async fn renew(&self, _: RenewRequest) -> Result<NodeSvidResponse, IssuerError> {
            Err(IssuerError::Api(ApiError::new(
                ErrorCode::Unavailable,
                "later",
            )))
        }
        async fn sync(&self) -> Result<SyncResponse, IssuerError> {
            self.with(|s| s.syncs += 1);
            self.check_up()?;
            Ok(SyncResponse {
                node: "n1".into(),
                mesh: "mesh-a".into(),
                trust_domain: TrustDomain::new(TD).expect("td"),
                enforcement: self.with(|s| s.enforcement),
                entries: self.with(|s| s.entries.clone()),
                bundles: self.bundles(),
            })
        }
        async fn sign(&self, request: SignRequest) -> Result<SignResponse, IssuerError> {
            self.check_up()?;
            if self.with(|s| s.unavailable) {
                return Err(IssuerError::Api(ApiError::new(
                    ErrorCode::Unavailable,
                    "the datastore is down",
                )));
            }
            let (entries, refuse, ttl) =
                self.with(|s| (s.entries.clone(), s.refuse.clone(), s.ttl));
            let mut results = Vec::new();
            for c in request.csrs {
                if let Some(local) = &c.local {
                    let enforcement = self.with(|s| {
                        s.local_requests += 1;
                        s.enforcement
                    });
                    let outcome = if enforcement == Enforcement::Disabled {
                        let chain =
                            self.mesh_ca()
                                .sign(&c.csr.0, &local.spiffe_id, SystemTime::now(), ttl);
                        SignOutcome::Issued {
                            svid: Svid {
                                spiffe_id: local.spiffe_id.clone(),
                                chain: chain.into_iter().map(Der).collect(),
                            },
                            gateway_svid: None,
                        }
                    } else {
                        SignOutcome::Refused {
                            error: ApiError::new(ErrorCode::PolicyDenied, "enforced"),
                        }
                    };
                    results.push(SignResult {
                        entry_id: c.entry_id,
                        outcome,
                    });
                    continue;
                }
                let entry = entries.iter().find(|e| e.id == c.entry_id);
                let outcome = match entry {
                    Some(e) if !refuse.contains(&e.id) => {
                        self.with(|s| s.signed += 1);
                        let chain =
                            self.mesh_ca()
                                .sign(&c.csr.0, &e.spiffe_id, SystemTime::now(), ttl);
                        let gateway_svid = e.gateway.then(|| Svid {
                            spiffe_id: e.spiffe_id.clone(),
                            chain: self
                                .shared
                                .sign(&c.csr.0, &e.spiffe_id, SystemTime::now(), ttl)
                                .into_iter()
                                .map(Der)
                                .collect(),
                        });
                        SignOutcome::Issued {
                            svid: Svid {
                                spiffe_id: e.spiffe_id.clone(),
                                chain: chain.into_iter().map(Der).collect(),
                            },
                            gateway_svid,
                        }
                    }
                    _ => SignOutcome::Refused {
                        error: ApiError::new(ErrorCode::NotAssigned, "not yours"),
                    },
                };
                results.push(SignResult {
                    entry_id: c.entry_id,
                    outcome,
                });
            }
            Ok(SignResponse {
                results,
                bundles: self.bundles(),
            })
        }
        async fn report(&self, _: NodeReport) -> Result<(), IssuerError> {
            self.check_up()
        }
        async fn probe(&self) -> Result<(), IssuerError> {
            self.with(|s| s.probes += 1);
            self.check_up()
        }
        fn set_identity(&self, _: &[Vec<u8>], _: &PrivateKey) -> Result<(), IssuerError> {
            Ok(())
        }
    }

    fn entry(id: &str) -> Entry {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "spiffeId": format!("spiffe://{TD}/{id}"),
            "nodes": ["n1"],
            "dir": id,
        }))
        .expect("entry")
    }

    fn config(dir: &std::path::Path) -> Config {
        Config {
            ca_address: "127.0.0.1:1".into(),
            ca_server_name: "127.0.0.1".into(),
            trust_bundle: dir.join("bundle.pem"),
            trust_roots: Vec::new(),
            node_name: "n1".into(),
            mesh: "mesh-a".into(),
            state_dir: dir.join("state"),
            volume_dir: dir.join("svids"),
            workload_socket: dir.join("workload.sock"),
            workload_socket_mode: 0o666,
            workload_connections_per_uid: 256,
            admin_socket: dir.join("admin.sock"),
            key_algorithm: KeyAlgorithm::EcdsaP256,
            rotation: Rotation {
                backoff_initial: Duration::from_millis(100),
                backoff_max: Duration::from_millis(300),
                ..Rotation::default()
            },
            sync_interval: Duration::from_secs(30),
            heartbeat: Duration::from_secs(30),
            watch_holder: false,
            entries: Vec::new(),
            kubernetes: None,
            hooks: Vec::new(),
            clock_skew: crate::config::DEFAULT_CLOCK_SKEW,
        }
    }

    struct Running {
        cache: Cache,
        commands: mpsc::Sender<Command>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<usize>,
    }

    fn start(fake: &Arc<FakeIssuer>, config: &Config, node: &NodeIdentity) -> Running {
        node::ensure_dir(&config.state_dir).expect("state");
        let cache = Cache::new();
        let last = node::load_last_sync(&config.state_dir).expect("last sync");
        let rotator = Rotator::new(
            fake.clone(),
            cache.clone(),
            config.clone(),
            node.clone(),
            last,
            Arc::new(crate::changes::Changes::new()),
        );
        let (commands, rx) = mpsc::channel(8);
        let (stop, stop_rx) = watch::channel(false);
        let mut stop_rx2 = stop_rx.clone();
        let task = tokio::spawn(rotator.run(rx, async move {
            let _ = stop_rx2.wait_for(|s| *s).await;
        }));
        drop(stop_rx);
        Running {
            cache,
            commands,
            stop,
            task,
        }
    }

    /// Waits until the status satisfies `f`; an error (not a timed assertion) after a deadline.
    async fn until(cache: &Cache, what: &str, f: impl Fn(&crate::cache::AgentStatus) -> bool) {
        let mut rx = cache.subscribe_status();
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if f(&rx.borrow_and_update()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "never reached: {what}; status {:?}",
            cache.status()
        );
    }

    fn all_issued(n: usize) -> impl Fn(&crate::cache::AgentStatus) -> bool {
        move |s| {
            s.identities.len() == n && s.identities.iter().all(|i| i.state == CertState::Issued)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn issues_installs_removes_and_restarts_without_reissue() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web"), entry("db")]));
        let node = fake.node_identity();

        let run = start(&fake, &config, &node);
        until(&run.cache, "both issued", all_issued(2)).await;
        let snapshot = run.cache.current();
        assert_eq!(snapshot.svids.len(), 2);
        let volume = Volume::new(&config.volume_dir);
        for id in ["web", "db"] {
            let disk = volume.load(id).expect("load").expect("installed");
            let (chain, key) = (disk.chain, disk.key);
            let want = SpiffeId::new(&format!("spiffe://{TD}/{id}")).expect("id");
            svid::check(
                &chain,
                &key,
                std::slice::from_ref(&fake.ca.root),
                &want,
                SystemTime::now(),
            )
            .expect("valid pair on disk");
        }
        assert!(run.cache.status().all_attempted);

        // The holder drops `db`: its folder goes, `web` stays.
        fake.with(|s| s.entries.retain(|e| e.id != "db"));
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "db removed", all_issued(1)).await;
        assert!(!volume.entry_path("db").exists());
        assert!(volume.entry_path("web").exists());
        let signed = fake.with(|s| s.signed);
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");

        // Restart with the holder down: the SVID on disk is served at once, not re-issued.
        fake.with(|s| s.down = true);
        let run = start(&fake, &config, &node);
        until(&run.cache, "served from disk", all_issued(1)).await;
        assert_eq!(run.cache.current().svids.len(), 1);
        fake.with(|s| s.down = false);
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "connected", |s| s.ca_connected).await;
        assert_eq!(fake.with(|s| s.signed), signed, "nothing re-issued");
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    /// A new owner gets a new key at once; a hook in the holder's entry is stripped and shown
    /// in the status, never run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_owner_gets_a_new_key_and_a_holder_hook_is_stripped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "issued", all_issued(1)).await;
        let first = run.cache.status().identities[0].serial.clone();
        assert!(run.cache.status().warnings.is_empty());
        let volume = Volume::new(&config.volume_dir);
        let first_key = volume.load("web").expect("load").expect("installed").key;

        let planted = tmp.path().join("planted");
        let (uid, gid) = crate::sys::current_owner();
        fake.with(|s| {
            let web = &mut s.entries[0];
            web.owner = Some(meshcert_protocol::Owner { uid, gid });
            web.hook = Some(meshcert_protocol::Hook {
                pid_file: None,
                signal: None,
                command: vec!["touch".into(), planted.display().to_string()],
                timeout: None,
            });
        });
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "a new key for the new owner", |s| {
            s.identities.len() == 1
                && s.identities[0].state == CertState::Issued
                && s.identities[0].serial != first
        })
        .await;
        let status = run.cache.status();
        assert_eq!(status.warnings.len(), 1, "{:?}", status.warnings);
        assert!(status.warnings[0].contains("web"), "{:?}", status.warnings);
        let disk = volume.load("web").expect("load").expect("installed");
        assert_ne!(
            disk.key.pkcs8_der(),
            first_key.pkcs8_der(),
            "the key on disk is a new one"
        );
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
        assert!(!planted.exists(), "the holder's hook ran");
    }

    /// A sync or signing task that panics is a failed call, retried with backoff: nothing stays
    /// in flight (before, its entries were never asked for again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_task_is_a_failed_call_and_is_retried() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        let node = fake.node_identity();
        // The first sync panics, then (after the retried sync) the first signing call.
        fake.with(|s| s.panics = 2);
        let run = start(&fake, &config, &node);
        until(&run.cache, "issued after the failures", all_issued(1)).await;
        assert_eq!(fake.with(|s| s.panics), 0, "both panics happened");
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_back_off_and_are_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web"), entry("other")]));
        fake.with(|s| {
            s.refuse.insert("other".into());
        });
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "refusal counted twice", |s| {
            s.identities
                .iter()
                .any(|i| &*i.entry_id == "other" && i.state == CertState::Failed && i.attempts >= 2)
        })
        .await;
        let status = run.cache.status();
        let other = status
            .identities
            .iter()
            .find(|i| &*i.entry_id == "other")
            .expect("other");
        assert!(
            other
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("not_assigned")
        );
        assert!(!volume_has(&config, "other"));
        assert_eq!(run.cache.current().svids.len(), 1, "only web is served");
        assert_eq!(
            status.ca_unreachable_since, None,
            "a refusal is not an outage"
        );
        assert_eq!(fake.with(|s| s.probes), 0);
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    /// The holder goes down while short-lived SVIDs expire: nothing is backed off, the
    /// expiries are listed, the agent probes no more often than every PROBE_MIN, and the first
    /// answer sends every due entry at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_backs_nothing_off_and_ends_at_the_first_probe() {
        use crate::reachability::PROBE_MIN;
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web"), entry("db")]));
        fake.with(|s| s.ttl = Duration::from_secs(2));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "both issued", all_issued(2)).await;
        let before: Vec<_> = run
            .cache
            .status()
            .identities
            .iter()
            .map(|i| i.serial.clone())
            .collect();

        fake.with(|s| s.down = true);
        let down_at = Instant::now();
        until(&run.cache, "both expired during the outage", |s| {
            s.ca_unreachable_since.is_some() && s.expired_while_unreachable.len() == 2
        })
        .await;
        // Two more probe periods: the agent waits for the holder, it does not back off.
        tokio::time::sleep(PROBE_MIN * 2).await;
        let status = run.cache.status();
        assert!(!status.ca_connected);
        assert!(
            run.cache.current().svids.is_empty(),
            "expired SVIDs are not served"
        );
        // The files stay, with a state that says they expired.
        let state = config
            .volume_dir
            .join("web")
            .join(crate::volume::STATE_FILE);
        let text = std::fs::read_to_string(&state).expect("the state file");
        assert!(text.starts_with("EXPIRED "), "{text}");
        assert!(config.volume_dir.join("web").join("svid.pem").exists());
        for i in status.identities.iter() {
            assert_eq!(i.attempts, 0, "{} was backed off: {i:?}", i.entry_id);
            assert!(i.not_after.is_none());
        }
        let probes = fake.with(|s| s.probes);
        let bound = (down_at.elapsed().as_secs_f64() / PROBE_MIN.as_secs_f64()).ceil() as u32 + 1;
        assert!(
            (1..=bound).contains(&probes),
            "{probes} probes in {:?}",
            down_at.elapsed()
        );

        fake.with(|s| s.down = false);
        until(&run.cache, "both issued again after the outage", |s| {
            all_issued(2)(s)
                && s.ca_unreachable_since.is_none()
                && s.expired_while_unreachable.is_empty()
                && s.identities
                    .iter()
                    .zip(&before)
                    .all(|(i, b)| i.serial != *b)
        })
        .await;
        assert!(!state.exists(), "a fresh SVID clears the expired state");
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    /// A holder that answers `unavailable` to a whole signing call cannot serve: that is an
    /// outage (probed, nothing backed off), not a refusal of the entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_answering_unavailable_is_an_outage_not_a_refusal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        fake.with(|s| s.unavailable = true);
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "an outage seen", |s| {
            s.ca_unreachable_since.is_some()
                && s.identities.iter().any(|i| {
                    i.state == CertState::Failed
                        && i.attempts == 0
                        && i.last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("waiting for the CA holder"))
                })
        })
        .await;
        fake.with(|s| s.unavailable = false);
        until(&run.cache, "issued once the holder serves", |s| {
            all_issued(1)(s) && s.ca_unreachable_since.is_none()
        })
        .await;
        assert!(
            fake.with(|s| s.probes) >= 1,
            "the return was seen by a probe"
        );
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    /// An agent whose SVIDs are all healthy sends nothing but its normal sync while the holder
    /// is down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_agent_does_not_probe_a_holder_that_is_down() {
        use crate::reachability::PROBE_MAX;
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "issued", all_issued(1)).await;
        fake.with(|s| s.down = true);
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "the holder seen down", |s| {
            s.ca_unreachable_since.is_some()
        })
        .await;
        let syncs = fake.with(|s| s.syncs);
        tokio::time::sleep(PROBE_MAX + Duration::from_secs(1)).await;
        assert_eq!(fake.with(|s| s.probes), 0, "no probe while nothing is due");
        assert_eq!(fake.with(|s| s.syncs), syncs, "no sync before syncInterval");
        assert!(run.cache.status().is_ready(crate::admin::unix_now_secs()));
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    fn volume_has(config: &Config, dir: &str) -> bool {
        config.volume_dir.join(dir).join("..data").exists()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_lived_svids_rotate_and_deleted_files_come_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        fake.with(|s| s.ttl = Duration::from_secs(2));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "issued", all_issued(1)).await;
        let first = run.cache.status().identities[0].serial.clone();
        until(&run.cache, "rotated", |s| {
            s.identities.first().and_then(|i| i.serial.clone()) != first
                && s.identities.iter().all(|i| i.state == CertState::Issued)
        })
        .await;
        // Deleted by someone else: restored on the next check.
        let link = config.volume_dir.join("web").join("svid.pem");
        std::fs::remove_file(&link).expect("rm");
        run.commands.send(Command::SyncNow).await.expect("send");
        let restored = tokio::time::timeout(Duration::from_secs(20), async {
            while !link.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(restored.is_ok(), "svid.pem was not restored");
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_tasks_are_freed_as_rotations_go_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let mut web = entry("web");
        // A hook adds one more task per install.
        web.hook = Some(meshcert_protocol::Hook {
            pid_file: None,
            signal: None,
            command: vec!["true".into()],
            timeout: Some(Duration::from_secs(5)),
        });
        let fake = Arc::new(FakeIssuer::new(vec![web]));
        fake.with(|s| s.ttl = Duration::from_secs(2));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        // Six rotations and as many hooks and syncs: each started a task.
        tokio::time::timeout(Duration::from_secs(30), async {
            while fake.with(|s| s.signed) < 7 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("rotations go on");
        run.stop.send(true).expect("stop");
        let held = run.task.await.expect("stopped");
        assert!(
            held <= 3,
            "{held} tasks still held after 7 signatures: finished tasks are not freed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateways_get_a_second_svid_to_the_shared_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let mut gw = entry("gw");
        gw.gateway = true;
        let fake = Arc::new(FakeIssuer::new(vec![gw, entry("web")]));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "both issued", all_issued(2)).await;
        let snapshot = run.cache.current();
        let hints: Vec<&str> = snapshot.svids.iter().map(|s| s.hint.as_str()).collect();
        assert_eq!(hints, ["gw", GATEWAY_HINT, "web"]);
        let gateway = &snapshot.svids[1];
        svid::check(
            &gateway.chain(),
            &PrivateKey::from_pkcs8(gateway.key_pkcs8.to_vec()).expect("key"),
            std::slice::from_ref(&fake.shared.root),
            &gateway.spiffe_id,
            SystemTime::now(),
        )
        .expect("the second SVID chains to the shared root");
        let disk = Volume::new(&config.volume_dir)
            .load("gw")
            .expect("load")
            .expect("present");
        assert_eq!(disk.gateway_chain.as_ref(), Some(&gateway.chain()));
        assert!(
            Volume::new(&config.volume_dir)
                .load("web")
                .expect("load")
                .expect("present")
                .gateway_chain
                .is_none()
        );
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_entries_follow_the_holders_enforcement_mode() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = config(tmp.path());
        let mut tool = entry("tool");
        tool.nodes = vec![];
        config.entries = vec![tool];
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        fake.with(|s| s.enforcement = Enforcement::Disabled);
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "web and the local entry issued", all_issued(2)).await;
        assert!(volume_has(&config, "tool"));

        // ENABLED: the local SVID stops being served at once, and the holder's refusal shows.
        fake.with(|s| s.enforcement = Enforcement::Enabled);
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "the local entry refused", |s| {
            s.identities.iter().any(|i| {
                &*i.entry_id == "tool"
                    && i.state == CertState::Failed
                    && i.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("policy_denied"))
            })
        })
        .await;
        assert!(!volume_has(&config, "tool"));
        let served: Vec<String> = run
            .cache
            .current()
            .svids
            .iter()
            .map(|s| s.hint.clone())
            .collect();
        assert_eq!(served, ["web"]);
        // Not asked again while the mode stays (the backoff would have retried by now).
        let asked = fake.with(|s| s.local_requests);
        for _ in 0..3 {
            run.commands.send(Command::SyncNow).await.expect("send");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert_eq!(fake.with(|s| s.local_requests), asked);

        // DISABLED again: asked for at once and served.
        fake.with(|s| s.enforcement = Enforcement::Disabled);
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "the local entry issued again", all_issued(2)).await;
        assert!(volume_has(&config, "tool"));
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replaced_mesh_root_has_every_svid_issued_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let fake = Arc::new(FakeIssuer::new(vec![entry("web")]));
        let node = fake.node_identity();
        let run = start(&fake, &config, &node);
        until(&run.cache, "issued", all_issued(1)).await;
        let first = run.cache.status().identities[0].serial.clone();

        fake.with(|s| s.rotated = true);
        run.commands.send(Command::SyncNow).await.expect("send");
        until(&run.cache, "issued again under the new root", |s| {
            s.bundle_version == 2
                && s.identities
                    .first()
                    .is_some_and(|i| i.serial != first && i.state == CertState::Issued)
        })
        .await;
        let disk = Volume::new(&config.volume_dir)
            .load("web")
            .expect("load")
            .expect("installed");
        svid::check(
            &disk.chain,
            &disk.key,
            std::slice::from_ref(&fake.rotated_ca.root),
            &SpiffeId::new(&format!("spiffe://{TD}/web")).expect("id"),
            SystemTime::now(),
        )
        .expect("the SVID on disk verifies against the new root");
        run.stop.send(true).expect("stop");
        run.task.await.expect("stopped");
    }
}
