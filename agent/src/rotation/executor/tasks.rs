//! The executor's background tasks: network calls and hooks, each sending its outcome back
//! as an [`Event`]. A task that panics (a bug) still reports a failed outcome, so nothing it
//! carried stays in flight.

use std::sync::Arc;

use meshcert_protocol::{Entry, Hook};

use super::Rotator;
use crate::hook;
use crate::issuer::Issuer;
use crate::node::{self, RenewFailure};
use crate::rotation::clock::Clock;
use crate::rotation::core::Event;
use crate::rotation::installer::Installer;
use crate::rotation::signing::{sign_batch, unless_panicked};

impl<I: Issuer, V: Installer, C: Clock> Rotator<I, V, C> {
    pub(super) fn start_sync(&mut self) {
        let issuer = self.issuer.clone();
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let result = unless_panicked(issuer.sync()).await.and_then(|r| r);
            let _ = tx.send(Event::Synced(result));
        });
    }

    pub(super) fn start_sign(&mut self, request: u64, jobs: Vec<(Arc<Entry>, bool)>) {
        let ids = jobs.iter().map(|(e, _)| e.id.clone()).collect();
        let issuer = self.issuer.clone();
        let semaphore = self.semaphore.clone();
        let algorithm = self.core.config().key_algorithm;
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

    pub(super) fn start_renew(&mut self) {
        let issuer = self.issuer.clone();
        let algorithm = self.core.config().key_algorithm;
        let state_dir = self.core.config().state_dir.clone();
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let renewal = node::renew(&*issuer, algorithm, &state_dir);
            let result = unless_panicked(renewal)
                .await
                .map_err(|e| RenewFailure {
                    message: e.to_string(),
                    holder_down: false,
                })
                .and_then(|r| r);
            let _ = tx.send(Event::Renewed(result));
        });
    }

    pub(super) fn start_probe(&mut self) {
        let issuer = self.issuer.clone();
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let result = unless_panicked(issuer.probe()).await.and_then(|r| r);
            let _ = tx.send(Event::Probed(result));
        });
    }

    pub(super) fn start_hook(&mut self, entry_id: String, dir: &str, hook: Hook) {
        let dir = self.installer.entry_path(dir);
        let tx = self.events_tx.clone();
        self.tasks.spawn(async move {
            let error = hook::run(&hook, &dir).await.err().map(|e| e.to_string());
            let _ = tx.send(Event::HookDone { entry_id, error });
        });
    }

    /// Frees the tasks that have finished: a `JoinSet` keeps each task (its whole state
    /// machine's allocation) until it is joined.
    pub(super) fn reap_tasks(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "a rotator task panicked");
            }
        }
    }
}
