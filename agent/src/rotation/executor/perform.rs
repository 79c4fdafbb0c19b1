//! The executor's work on the entry folders: check an issued SVID and write it, adopt one
//! found on disk, check the served ones against new bundles, write or restore folders.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use meshcert_protocol::Entry;

use super::Rotator;
use crate::issuer::Issuer;
use crate::keys::PrivateKey;
use crate::rotation::clock::Clock;
use crate::rotation::core::{Event, Restore};
use crate::rotation::installed::{CheckedChain, Installed};
use crate::rotation::installer::Installer;
use crate::svid;

impl<I: Issuer, V: Installer, C: Clock> Rotator<I, V, C> {
    /// Checks an issued SVID (chain, identity, key, validity with the clock skew allowed; a
    /// gateway's second chain against the shared root), then writes it. Nothing is written
    /// unless every check passed; a failure keeps the old SVID served.
    pub(super) fn install(
        &mut self,
        entry: &Arc<Entry>,
        request: u64,
        key: PrivateKey,
        chain: Vec<Vec<u8>>,
        gateway: Option<Vec<Vec<u8>>>,
        now: SystemTime,
    ) -> Event {
        let failed = |error: String| Event::InstallFailed {
            entry_id: entry.id.clone(),
            request,
            error,
        };
        let roots = self.core.roots_for(entry);
        let skew = self.core.config().clock_skew;
        let info = match svid::check_with_skew(&chain, &key, &roots, &entry.spiffe_id, now, skew) {
            Ok(info) => info,
            Err(e) => return failed(format!("the issued SVID does not check out: {e}")),
        };
        let gateway = match self.check_gateway(entry, &key, gateway, now) {
            Ok(g) => g,
            Err(e) => return failed(format!("the gateway SVID does not check out: {e}")),
        };
        let installed = Installed::new(&self.intermediates, entry, key, (chain, info), gateway);
        let installer = &self.installer;
        let written = self.core.with_contents(entry, &installed, |contents| {
            installer.install(&entry.dir, contents, now)
        });
        match written {
            Ok(()) => Event::Installed {
                entry_id: entry.id.clone(),
                request,
                installed,
            },
            Err(e) => failed(format!("cannot install: {e}")),
        }
    }

    /// Checks a gateway's second chain against the shared root. `Ok(None)` when the entry
    /// needs none (not a gateway, or no limited trust).
    fn check_gateway(
        &self,
        entry: &Entry,
        key: &PrivateKey,
        chain: Option<Vec<Vec<u8>>>,
        now: SystemTime,
    ) -> Result<Option<CheckedChain>, svid::SvidError> {
        let shared = self.core.shared_root();
        if !entry.gateway || shared.is_empty() {
            return Ok(None);
        }
        let chain = chain.ok_or(svid::SvidError::Empty)?;
        let info = svid::check(&chain, key, &shared, &entry.spiffe_id, now)?;
        Ok(Some((chain, info)))
    }

    /// Loads a still-valid SVID of `entry` from the volume (after a restart), if there is one.
    pub(super) fn adopt(&mut self, entry: &Arc<Entry>, request: u64, now: SystemTime) -> Event {
        Event::Adopted {
            entry_id: entry.id.clone(),
            request,
            found: self.found_on_disk(entry, now),
        }
    }

    fn found_on_disk(&self, entry: &Arc<Entry>, now: SystemTime) -> Option<Installed> {
        let loaded = match self.installer.load(&entry.dir) {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                tracing::info!(entry_id = %entry.id, error = %e, "the SVID on disk is unusable; issuing a new one");
                return None;
            }
        };
        let gateway = match self.check_gateway(entry, &loaded.key, loaded.gateway_chain, now) {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(entry_id = %entry.id, error = %e, "the gateway SVID on disk does not check out; issuing a new one");
                return None;
            }
        };
        let roots = self.core.roots_for(entry);
        let skew = self.core.config().clock_skew;
        let (chain, key) = (loaded.chain, loaded.key);
        match svid::check_with_skew(&chain, &key, &roots, &entry.spiffe_id, now, skew) {
            Ok(info) => Some(Installed::new(
                &self.intermediates,
                entry,
                key,
                (chain, info),
                gateway,
            )),
            Err(e) => {
                tracing::info!(entry_id = %entry.id, error = %e, "the SVID on disk does not check out; issuing a new one");
                None
            }
        }
    }

    /// The served SVIDs that no longer verify against their trust domain's roots (or, for a
    /// gateway's second one, the shared root).
    pub(super) fn unverifiable(&self, now: SystemTime) -> Vec<String> {
        let shared = self.core.shared_root();
        self.core
            .served()
            .filter_map(|(entry, current)| current.map(|c| (entry, c)))
            .filter(|(entry, c)| {
                let roots = self.core.roots_for(entry);
                let main = svid::check(&c.served.chain(), &c.key, &roots, &entry.spiffe_id, now);
                let gateway = c
                    .gateway
                    .as_ref()
                    .map(|g| svid::check(&g.chain(), &c.key, &shared, &entry.spiffe_id, now));
                main.is_err() || gateway.is_some_and(|g| g.is_err())
            })
            .map(|(entry, _)| entry.id.clone())
            .collect()
    }

    /// Writes every served SVID again (new bundles).
    pub(super) fn rewrite_all(&self, now: SystemTime) {
        for (entry, current) in self.core.served() {
            let Some(current) = current else { continue };
            let written = self.core.with_contents(entry, current, |contents| {
                self.installer.install(&entry.dir, contents, now)
            });
            if let Err(e) = written {
                tracing::warn!(entry_id = %entry.id, error = %e, "cannot rewrite the folder with the new bundles");
            }
        }
    }

    /// Restores the served folders (of `which`) whose files differ from memory (deleted,
    /// changed, replaced by someone else).
    pub(super) fn restore(&self, which: &Restore, now: SystemTime) {
        let dirs: Option<&BTreeSet<String>> = match which {
            Restore::All { .. } => None,
            Restore::Dirs(dirs) => Some(dirs),
        };
        let mut restored = 0;
        for (entry, current) in self.core.served() {
            let Some(current) = current else { continue };
            if dirs.is_some_and(|d| !d.contains(&entry.dir))
                || current.info.not_after <= now
                || self
                    .core
                    .with_contents(entry, current, |c| self.installer.matches(&entry.dir, c))
            {
                continue;
            }
            let written = self.core.with_contents(entry, current, |contents| {
                self.installer.install(&entry.dir, contents, now)
            });
            match written {
                Ok(()) => {
                    tracing::info!(entry_id = %entry.id, dir = %entry.dir, "folder restored from memory");
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(entry_id = %entry.id, error = %e, "cannot restore the folder")
                }
            }
        }
        if matches!(which, Restore::All { log: true }) {
            tracing::debug!(restored, "volume checked");
        }
        let say = matches!(which, Restore::All { log: true } | Restore::Dirs(_));
        if say && restored > 0 {
            tracing::warn!(
                restored,
                "files of the shared volume were changed or deleted by someone else; restored"
            );
        }
    }
}
