//! What the core shows: the snapshot every reader serves from, the status, the report sent
//! upward and the systemd state, all built from the state; and the read-only views the
//! executor needs to check and write SVIDs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshcert_protocol::api::Bundles;
use meshcert_protocol::{Entry, IdentityReport, NodeReport, NodeSvidReport, TrustDomain};

use super::{Action, Core, Managed};
use crate::cache::{AgentStatus, InstalledSvid, Snapshot};
use crate::config::Config;
use crate::rotation::installed::Installed;
use crate::volume::Contents;
use crate::{hook, report};

/// Which served folders to compare with memory (and write again where they differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Every folder; `log`: say how many were restored.
    All {
        /// Log the outcome (a periodic check), or not (after a sync).
        log: bool,
    },
    /// These folders only (the watcher saw someone else change them).
    Dirs(BTreeSet<String>),
}

/// Everything one publication replaces.
#[derive(Debug)]
pub struct Published {
    /// What the Workload API serves: only SVIDs valid at the moment of publication.
    pub snapshot: Snapshot,
    /// The admin socket's status.
    pub status: AgentStatus,
    /// The report sent upward.
    pub report: NodeReport,
    /// The systemd notification: `READY=1` once (`ready`), else the status line when it changed.
    pub notify: Option<Notify>,
}

/// A systemd notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// `READY=1` with the status line: every identity was attempted once.
    Ready(String),
    /// A new status line.
    Status(String),
}

fn unix(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok()
}

fn bundle_map(b: &Bundles) -> BTreeMap<TrustDomain, Vec<Vec<u8>>> {
    b.trust_domains
        .iter()
        .map(|(td, certs)| (td.clone(), certs.iter().map(|c| c.0.clone()).collect()))
        .collect()
}

impl Managed {
    fn report(&self) -> IdentityReport {
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

impl Core {
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The managed entries, in order, each with what is served for it.
    pub fn served(&self) -> impl Iterator<Item = (&Arc<Entry>, Option<&Installed>)> {
        self.order
            .iter()
            .filter_map(|id| self.managed.get(id))
            .map(|m| (&m.entry, m.current.as_ref()))
    }

    /// The roots of `entry`'s trust domain (DER).
    pub fn roots_for(&self, entry: &Entry) -> Vec<Vec<u8>> {
        self.header
            .bundles
            .trust_domains
            .get(entry.spiffe_id.trust_domain())
            .map(|certs| certs.iter().map(|c| c.0.clone()).collect())
            .unwrap_or_default()
    }

    /// The shared root gateways' second SVIDs chain to (DER).
    pub fn shared_root(&self) -> Vec<Vec<u8>> {
        self.header
            .bundles
            .shared_root
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }

    /// What `entry`'s folder holds while `current` is served: the one description both
    /// writing and checking the volume use.
    pub fn with_contents<R>(
        &self,
        entry: &Entry,
        current: &Installed,
        f: impl FnOnce(&Contents<'_>) -> R,
    ) -> R {
        let bundle = self.roots_for(entry);
        let mut federated = bundle_map(&self.header.bundles);
        federated.remove(entry.spiffe_id.trust_domain());
        let shared = self.shared_root();
        let chain = current.served.chain();
        let gateway_chain = current.gateway.as_ref().map(|g| g.chain());
        f(&Contents {
            chain: &chain,
            key: &current.key,
            bundle: &bundle,
            federated: &federated,
            owner: entry.owner,
            gateway: gateway_chain.as_deref().map(|g| (g, shared.as_slice())),
        })
    }

    /// Whether every identity was attempted once (and the holder synced): READY.
    fn all_attempted(&self) -> bool {
        self.sync_attempted && self.managed.values().all(|m| m.attempted)
    }

    /// The SVIDs valid at `now`, in entry order (a gateway's second one after its first).
    fn valid_svids(&self, now: SystemTime) -> Vec<Arc<InstalledSvid>> {
        self.served()
            .filter_map(|(_, c)| c)
            .filter(|c| c.info.not_after > now)
            .flat_map(|c| {
                let gateway = c.gateway.as_ref().filter(|g| g.not_after > now).cloned();
                std::iter::once(c.served.clone()).chain(gateway)
            })
            .collect()
    }

    /// Queues a publication of the state as it will be when performed.
    pub(super) fn publish(&mut self) {
        self.out.push(Action::Publish);
    }

    /// What to publish at `now` ([`Action::Publish`]); marks READY sent when it is.
    pub fn publication(&mut self, now: SystemTime) -> Published {
        self.published(now)
    }

    fn published(&mut self, now: SystemTime) -> Published {
        let bundles = &self.header.bundles;
        let snapshot = Snapshot {
            trust_domain: Some(self.header.trust_domain.clone()),
            bundle_version: bundles.version,
            bundles: bundle_map(bundles),
            shared_root: bundles.shared_root.iter().map(|c| c.0.clone()).collect(),
            federate: bundles.trust_domains.len() > 1,
            svids: self.valid_svids(now),
        };
        let identities: Arc<[IdentityReport]> = self
            .order
            .iter()
            .filter_map(|id| self.managed.get(id))
            .map(Managed::report)
            .collect();
        let all_attempted = self.all_attempted();
        let mut report = report::build(
            bundles.version,
            Some(self.header.enforcement),
            identities.clone(),
        );
        // A root rotation retires the previous root only once no node SVID chains to it.
        report.node_svid = Some(NodeSvidReport {
            serial: self.node.serial.clone(),
            not_before: unix(self.node.not_before).unwrap_or(0),
            not_after: unix(self.node.not_after).unwrap_or(0),
        });
        let issued = identities.iter().filter(|i| i.not_after.is_some()).count();
        let line = format!("{issued}/{} SVIDs issued", identities.len());
        let status = self.status(identities, all_attempted);
        let notify = if !self.ready_sent && all_attempted {
            self.ready_sent = true;
            Some(Notify::Ready(line.clone()))
        } else if line != self.status_line {
            Some(Notify::Status(line.clone()))
        } else {
            None
        };
        self.status_line = line;
        Published {
            snapshot,
            status,
            report,
            notify,
        }
    }

    fn status(&self, identities: Arc<[IdentityReport]>, all_attempted: bool) -> AgentStatus {
        AgentStatus {
            node: Some(self.header.node.clone()),
            mesh: Some(self.header.mesh.clone()),
            ca_address: self.config.ca_address.clone(),
            ca_connected: self.ca_connected,
            ca_last_error: self.ca_last_error.clone(),
            node_svid_not_after: unix(self.node.not_after),
            bundle_version: self.header.bundles.version,
            all_attempted,
            identities,
            warnings: self
                .hooks_stripped
                .iter()
                .map(|id| hook::stripped_warning(id))
                .collect(),
            ca_unreachable_since: self.reach.since().and_then(unix),
            expired_while_unreachable: self.reach.expired().to_vec(),
        }
    }
}
