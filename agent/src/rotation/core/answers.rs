//! The holder's answers (signing, renewal, probes), installs and their failures, and the
//! holder's reachability.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use meshcert_protocol::CertState;
use meshcert_protocol::api::SignOutcome;

use super::{Action, Core, SignedBatch};
use crate::hook;
use crate::issuer::IssuerError;
use crate::node::{NodeCertificate, RenewFailure};
use crate::rotation::installed::Installed;

fn ders(chain: Vec<meshcert_protocol::api::Der>) -> Vec<Vec<u8>> {
    chain.into_iter().map(|c| c.0).collect()
}

impl Core {
    pub(super) fn on_signed(
        &mut self,
        request: u64,
        ids: &[String],
        result: SignedBatch,
        now: SystemTime,
    ) {
        match result {
            Ok((results, bundles)) => {
                self.holder_answered(now);
                if bundles.version > self.header.bundles.version
                    && !bundles.trust_domains.is_empty()
                {
                    let mut next = self.header.clone();
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
                                && m.awaits(request)
                            {
                                tracing::info!(entry_id = %entry_id, code = %error.code, "the holder refuses this local entry: not asked for again until the entry or the enforcement mode changes");
                                m.denied = true;
                            }
                            let error = format!("refused by the holder: {error}");
                            self.failed(&entry_id, request, error, now);
                        }
                    }
                }
                for id in ids.iter().filter(|id| !answered.contains(*id)) {
                    let error = "the holder's answer has no result for this entry".into();
                    self.failed(id, request, error, now);
                }
            }
            Err(e) if e.is_holder_down() => {
                self.holder_down(now, &e);
                let error = format!("waiting for the CA holder: {e}");
                for id in ids {
                    self.requeue(id, request, &error);
                }
            }
            Err(e) => {
                self.connected(!e.is_unreachable(), Some(e.to_string()));
                for id in ids {
                    self.failed(id, request, e.to_string(), now);
                }
            }
        }
        self.publish();
    }

    /// An issued SVID goes to the executor to be checked and written, unless the answer is
    /// stale or it is a local SVID the current mode does not let the node serve.
    fn install(
        &mut self,
        entry_id: &str,
        request: u64,
        key: crate::keys::PrivateKey,
        chain: Vec<Vec<u8>>,
        gateway: Option<Vec<Vec<u8>>>,
        now: SystemTime,
    ) {
        let Some(m) = self.managed.get(entry_id).filter(|m| m.awaits(request)) else {
            return;
        };
        if m.local && self.local_barred_now(entry_id) {
            let error =
                "the holder issued a local SVID the enforcement mode does not allow: not installed";
            self.failed(entry_id, request, error.into(), now);
            return;
        }
        self.out.push(Action::Install {
            entry: m.entry.clone(),
            request,
            key,
            chain,
            gateway,
        });
    }

    fn local_barred_now(&self, entry_id: &str) -> bool {
        self.managed.get(entry_id).is_some_and(|m| {
            !crate::rotation::desired::local_may_serve(
                &m.entry,
                &self.header.trust_domain,
                self.header.enforcement,
            )
        })
    }

    /// An entry whose request failed because the holder is down: still due, not backed off;
    /// it goes out again once the holder answers.
    fn requeue(&mut self, entry_id: &str, request: u64, error: &str) {
        let Some(m) = self.managed.get_mut(entry_id).filter(|m| m.awaits(request)) else {
            return;
        };
        m.in_flight = None;
        m.attempted = true;
        m.state = CertState::Failed;
        m.last_error = Some(error.into());
    }

    /// The executor checked and wrote the SVID of `request`.
    pub(super) fn on_installed(&mut self, entry_id: &str, request: u64, installed: Installed) {
        let Some(m) = self.managed.get_mut(entry_id).filter(|m| m.awaits(request)) else {
            return;
        };
        tracing::info!(
            entry_id = %entry_id,
            spiffe_id = %m.entry.spiffe_id,
            serial = %installed.info.serial,
            not_after = installed.info.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "SVID installed"
        );
        m.schedule = Self::schedule_for(&self.config, &installed.info);
        m.current = Some(installed);
        m.state = CertState::Issued;
        m.last_error = None;
        m.attempted = true;
        m.in_flight = None;
        let entry = m.entry.clone();
        let local = m.local;
        if std::mem::take(&mut m.marked_expired) {
            self.out.push(Action::ClearExpired {
                entry_id: entry_id.to_owned(),
                dir: entry.dir.clone(),
            });
        }
        if let Some(h) = hook::for_entry(&self.config.hooks, &entry, local) {
            self.out.push(Action::RunHook {
                entry_id: entry_id.to_owned(),
                dir: entry.dir.clone(),
                hook: h.clone(),
            });
        }
    }

    /// The SVID found in the entry's folder at start (or none).
    pub(super) fn on_adopted(&mut self, entry_id: &str, request: u64, found: Option<Installed>) {
        let Some(m) = self.managed.get_mut(entry_id).filter(|m| m.awaits(request)) else {
            return;
        };
        m.in_flight = None;
        let Some(found) = found else { return };
        tracing::info!(entry_id = %entry_id, serial = %found.info.serial, "serving the SVID found on disk");
        m.schedule = Self::schedule_for(&self.config, &found.info);
        m.current = Some(found);
        m.state = CertState::Issued;
        m.attempted = true;
    }

    /// A request of `entry_id` failed at `now`: backed off.
    pub(super) fn failed(&mut self, entry_id: &str, request: u64, error: String, now: SystemTime) {
        let rotation = self.config.rotation;
        let random = self.rng.f64();
        let Some(m) = self.managed.get_mut(entry_id).filter(|m| m.awaits(request)) else {
            return;
        };
        m.in_flight = None;
        m.attempted = true;
        m.state = CertState::Failed;
        let wait = m.schedule.failed(now, &rotation, random);
        if m.schedule.failures == 1 {
            tracing::warn!(entry_id = %entry_id, error = %error, retry_in = ?wait, "cannot obtain an SVID");
        } else {
            tracing::debug!(entry_id = %entry_id, error = %error, retry_in = ?wait, failures = m.schedule.failures, "cannot obtain an SVID");
        }
        m.last_error = Some(error.into());
    }

    pub(super) fn on_renewed(
        &mut self,
        result: Result<NodeCertificate, RenewFailure>,
        now: SystemTime,
    ) {
        self.node_renewing = false;
        match result {
            Err(f) if f.holder_down => {
                // Still due: renewed once the holder answers again.
                self.holder_down(now, &f.message);
            }
            Ok(NodeCertificate { info: leaf, chain }) => {
                self.holder_answered(now);
                tracing::info!(serial = %leaf.serial, "node SVID renewed");
                self.node_schedule = Self::schedule_for(&self.config, &leaf);
                self.node = leaf;
                self.node_chain = chain;
                self.node_expired_logged = false;
                self.publish();
            }
            Err(f) => {
                self.holder_answered(now);
                let random = self.rng.f64();
                let wait = self
                    .node_schedule
                    .failed(now, &self.config.rotation, random);
                tracing::warn!(error = %f.message, retry_in = ?wait, "cannot renew the node SVID");
            }
        }
    }

    pub(super) fn on_probed(&mut self, result: Result<(), IssuerError>, now: SystemTime) {
        match result {
            Err(e) if e.is_holder_down() => {
                let random = self.rng.f64();
                self.reach.probe_failed(now, random);
                tracing::debug!(error = %e, "the CA holder still does not answer");
                self.connected(false, Some(e.to_string()));
            }
            // Any other answer means the holder is back.
            _ => {
                let ended = self.reach.probe_answered(now);
                self.log_outage_end(ended, now);
                self.connected(true, None);
                // Every due identity goes out now, in batches.
                self.on_tick(now, false);
            }
        }
    }

    pub(super) fn on_hook_done(&mut self, entry_id: &str, error: Option<String>) {
        let Some(error) = error else { return };
        tracing::warn!(entry_id = %entry_id, error = %error, "rotation hook failed");
        if let Some(m) = self.managed.get_mut(entry_id) {
            m.last_error = Some(format!("hook: {error}").into());
        }
        self.publish();
    }

    /// A call failed at `now` because the holder as a whole cannot serve.
    pub(super) fn holder_down(&mut self, now: SystemTime, e: &dyn std::fmt::Display) {
        let random = self.rng.f64();
        if self.reach.down(now, random) {
            tracing::warn!(ca = %self.config.ca_address, error = %e, "the CA holder cannot serve; probing it until it answers, identities are not backed off meanwhile");
            self.publish();
        }
        self.connected(false, Some(e.to_string()));
    }

    /// The holder answered a call at `now` (a refusal included): an outage ends.
    pub(super) fn holder_answered(&mut self, now: SystemTime) {
        let ended = self.reach.up(now);
        self.log_outage_end(ended, now);
        self.connected(true, None);
    }

    fn log_outage_end(
        &self,
        ended: Option<(std::time::Duration, Vec<std::sync::Arc<str>>)>,
        now: SystemTime,
    ) {
        if let Some((lasted, expired)) = ended {
            tracing::info!(
                ca = %self.config.ca_address,
                outage_secs = lasted.as_secs(),
                expired_meanwhile = expired.len(),
                due = self.due_entries(now).len(),
                "the CA holder answers again; sending every due identity"
            );
        }
    }

    pub(super) fn connected(&mut self, connected: bool, error: Option<String>) {
        if connected && !self.ca_connected {
            tracing::info!(ca = %self.config.ca_address, "connected to the CA holder");
        }
        self.ca_connected = connected;
        if error.is_some() || connected {
            self.ca_last_error = error;
        }
    }
}
