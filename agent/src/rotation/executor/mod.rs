//! The rotation's executor: the single writer of the agent's credentials. It owns the tasks,
//! the channels and the clock, and performs the [`Core`]'s actions through three seams: the
//! [`Issuer`] (network calls run in spawned tasks that send their outcome back as events), an
//! [`Installer`] (the volume) and a [`Clock`] (read once per wake-up).
//!
//! Everything that writes (volume, state folder, cache) happens on this task, one step at a
//! time, so a SIGTERM is only handled between two complete installs. The cache is written
//! through the one [`CacheWriter`], which the rotator owns (it is not `Clone`).

mod perform;
mod tasks;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_protocol::NodeReport;
use meshcert_protocol::api::SyncResponse;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::clock::{Clock, SystemClock};
use super::core::{Action, Core, Event, Notify};
use super::installer::Installer;
use crate::cache::{CacheWriter, Intermediates};
use crate::changes::Changes;
use crate::config::Config;
use crate::heap::Trimmer;
use crate::issuer::Issuer;
use crate::node::{self, NodeIdentity};
use crate::volume::Volume;

pub use crate::node::JoinError as RotatorError;

/// How often the volume is compared with memory even without a file event (the watcher does
/// not see writes into served files: see [`crate::changes`]).
pub const VOLUME_CHECK_EVERY: Duration = Duration::from_secs(5);
/// The heap's free pages go back to the kernel at most this often (after a publish).
const HEAP_TRIM_EVERY: Duration = Duration::from_secs(1);

/// What the daemon asks of the rotator.
#[derive(Debug)]
pub enum Command {
    /// A new, valid configuration (SIGHUP or a change of the file).
    Reload(Box<Config>),
    /// Sync with the holder now.
    SyncNow,
}

/// Where systemd notifications go (systemd itself, or a test's recorder).
pub type Notifier = Box<dyn FnMut(&Notify) + Send>;

fn notify_systemd(notify: &Notify) {
    match notify {
        Notify::Ready(line) => {
            tracing::info!(target: super::LOG_TARGET, status = %line, "ready");
            crate::systemd::ready(line);
        }
        Notify::Status(line) => crate::systemd::status(line),
    }
}

/// The seams the executor performs its actions through.
pub struct Seams<I, V, C> {
    /// The CA holder.
    pub issuer: Arc<I>,
    /// The entry folders.
    pub installer: V,
    /// The wall clock.
    pub clock: C,
    /// systemd's notifications.
    pub notifier: Notifier,
}

/// The single writer of credentials; see the module documentation.
pub struct Rotator<I: Issuer, V: Installer = Volume, C: Clock = SystemClock> {
    core: Core,
    /// The core's first actions (adoptions from disk), performed when the run starts.
    first: Vec<Action>,
    issuer: Arc<I>,
    installer: V,
    clock: C,
    notifier: Notifier,
    /// The one writer of the served state (not `Clone`: the rotator owns it alone).
    writer: CacheWriter,
    reports: watch::Sender<NodeReport>,
    semaphore: Arc<Semaphore>,
    permits: usize,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
    volume_changed: Arc<Changes>,
    heap: Trimmer,
    intermediates: Intermediates,
}

impl<I: Issuer> Rotator<I> {
    /// A rotator for a joined node, on the real volume and clock. `last_sync` is what the
    /// state folder holds (or what the join returned): the entries found there are loaded
    /// from the volume and served at once when they are still valid.
    pub fn new(
        issuer: Arc<I>,
        writer: CacheWriter,
        config: Config,
        node: NodeIdentity,
        last_sync: Option<SyncResponse>,
        volume_changed: Arc<Changes>,
    ) -> Self {
        let seams = Seams {
            issuer,
            installer: Volume::new(config.volume_dir.clone()),
            clock: SystemClock,
            notifier: Box::new(notify_systemd),
        };
        Rotator::with_seams(seams, writer, config, &node, last_sync, volume_changed)
    }
}

impl<I: Issuer, V: Installer, C: Clock> Rotator<I, V, C> {
    /// A rotator over the given seams.
    pub fn with_seams(
        seams: Seams<I, V, C>,
        writer: CacheWriter,
        config: Config,
        node: &NodeIdentity,
        last_sync: Option<SyncResponse>,
        volume_changed: Arc<Changes>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (reports, _) = watch::channel(NodeReport::default());
        let permits = config.rotation.max_concurrent_signing;
        let now = seams.clock.now();
        let (core, first) = Core::new(
            config,
            node.certificate(),
            last_sync,
            now,
            fastrand::u64(..),
        );
        Self {
            core,
            first,
            issuer: seams.issuer,
            installer: seams.installer,
            clock: seams.clock,
            notifier: seams.notifier,
            writer,
            reports,
            semaphore: Arc::new(Semaphore::new(permits)),
            permits,
            events_tx,
            events_rx,
            tasks: JoinSet::new(),
            volume_changed,
            heap: Trimmer::new(HEAP_TRIM_EVERY),
            intermediates: Intermediates::default(),
        }
    }

    /// A receiver of the node report, for [`crate::report::run`].
    pub fn reports(&self) -> watch::Receiver<NodeReport> {
        self.reports.subscribe()
    }

    /// Runs until `shutdown` completes; an install in progress always completes first.
    /// Returns how many of its background tasks (signing, sync, hooks) were still held when it
    /// stopped: those in flight, as finished ones are freed as they end.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
    ) -> usize {
        tokio::pin!(shutdown);
        // By the clock, not by wake-ups: while rotations run back to back the rotator wakes far
        // more often than once per tick, and a check reads every folder.
        let mut next_check = tokio::time::Instant::now() + VOLUME_CHECK_EVERY;
        let volume_changed = self.volume_changed.clone();
        let mut now = self.clock.now();
        let first = std::mem::take(&mut self.first);
        self.perform_all(first, now);
        self.step(
            Event::Tick {
                check_volume: false,
            },
            now,
        );
        loop {
            let wait = self
                .core
                .next_wake(now)
                .duration_since(now)
                .unwrap_or_default();
            let event = tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(command) = commands.recv() => match command {
                    Command::SyncNow => Event::SyncNow,
                    Command::Reload(config) => Event::Reload(config),
                },
                Some(event) = self.events_rx.recv() => event,
                () = volume_changed.changed() => match volume_changed.take() {
                    Some(check) => Event::VolumeChanged(check),
                    None => continue,
                },
                () = tokio::time::sleep(wait) => {
                    let check_volume = tokio::time::Instant::now() >= next_check;
                    if check_volume {
                        next_check = tokio::time::Instant::now() + VOLUME_CHECK_EVERY;
                    }
                    Event::Tick { check_volume }
                }
            };
            // The one read of the wall clock of this wake-up.
            now = self.clock.now();
            self.step(event, now);
        }
        self.reap_tasks();
        let held = self.tasks.len();
        self.tasks.abort_all();
        tracing::info!("rotator stopped");
        held
    }

    /// Hands `event` to the core and performs what it asks.
    fn step(&mut self, event: Event, now: SystemTime) {
        self.reap_tasks();
        if let Event::Synced(Ok(response)) = &event
            && self.core.is_new_sync(response)
            && let Err(e) = node::store_last_sync(&self.core.config().state_dir, response)
        {
            tracing::warn!(error = %e, "cannot store the last sync");
        }
        let actions = self.core.handle(event, now);
        self.perform_all(actions, now);
        let permits = self.core.config().rotation.max_concurrent_signing;
        if permits != self.permits {
            self.permits = permits;
            self.semaphore = Arc::new(Semaphore::new(permits));
        }
    }

    /// Performs `actions` in order; an action with an immediate outcome (an install, an
    /// adoption) hands it to the core at once, and what that asks comes before the rest.
    fn perform_all(&mut self, actions: Vec<Action>, now: SystemTime) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            if let Some(event) = self.perform(action, now) {
                for next in self.core.handle(event, now).into_iter().rev() {
                    queue.push_front(next);
                }
            }
        }
    }

    fn perform(&mut self, action: Action, now: SystemTime) -> Option<Event> {
        match action {
            Action::Sync => self.start_sync(),
            Action::Sign { request, jobs } => self.start_sign(request, jobs),
            Action::Renew => self.start_renew(),
            Action::Probe => self.start_probe(),
            Action::RunHook {
                entry_id,
                dir,
                hook,
            } => self.start_hook(entry_id, &dir, hook),
            Action::Install {
                entry,
                request,
                key,
                chain,
                gateway,
            } => return Some(self.install(&entry, request, key, chain, gateway, now)),
            Action::Adopt { entry, request } => return Some(self.adopt(&entry, request, now)),
            Action::Recheck => return Some(Event::Unverifiable(self.unverifiable(now))),
            Action::RewriteAll => self.rewrite_all(now),
            Action::Restore(which) => self.restore(&which, now),
            Action::Remove { entry_id, dir } => {
                if let Err(e) = self.installer.remove(&dir) {
                    tracing::warn!(entry_id = %entry_id, error = %e, "cannot remove the entry's folder");
                }
            }
            Action::MarkExpired {
                entry_id,
                dir,
                not_after,
            } => {
                if let Err(e) = self.installer.mark_expired(&dir, not_after) {
                    tracing::warn!(entry_id = %entry_id, error = %e, "cannot mark the folder expired");
                }
            }
            Action::ClearExpired { entry_id, dir } => {
                if let Err(e) = self.installer.clear_expired(&dir) {
                    tracing::warn!(entry_id = %entry_id, error = %e, "cannot remove the expired state");
                }
            }
            Action::Publish => {
                let published = self.core.publication(now);
                self.publish(published);
            }
        }
        None
    }

    /// Publishes the snapshot, the status, the report and the systemd state.
    fn publish(&mut self, published: super::core::Published) {
        self.writer.publish(published.snapshot);
        self.writer.set_status(published.status);
        let next = published.report;
        self.reports.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
        // A publish ends a burst (a batch, a sync): its buffers are freed now.
        self.heap.after_burst(std::time::Instant::now());
        if let Some(notify) = &published.notify {
            (self.notifier)(notify);
        }
    }
}
