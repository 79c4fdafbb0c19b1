//! systemd notifications (`Type=notify`): READY, RELOADING with MONOTONIC_USEC, STOPPING and
//! STATUS lines. Every call is a no-op when `NOTIFY_SOCKET` is not set.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `READY=1` alone, after a reload (the status line stays what was last set).
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd requires both for `Type=notify-reload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::debug!(error = %e, "cannot read CLOCK_MONOTONIC"),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A `STATUS=` line.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_texts_and_no_op_without_socket() {
        assert_eq!(NotifyState::Reloading.to_string(), "RELOADING=1");
        assert_eq!(NotifyState::Ready.to_string(), "READY=1");
        assert!(
            NotifyState::monotonic_usec_now()
                .expect("monotonic")
                .to_string()
                .starts_with("MONOTONIC_USEC=")
        );
        // Without NOTIFY_SOCKET every call returns quietly.
        ready("0/0 SVIDs issued");
        reloading();
        stopping();
    }
}
