//! Pushed changes: one task keeps a long-poll `GET /v1/watch` open to the holder and asks the
//! rotator to sync (the existing [`Command::SyncNow`]) as soon as the holder's change version
//! moves: a new entry, a bundle or enforcement change, a root rotation step. The interval sync
//! stays as it was, so a holder without the watch endpoint (it answers `not_found`) is simply
//! watched again much later. A watch that fails because its replica went away is asked again
//! at once (a new connection tries every replica, so a fail-over does not hold pushes back);
//! when that fails too, the holder is down and the task makes no call of its own: it waits for
//! the rotator to see the holder answer again (the agent status's `caConnected`), so an outage
//! costs the holder nothing more than the agent's normal schedule.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use meshcert_protocol::api::{ErrorCode, WATCH_MAX_WAIT_SECS, WatchResponse};
use tokio::sync::{mpsc, watch};

use crate::cache::AgentStatus;

use crate::issuer::{HttpsIssuer, IssuerError};
use crate::metrics::TimedIssuer;
use crate::rotation::Command;

/// How long to wait before watching a holder again that has no watch endpoint.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(300);
/// The first and the longest wait after a failed watch.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// The long-poll seam (the holder over HTTPS, or a fake in tests).
pub trait Watch: Send + Sync + 'static {
    /// Waits for the holder's change version to differ from `version` (answers at once when
    /// `version` is `None`), at most `wait`.
    fn watch(
        &self,
        version: Option<u64>,
        wait: Duration,
    ) -> impl Future<Output = Result<WatchResponse, IssuerError>> + Send;
}

impl Watch for TimedIssuer<HttpsIssuer> {
    async fn watch(
        &self,
        version: Option<u64>,
        wait: Duration,
    ) -> Result<WatchResponse, IssuerError> {
        self.inner().watch(version, wait).await
    }
}

/// Trusts the holder through the last synced bundles from the start (a root rotation may have
/// finished while the agent was stopped).
pub fn follow_last_sync(issuer: &HttpsIssuer, state_dir: &std::path::Path) {
    if let Ok(Some(last)) = crate::node::load_last_sync(state_dir) {
        issuer.follow_bundles(&last.bundles);
    }
}

/// After a failure that says the holder is down: waits (up to `recheck`) for the rotator to
/// notice the outage, then until it reaches the holder again; no call meanwhile.
async fn until_holder_back(status: &mut watch::Receiver<Arc<AgentStatus>>, recheck: Duration) {
    let noticed = matches!(
        tokio::time::timeout(recheck, status.wait_for(|s| !s.ca_connected)).await,
        Ok(Ok(_))
    );
    if noticed {
        let _ = status.wait_for(|s| s.ca_connected).await;
    }
}

/// Watches until `stop`; sends [`Command::SyncNow`] whenever the version moves. `status` is
/// the agent's own (whether the holder answers); `recheck` bounds the wait for it to notice an
/// outage (twice the sync interval).
pub async fn run<W: Watch>(
    holder: Arc<W>,
    commands: mpsc::Sender<Command>,
    mut status: watch::Receiver<Arc<AgentStatus>>,
    recheck: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut version: Option<u64> = None;
    let mut failures: u32 = 0;
    // Whether the last failure saying the holder is down was already watched again at once.
    let mut again_at_once = false;
    let wait = Duration::from_secs(WATCH_MAX_WAIT_SECS);
    loop {
        let answer = tokio::select! {
            () = &mut stop => return,
            a = holder.watch(version, wait) => a,
        };
        let pause = match answer {
            Ok(r) => {
                failures = 0;
                again_at_once = false;
                // The first answer syncs too: a change committed between the agent's first
                // sync and this answer would otherwise wait for the interval sync.
                if version.is_none_or(|v| v != r.version) {
                    tracing::debug!(version = r.version, "the holder changed: syncing now");
                    if commands.send(Command::SyncNow).await.is_err() {
                        return;
                    }
                }
                version = Some(r.version);
                Duration::ZERO
            }
            Err(IssuerError::Api(e)) if e.code == ErrorCode::NotFound => {
                tracing::info!("the holder has no watch endpoint: syncing on the interval only");
                UNSUPPORTED_RETRY
            }
            Err(e) if e.is_holder_down() && !again_at_once => {
                // The replica this watch was on went away (its connection broke, or it
                // answered that it cannot serve): the next watch opens a new connection,
                // which tries every replica, the failed one last. Only when that fails too is
                // the holder as a whole down.
                tracing::debug!(error = %e, "watch failed: watching again at once on a new connection");
                again_at_once = true;
                Duration::ZERO
            }
            Err(e) if e.is_holder_down() => {
                tracing::debug!(error = %e, "watch failed: the holder is down; waiting for it");
                tokio::select! {
                    () = &mut stop => return,
                    () = until_holder_back(&mut status, recheck) => {}
                }
                Duration::ZERO
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::debug!(error = %e, failures, "watch failed; watching again");
                // Whatever changed meanwhile: the next answer's version differs.
                crate::rotation::backoff(failures, BACKOFF.0, BACKOFF.1, fastrand::f64())
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a script of outcomes, the first call first.
    struct Outcomes(Mutex<std::collections::VecDeque<Result<u64, IssuerError>>>);

    impl Watch for Outcomes {
        async fn watch(&self, _: Option<u64>, _: Duration) -> Result<WatchResponse, IssuerError> {
            let next = self.0.lock().expect("lock").pop_front();
            match next {
                Some(outcome) => outcome.map(|version| WatchResponse { version }),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test]
    async fn a_watch_broken_with_its_replica_is_asked_again_at_once_on_another() {
        // A fail-over: the first watch's connection breaks with its replica; the next watch
        // (a new connection, to the survivor) answers a moved version. The rotator still
        // reaches the holder (another replica answers it), so waiting for it to notice an
        // outage would hold the watch back for `recheck`.
        let script = Arc::new(Outcomes(Mutex::new(
            [
                Ok(7),
                Err(IssuerError::Http("connection reset".into())),
                Ok(8),
            ]
            .into(),
        )));
        let (tx, mut rx) = mpsc::channel(8);
        let connected = AgentStatus {
            ca_connected: true,
            ..AgentStatus::default()
        };
        let (_status_tx, status) = watch::channel(Arc::new(connected));
        let recheck = Duration::from_secs(3600);
        let task = tokio::spawn(run(script, tx, status, recheck, std::future::pending()));
        for version in [7, 8] {
            let asked = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
            assert!(
                matches!(asked, Ok(Some(Command::SyncNow))),
                "no sync for version {version} before the recheck"
            );
        }
        task.abort();
    }

    #[tokio::test]
    async fn a_moved_version_asks_for_one_sync_each_time() {
        // 7 (first: sync), 7 (same), 8 (sync), error, 9 (sync).
        let unavailable = meshcert_protocol::api::ApiError::new(ErrorCode::Unavailable, "x");
        let script = Arc::new(Outcomes(Mutex::new(
            [
                Ok(7),
                Ok(7),
                Ok(8),
                Err(IssuerError::Api(unavailable)),
                Ok(9),
            ]
            .into(),
        )));
        let (tx, mut rx) = mpsc::channel(8);
        let connected = AgentStatus {
            ca_connected: true,
            ..AgentStatus::default()
        };
        let (_status_tx, status) = watch::channel(Arc::new(connected));
        let recheck = Duration::from_millis(100);
        let task = tokio::spawn(run(script, tx, status, recheck, std::future::pending()));
        let mut syncs = 0;
        while let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            assert!(matches!(c, Command::SyncNow));
            syncs += 1;
        }
        assert_eq!(syncs, 3);
        task.abort();
    }
}
