//! Sync answers and their application: the desired set of entries made the managed one, the
//! holder's enforcement mode applied to the local entries, new bundles.

use std::sync::Arc;
use std::time::SystemTime;

use meshcert_protocol::api::SyncResponse;
use meshcert_protocol::{CertState, Enforcement, Entry};

use super::{Action, Core, Managed, Restore};
use crate::hook;
use crate::issuer::IssuerError;
use crate::reissue;
use crate::rotation::desired::{self, Skipped, Wanted};
use crate::rotation::timing::{self, Schedule};

/// Whether a sync answer equals the last one (`b`, whose entries are `b_entries`), field by
/// field (without building two JSON trees of every entry).
pub(super) fn same_sync(a: &SyncResponse, b: &SyncResponse, b_entries: &[Arc<Entry>]) -> bool {
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

impl Core {
    /// Whether `response` differs from the last sync (the executor stores it then).
    pub fn is_new_sync(&self, response: &SyncResponse) -> bool {
        !self.have_sync || !same_sync(response, &self.header, &self.holder_entries)
    }

    pub(super) fn on_synced(&mut self, result: Result<SyncResponse, IssuerError>, now: SystemTime) {
        self.sync_in_flight = false;
        self.sync_attempted = true;
        match result {
            Ok(response) => {
                self.holder_answered(now);
                self.sync_failures = 0;
                self.next_sync = now + self.config.sync_interval;
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
                let wait = timing::backoff(
                    self.sync_failures,
                    self.config.rotation.backoff_initial,
                    self.config.rotation.backoff_max,
                    self.rng.f64(),
                )
                .min(self.config.sync_interval);
                self.next_sync = now + wait;
                if self.sync_failures == 1 {
                    tracing::warn!(error = %e, "sync with the CA holder failed; backing off");
                } else {
                    tracing::debug!(error = %e, failures = self.sync_failures, "sync with the CA holder failed again");
                }
                self.holder_answered(now);
                self.connected(!e.is_unreachable(), Some(e.to_string()));
            }
        }
    }

    /// Makes the managed entries those of `response` plus the config's local ones; hooks in
    /// the holder's entries are stripped (shown in the status).
    pub(super) fn apply_sync(&mut self, mut response: SyncResponse, now: SystemTime) {
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
        self.holder_entries = std::mem::take(&mut response.entries)
            .into_iter()
            .map(|e| match self.managed.get(&e.id) {
                Some(m) if *m.entry == e => m.entry.clone(),
                _ => Arc::new(e),
            })
            .collect();
        self.reapply(response, now);
    }

    /// [`Self::apply_sync`] with `header` (a sync answer without its entries) and the holder's
    /// entries already held (after a reload, or new bundles from a signing answer).
    pub(super) fn reapply(&mut self, header: SyncResponse, now: SystemTime) {
        let bundles_changed = header.bundles != self.header.bundles;
        let enforcement_changed = header.enforcement != self.header.enforcement;
        self.header = header;
        let (wanted, skipped) = desired::desired(&self.holder_entries, &self.config.entries);
        log_skipped(&skipped);
        for id in desired::removed(self.managed.keys(), &wanted) {
            if let Some(m) = self.managed.remove(&id) {
                tracing::info!(entry_id = %id, dir = %m.entry.dir, "entry removed; removing its folder");
                self.remove_folder(&m.entry);
            }
        }
        // The mode first, on the entries held before: a new entry is then adopted from disk
        // (or not) under the new mode, and its adoption is not voided by the mode change.
        if enforcement_changed {
            self.apply_enforcement(now);
        }
        for w in &wanted {
            self.apply_one(w, bundles_changed, now);
        }
        self.follow_root_rotation(now);
        // Not `into_iter()`: collecting in place would keep the entries' whole buffer as the
        // capacity of this list of ids.
        self.order = wanted.iter().map(|w| w.entry.id.clone()).collect();
        if bundles_changed {
            self.out.push(Action::Recheck);
            self.out.push(Action::RewriteAll);
        } else {
            self.out.push(Action::Restore(Restore::All { log: false }));
        }
        self.publish();
    }

    /// A root rotation's activation brings every SVID (and the node SVID) that does not chain
    /// to an active root forward, each to its moment in the rotation's window
    /// ([`crate::reissue`]).
    fn follow_root_rotation(&mut self, now: SystemTime) {
        let Some(hint) = self.header.bundles.rotation.clone() else {
            return;
        };
        for m in self.managed.values_mut() {
            let Some(c) = &m.current else { continue };
            // A gateway's second SVID chains to the shared root: it counts the same.
            let chains = std::iter::once(&c.served).chain(c.gateway.as_ref());
            for served in chains {
                m.schedule.next_at = reissue::earliest(
                    m.schedule.next_at,
                    &served.chain(),
                    Some(&hint),
                    &m.entry.id,
                    now,
                );
            }
        }
        let name = &self.config.node_name;
        self.node_schedule.next_at = reissue::earliest(
            self.node_schedule.next_at,
            &self.node_chain,
            Some(&hint),
            name,
            now,
        );
    }

    fn remove_folder(&mut self, entry: &Entry) {
        self.out.push(Action::Remove {
            entry_id: entry.id.clone(),
            dir: entry.dir.clone(),
        });
    }

    /// A local entry that may not be served now (enforced, or outside the trust domain).
    fn local_barred(&self, entry: &Entry) -> bool {
        !desired::local_may_serve(entry, &self.header.trust_domain, self.header.enforcement)
    }

    /// Makes one wanted entry managed: new (adopted from disk when it may be served), or
    /// changed (the same SVID under the new entry, or a new one when its identity changed).
    fn apply_one(&mut self, w: &Wanted, bundles_changed: bool, now: SystemTime) {
        let Wanted { entry, local } = w;
        let Some(m) = self.managed.get_mut(&entry.id) else {
            let mut m = Managed::new(entry.clone(), *local, now);
            if *local && !self.header.trust_domain.contains(&entry.spiffe_id) {
                tracing::warn!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, trust_domain = %self.header.trust_domain, "a local entry is outside the node's trust domain: the holder refuses it under every mode");
            }
            if *local && self.local_barred(entry) {
                // Enforced: a local SVID left on disk is not served.
                self.remove_folder(entry);
            } else {
                self.requests += 1;
                m.in_flight = Some(self.requests);
                self.out.push(Action::Adopt {
                    entry: entry.clone(),
                    request: self.requests,
                });
            }
            self.managed.insert(entry.id.clone(), m);
            return;
        };
        m.local = *local;
        if *m.entry == **entry && !bundles_changed {
            return;
        }
        let old = std::mem::replace(&mut m.entry, entry.clone());
        let change = desired::change(&old, entry);
        if change.any {
            m.denied = false;
        }
        if change.dir {
            self.out.push(Action::Remove {
                entry_id: entry.id.clone(),
                dir: old.dir.clone(),
            });
        }
        if change.spiffe_id {
            tracing::info!(entry_id = %entry.id, "entry's SPIFFE ID changed; issuing a new SVID");
            m.current = None;
            m.in_flight = None;
            m.state = CertState::Pending;
            m.schedule = Schedule::now(now);
            return;
        }
        if change.owner {
            // The old owner could read the key: the new one gets a fresh key now.
            tracing::info!(entry_id = %entry.id, "entry's owner changed; issuing an SVID with a new key");
            m.schedule = Schedule::now(now);
        }
        // Selectors, folder, owner or bundles changed: the same SVID is served under the new
        // entry (and written again where needed).
        m.current = m.current.as_ref().map(|c| c.under(&m.entry));
    }

    /// A new enforcement mode for the local entries: under DISABLED they are asked for at once
    /// (again, if the holder refused them before); otherwise their SVIDs stop being served and
    /// their folders go at once, and the holder is asked once more so the status shows its
    /// answer (`policy_denied`).
    fn apply_enforcement(&mut self, now: SystemTime) {
        let allowed = self.header.enforcement == Enforcement::Disabled;
        let mut removed = Vec::new();
        for m in self.managed.values_mut().filter(|m| m.local) {
            m.denied = false;
            // An answer to a request sent under the previous mode is not used.
            m.in_flight = None;
            if !allowed && m.current.take().is_some() {
                tracing::info!(entry_id = %m.entry.id, dir = %m.entry.dir, "access control is enforced: the local entry's SVID is no longer served");
                removed.push(m.entry.clone());
                m.state = CertState::Pending;
            }
            if m.current.is_none() {
                m.schedule = Schedule::now(now);
            }
        }
        for entry in removed {
            self.remove_folder(&entry);
        }
    }
}

fn log_skipped(skipped: &[Skipped]) {
    for s in skipped {
        match s {
            Skipped::ShadowedLocal(id) => {
                tracing::warn!(entry_id = %id, "a local entry has the id of a holder entry; the holder's wins");
            }
            Skipped::DirTaken { entry_id, dir } => {
                tracing::warn!(entry_id = %entry_id, dir = %dir, "another entry already uses this folder; ignored");
            }
            Skipped::BadDir(_) => {}
        }
    }
}
