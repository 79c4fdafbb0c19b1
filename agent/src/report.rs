//! The state sent upward: a [`NodeReport`] to the holder's `/v1/report` on every change
//! (debounced) and as a heartbeat; after a failed send the latest state goes as soon as the
//! holder answers again (retried with backoff, or, while the holder is down, at its return as
//! the rotator sees it, and at the heartbeat).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use meshcert_protocol::{Enforcement, IdentityReport, NodeReport};
use tokio::sync::watch;

use crate::cache::Cache;
use crate::issuer::Issuer;
use crate::rotation;

/// How long to wait for more changes before sending.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest wait between retries of a failed send.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// The report of a node holding `bundle_version` under `enforcement` with these identities.
pub fn build(
    bundle_version: u64,
    enforcement: Option<Enforcement>,
    identities: Arc<[IdentityReport]>,
) -> NodeReport {
    NodeReport {
        bundle_version,
        enforcement,
        identities,
        node_svid: None,
    }
}

/// Sends the latest report from `reports` on change and every `heartbeat` until `shutdown`.
pub async fn run<I: Issuer>(
    issuer: Arc<I>,
    mut reports: watch::Receiver<NodeReport>,
    cache: Cache,
    heartbeat: Duration,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut status = cache.subscribe_status();
    let mut failures: u32 = 0;
    let mut pending = true;
    let mut next = tokio::time::Instant::now() + DEBOUNCE;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            changed = reports.changed() => {
                if changed.is_err() {
                    return;
                }
                pending = true;
                next = next.min(tokio::time::Instant::now() + DEBOUNCE);
            }
            changed = status.changed(), if pending && failures > 0 => {
                if changed.is_err() {
                    return;
                }
                // The holder answered the rotation side again: send at once.
                if status.borrow_and_update().ca_connected {
                    next = tokio::time::Instant::now();
                }
            }
            () = tokio::time::sleep_until(next) => {
                let report = reports.borrow_and_update().clone();
                match issuer.report(report).await {
                    Ok(()) => {
                        if failures > 0 {
                            tracing::info!("report delivered after {failures} failed attempts");
                        }
                        failures = 0;
                        pending = false;
                        next = tokio::time::Instant::now() + heartbeat;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        pending = true;
                        // A holder that is down: the next heartbeat, or at once when the
                        // rotator sees it answer again (an idle agent adds no calls of its own).
                        let wait = if e.is_holder_down() {
                            heartbeat
                        } else {
                            rotation::backoff(failures, Duration::from_secs(1), RETRY_MAX, fastrand::f64())
                        };
                        if failures == 1 {
                            tracing::warn!(error = %e, "cannot send the report; retrying");
                        } else {
                            tracing::debug!(error = %e, failures, "cannot send the report; retrying");
                        }
                        next = tokio::time::Instant::now() + wait.min(heartbeat);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::cache::CacheWriter;
    use crate::issuer::IssuerError;
    use crate::keys::PrivateKey;
    use meshcert_protocol::api::{
        AttestRequest, NodeSvidResponse, RenewRequest, SignRequest, SignResponse, SyncResponse,
    };
    use meshcert_protocol::{CertState, SpiffeId};

    /// Records every report; refuses them while `down`.
    #[derive(Default)]
    struct Recorder {
        down: Mutex<bool>,
        got: Mutex<Vec<NodeReport>>,
        sent: tokio::sync::Notify,
    }

    impl Issuer for Recorder {
        async fn attest(&self, _: AttestRequest) -> Result<NodeSvidResponse, IssuerError> {
            Err(IssuerError::NoIdentity)
        }
        async fn renew(&self, _: RenewRequest) -> Result<NodeSvidResponse, IssuerError> {
            Err(IssuerError::NoIdentity)
        }
        async fn sync(&self) -> Result<SyncResponse, IssuerError> {
            Err(IssuerError::NoIdentity)
        }
        async fn sign(&self, _: SignRequest) -> Result<SignResponse, IssuerError> {
            Err(IssuerError::NoIdentity)
        }
        async fn report(&self, report: NodeReport) -> Result<(), IssuerError> {
            if *self.down.lock().expect("lock") {
                return Err(IssuerError::Http("down".into()));
            }
            self.got.lock().expect("lock").push(report);
            self.sent.notify_one();
            Ok(())
        }
        async fn probe(&self) -> Result<(), IssuerError> {
            Ok(())
        }
        fn set_identity(&self, _: &[Vec<u8>], _: &PrivateKey) -> Result<(), IssuerError> {
            Ok(())
        }
    }

    async fn until_reported(r: &Recorder, version: u64) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let seen = r.got.lock().expect("lock").last().map(|x| x.bundle_version);
                if seen == Some(version) {
                    return;
                }
                r.sent.notified().await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "report with bundle version {version} never sent"
        );
    }

    #[tokio::test]
    async fn latest_state_is_sent_on_change_and_after_an_outage() {
        let recorder = Arc::new(Recorder::default());
        let writer = CacheWriter::new();
        let (tx, rx) = watch::channel(build(1, None, Arc::default()));
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            recorder.clone(),
            rx,
            writer.reader(),
            Duration::from_secs(3600),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ));
        until_reported(&recorder, 1).await;
        // A burst of changes: the latest one arrives.
        for v in 2..=5 {
            tx.send_replace(build(v, None, Arc::default()));
        }
        until_reported(&recorder, 5).await;
        assert!(recorder.got.lock().expect("lock").len() <= 5);

        // The holder is down while the state changes; once it is back, the latest goes.
        *recorder.down.lock().expect("lock") = true;
        tx.send_replace(build(6, None, Arc::default()));
        tokio::time::sleep(DEBOUNCE * 2).await;
        *recorder.down.lock().expect("lock") = false;
        writer.update_status(|s| s.ca_connected = true);
        until_reported(&recorder, 6).await;
        stop_tx.send_replace(true);
        task.await.expect("stopped");
    }

    #[test]
    fn report_carries_every_identity_and_the_bundle_version() {
        let ids = vec![IdentityReport {
            entry_id: "web".into(),
            spiffe_id: SpiffeId::new("spiffe://mesh-a.test/web").expect("id"),
            state: CertState::Failed,
            serial: None,
            not_after: None,
            next_rotation: Some(5),
            last_error: Some("refused".into()),
            attempts: 2,
        }];
        let r = build(7, Some(Enforcement::Enabled), ids.clone().into());
        assert_eq!(r.bundle_version, 7);
        assert_eq!(*r.identities, *ids);
        assert_eq!(r.enforcement, Some(Enforcement::Enabled));
    }
}
