//! The rotation's pure state machine: every entry's schedule, what is in flight, what is
//! served, the holder's reachability. [`Core::handle`] takes one [`Event`] at `now` and
//! returns the [`Action`]s to perform, in order; the executor performs them and feeds their
//! outcomes back as events. Nothing here does I/O or reads a clock; the randomness (backoff,
//! probe jitter) comes from a seeded generator.
//!
//! A request (a signing batch, the adoption of an SVID found on disk) carries a number; an
//! entry remembers the one it waits for, and an answer to any other is ignored.

mod answers;
mod apply;
mod view;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{Bundles, SignOutcome, SyncResponse};
use meshcert_protocol::{CertState, Enforcement, Entry, Hook};

use super::installed::Installed;
use super::timing::{Schedule, due_at};
use crate::changes::Check;
use crate::config::Config;
use crate::issuer::IssuerError;
use crate::keys::PrivateKey;
use crate::node::{NodeCertificate, RenewFailure};
use crate::reachability::Reachability;
use crate::svid::LeafInfo;

pub use self::view::{Notify, Published, Restore};

/// How often the core wants a tick at least: the wall clock is re-read this often (a suspend
/// or a clock jump forward makes rotations due at once).
pub const TICK: Duration = Duration::from_secs(1);

/// CSRs per signing request. The holder takes up to [`meshcert_protocol::api::MAX_BATCH`];
/// smaller batches keep the agent's peak memory (keys, CSRs, request and answer bodies of the
/// batches in flight) low, for a few more round trips.
pub const SIGN_BATCH: usize = 64;

/// A signing answer: per entry its fresh key and the holder's outcome, and the bundles.
pub type SignedBatch = Result<(Vec<(String, PrivateKey, SignOutcome)>, Bundles), IssuerError>;

/// What happened, as the core learns it.
#[derive(Debug)]
pub enum Event {
    /// Time passed; `check_volume`: compare every folder with memory now.
    Tick {
        /// Compare every folder with memory.
        check_volume: bool,
    },
    /// Sync with the holder now (and then tick).
    SyncNow,
    /// A new, valid configuration.
    Reload(Box<Config>),
    /// A sync answered.
    Synced(Result<SyncResponse, IssuerError>),
    /// A signing batch answered.
    Signed {
        /// The request's number.
        request: u64,
        /// The entries it asked for.
        ids: Vec<String>,
        /// The answer.
        result: SignedBatch,
    },
    /// An [`Action::Install`] passed its checks and is on disk.
    Installed {
        /// The entry.
        entry_id: String,
        /// The request it answered.
        request: u64,
        /// What is now on disk.
        installed: Installed,
    },
    /// An [`Action::Install`] failed its checks or its write: the old SVID stays served.
    InstallFailed {
        /// The entry.
        entry_id: String,
        /// The request it answered.
        request: u64,
        /// Why.
        error: String,
    },
    /// An [`Action::Adopt`] read the entry's folder: a valid SVID found there, or none.
    Adopted {
        /// The entry.
        entry_id: String,
        /// The adoption's request number.
        request: u64,
        /// The SVID found, when it checked out.
        found: Option<Installed>,
    },
    /// These entries' SVIDs do not verify against the new bundles ([`Action::Recheck`]).
    Unverifiable(Vec<String>),
    /// The node SVID renewal finished (stored and in use when it succeeded).
    Renewed(Result<NodeCertificate, RenewFailure>),
    /// A probe of a holder that was down answered (or not).
    Probed(Result<(), IssuerError>),
    /// A rotation hook finished.
    HookDone {
        /// The entry.
        entry_id: String,
        /// Its error, if it failed.
        error: Option<String>,
    },
    /// Someone else changed these folders of the volume.
    VolumeChanged(Check),
}

/// What the executor is to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Ask the holder for the node's entries and bundles ([`Event::Synced`]).
    Sync,
    /// Generate keys and have one batch signed ([`Event::Signed`]).
    Sign {
        /// The request's number.
        request: u64,
        /// The entries, and whether each is agent-local.
        jobs: Vec<(Arc<Entry>, bool)>,
    },
    /// Renew the node SVID ([`Event::Renewed`]).
    Renew,
    /// Probe a holder that is down ([`Event::Probed`]).
    Probe,
    /// Check an issued SVID and write it ([`Event::Installed`] or [`Event::InstallFailed`]).
    Install {
        /// The entry.
        entry: Arc<Entry>,
        /// The request it answers.
        request: u64,
        /// Its fresh key.
        key: PrivateKey,
        /// The chain, leaf first.
        chain: Vec<Vec<u8>>,
        /// A gateway's second chain.
        gateway: Option<Vec<Vec<u8>>>,
    },
    /// Load and check the SVID already in the entry's folder ([`Event::Adopted`]).
    Adopt {
        /// The entry.
        entry: Arc<Entry>,
        /// The adoption's request number.
        request: u64,
    },
    /// Check every served SVID against the new bundles ([`Event::Unverifiable`]).
    Recheck,
    /// Write every served SVID again (new bundles).
    RewriteAll,
    /// Write again the served folders that differ from memory.
    Restore(Restore),
    /// Remove an entry's folder.
    Remove {
        /// The entry.
        entry_id: String,
        /// Its folder.
        dir: String,
    },
    /// Mark a folder's SVID expired.
    MarkExpired {
        /// The entry.
        entry_id: String,
        /// Its folder.
        dir: String,
        /// The expiry.
        not_after: SystemTime,
    },
    /// Remove a folder's expired mark.
    ClearExpired {
        /// The entry.
        entry_id: String,
        /// Its folder.
        dir: String,
    },
    /// Run a rotation hook ([`Event::HookDone`]).
    RunHook {
        /// The entry.
        entry_id: String,
        /// Its folder.
        dir: String,
        /// The hook.
        hook: Hook,
    },
    /// Publish the snapshot, the status and the report, and notify systemd: built by
    /// [`Core::publication`] when performed, so that it shows the installs performed before.
    Publish,
}

/// One entry the node holds.
pub(crate) struct Managed {
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
    /// An agent-local entry the holder refused by a local-entry rule: not asked for again
    /// until the entry or the enforcement mode changes.
    denied: bool,
    /// The folder may hold an expired mark (an expiry, or a previous run's): removed at the
    /// next install.
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

    /// Whether an answer to `request` is the one it waits for: an answer to any other (stale)
    /// request changes nothing.
    fn awaits(&self, request: u64) -> bool {
        self.in_flight == Some(request)
    }

    /// Whether a signing request may go out for it (due aside).
    fn may_ask(&self) -> bool {
        self.in_flight.is_none() && !self.denied
    }
}

/// The rotation's state; see the module documentation.
pub struct Core {
    config: Config,
    /// The node SVID's leaf.
    node: LeafInfo,
    /// The node SVID chain, leaf first (a root rotation re-issues it when it does not chain to
    /// an active root).
    node_chain: Vec<Vec<u8>>,
    node_schedule: Schedule,
    node_renewing: bool,
    node_expired_logged: bool,
    /// The last sync answer without its entries (they are in `holder_entries`).
    header: SyncResponse,
    /// The holder's entries of the last sync, in its order, shared with `managed`.
    holder_entries: Vec<Arc<Entry>>,
    have_sync: bool,
    sync_attempted: bool,
    sync_in_flight: bool,
    sync_failures: u32,
    next_sync: SystemTime,
    managed: BTreeMap<String, Managed>,
    order: Vec<String>,
    ca_connected: bool,
    ca_last_error: Option<String>,
    reach: Reachability,
    requests: u64,
    ready_sent: bool,
    status_line: String,
    /// Holder entries whose hook was stripped (shown in the status).
    hooks_stripped: Vec<String>,
    rng: fastrand::Rng,
    out: Vec<Action>,
}

impl Core {
    /// A core for a joined node whose SVID is `node`. `last_sync` is what the state folder
    /// holds (or what the join returned): its entries are adopted from the volume. Returns the
    /// actions of that first application (adoptions, removals, a publish).
    pub fn new(
        config: Config,
        node: NodeCertificate,
        last_sync: Option<SyncResponse>,
        now: SystemTime,
        seed: u64,
    ) -> (Self, Vec<Action>) {
        let NodeCertificate {
            info: node,
            chain: node_chain,
        } = node;
        let node_schedule = Self::schedule_for(&config, &node);
        let have_sync = last_sync.is_some();
        let mut first = last_sync.unwrap_or_else(|| SyncResponse {
            node: config.node_name.clone(),
            mesh: config.mesh.clone(),
            trust_domain: node.spiffe_id.trust_domain().clone(),
            enforcement: Enforcement::MeshDefault,
            entries: Vec::new(),
            bundles: Bundles::default(),
        });
        let entries = std::mem::take(&mut first.entries);
        let mut core = Self {
            config,
            node,
            node_chain,
            node_schedule,
            node_renewing: false,
            node_expired_logged: false,
            header: first,
            holder_entries: Vec::new(),
            have_sync,
            sync_attempted: false,
            sync_in_flight: false,
            sync_failures: 0,
            next_sync: now,
            managed: BTreeMap::new(),
            order: Vec::new(),
            ca_connected: false,
            ca_last_error: None,
            reach: Reachability::default(),
            requests: 0,
            ready_sent: false,
            status_line: String::new(),
            hooks_stripped: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
            out: Vec::new(),
        };
        let header = core.header.clone();
        // The bundles are not "new": compared with themselves.
        core.apply_sync(SyncResponse { entries, ..header }, now);
        let actions = std::mem::take(&mut core.out);
        (core, actions)
    }

    fn schedule_for(config: &Config, leaf: &LeafInfo) -> Schedule {
        Schedule::for_certificate(
            leaf.not_before,
            leaf.not_after,
            &config.rotation,
            super::timing::jitter_for(&leaf.serial, config.rotation.jitter),
        )
    }

    /// Handles `event` at `now`; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: SystemTime) -> Vec<Action> {
        match event {
            Event::Tick { check_volume } => self.on_tick(now, check_volume),
            Event::SyncNow => {
                self.next_sync = now;
                self.on_tick(now, false);
            }
            Event::Reload(config) => self.reload(*config, now),
            Event::Synced(result) => self.on_synced(result, now),
            Event::Signed {
                request,
                ids,
                result,
            } => self.on_signed(request, &ids, result, now),
            Event::Installed {
                entry_id,
                request,
                installed,
            } => self.on_installed(&entry_id, request, installed),
            Event::InstallFailed {
                entry_id,
                request,
                error,
            } => self.failed(&entry_id, request, error, now),
            Event::Adopted {
                entry_id,
                request,
                found,
            } => self.on_adopted(&entry_id, request, found),
            Event::Unverifiable(ids) => self.on_unverifiable(&ids, now),
            Event::Renewed(result) => self.on_renewed(result, now),
            Event::Probed(result) => self.on_probed(result, now),
            Event::HookDone { entry_id, error } => self.on_hook_done(&entry_id, error),
            Event::VolumeChanged(check) => self.out.push(Action::Restore(match check {
                Check::All => Restore::All { log: true },
                Check::Dirs(dirs) => Restore::Dirs(dirs),
            })),
        }
        std::mem::take(&mut self.out)
    }

    /// The moment something is next due (an entry, the node SVID, a sync, a probe), at most
    /// [`TICK`] after `now`. While the holder is down, due identities wait for the next probe,
    /// and a probe goes out only once something is due: an idle agent does not wake for it.
    pub fn next_wake(&self, now: SystemTime) -> SystemTime {
        let mut due = None::<SystemTime>;
        if self.can_sign() {
            for m in self.managed.values().filter(|m| m.may_ask()) {
                due = Some(due.map_or(due_at(&m.schedule), |d| d.min(due_at(&m.schedule))));
            }
        }
        if !self.node_renewing {
            let node = due_at(&self.node_schedule);
            due = Some(due.map_or(node, |d| d.min(node)));
        }
        let mut next = now + TICK;
        if self.reach.is_down() {
            if let (Some(probe), Some(due)) = (self.reach.next_probe(), due) {
                next = next.min(probe.max(due));
            }
        } else if let Some(due) = due {
            next = next.min(due);
        }
        if !self.sync_in_flight {
            next = next.min(self.next_sync);
        }
        next
    }

    /// Signing needs bundles to check the answers against: none before the first sync.
    fn can_sign(&self) -> bool {
        !self.header.bundles.trust_domains.is_empty()
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
                    .is_some_and(|m| m.may_ask() && m.schedule.is_due(now))
            })
            .cloned()
            .collect()
    }

    fn on_tick(&mut self, now: SystemTime, check_volume: bool) {
        let mut changed = self.expire(now);
        if !self.sync_in_flight && self.next_sync <= now {
            self.sync_in_flight = true;
            self.out.push(Action::Sync);
        }
        if self.node.not_after <= now && !self.node_expired_logged {
            self.node_expired_logged = true;
            tracing::error!(
                node = %self.config.node_name,
                mesh = %self.config.mesh,
                "the node SVID expired before it could be renewed (the CA holder was unreachable for its whole lifetime); the agent keeps serving what is valid but cannot obtain anything new: re-join with a new token (meshcert-ca token create, then restart the agent with it in --join-token-file or MESHCERT_JOIN_TOKEN)"
            );
        }
        let renew_due = !self.node_renewing && self.node_schedule.is_due(now);
        let due = self.due_entries(now);
        if self.reach.is_down() {
            if self.reach.should_probe(now, renew_due || !due.is_empty()) {
                self.reach.probe_sent();
                self.out.push(Action::Probe);
            }
        } else {
            if renew_due {
                self.node_renewing = true;
                self.out.push(Action::Renew);
            }
            for batch in due.chunks(SIGN_BATCH) {
                self.start_sign(batch);
                changed = true;
            }
        }
        if check_volume {
            self.out.push(Action::Restore(Restore::All { log: true }));
        }
        if changed {
            self.publish();
        }
    }

    /// Expired SVIDs stop being served (their files stay, marked expired, until replaced).
    /// Returns whether any did.
    fn expire(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        for m in self.managed.values_mut() {
            let Some(c) = m.current.as_ref().filter(|c| c.info.not_after <= now) else {
                continue;
            };
            tracing::warn!(entry_id = %m.entry.id, holder_down = self.reach.is_down(), "the SVID expired before it could be rotated; no longer served");
            self.reach
                .expired_now(&Arc::from(m.entry.spiffe_id.to_string()));
            m.marked_expired = true;
            self.out.push(Action::MarkExpired {
                entry_id: m.entry.id.clone(),
                dir: m.entry.dir.clone(),
                not_after: c.info.not_after,
            });
            m.current = None;
            if m.state == CertState::Issued {
                m.state = CertState::Pending;
            }
            changed = true;
        }
        changed
    }

    fn start_sign(&mut self, ids: &[String]) {
        self.requests += 1;
        let request = self.requests;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(m) = self.managed.get_mut(id) {
                m.in_flight = Some(request);
                m.state = CertState::Requested;
                jobs.push((m.entry.clone(), m.local));
            }
        }
        self.out.push(Action::Sign { request, jobs });
    }

    /// A new configuration: the settings that need a restart keep their running values.
    fn reload(&mut self, config: Config, now: SystemTime) {
        self.config = keep_restart_settings(&self.config, config);
        let header = self.header.clone();
        self.reapply(header, now);
        self.next_sync = now;
        tracing::info!("configuration reloaded");
    }

    /// After a bundle change: these SVIDs no longer verify against their trust domain's new
    /// roots (a mesh root replaced), so they are issued again at once; the old ones are served
    /// until then.
    fn on_unverifiable(&mut self, ids: &[String], now: SystemTime) {
        for id in ids {
            if let Some(m) = self.managed.get_mut(id)
                && m.current.is_some()
            {
                tracing::info!(entry_id = %id, "the SVID does not verify against the new bundle; issuing a new one");
                m.schedule = Schedule::now(now);
            }
        }
    }
}

/// `next` with the running values of the settings a reload cannot change (each change is
/// logged).
fn keep_restart_settings(old: &Config, config: Config) -> Config {
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
    Config {
        ca_address: old.ca_address.clone(),
        ca_server_name: old.ca_server_name.clone(),
        trust_bundle: old.trust_bundle.clone(),
        trust_roots: old.trust_roots.clone(),
        state_dir: old.state_dir.clone(),
        volume_dir: old.volume_dir.clone(),
        workload_socket: old.workload_socket.clone(),
        admin_socket: old.admin_socket.clone(),
        node_name: old.node_name.clone(),
        mesh: old.mesh.clone(),
        ..config
    }
}
