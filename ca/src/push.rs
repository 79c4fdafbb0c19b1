//! Pushed changes: `GET /v1/watch` holds a node's request until what nodes sync changes, then
//! answers with the new watch version; the agent syncs at once. An idle watcher costs one
//! connection task and one `tokio::sync::watch` receiver; the wait is bounded
//! ([`WATCH_MAX_WAIT_SECS`]) so agents re-poll and dead peers are noticed. Agents that do not
//! watch keep syncing on their interval.
//!
//! The watch version joins two numbers: the datastore's change version (high bits), grown in
//! the same transaction as every write that changes what nodes sync and seen by every replica
//! on the datastore (`crate::store::changes`), and this replica's configuration epoch (low
//! [`EPOCH_BITS`] bits), drawn at start and at each reload, since a replica's own configuration
//! (its entries, enforcement, meshes) is not in the datastore. So an entry created through one
//! replica wakes the agents watching every replica; a reload wakes this replica's agents; an
//! agent that fails over to a replica serving another configuration syncs once.
//!
//! [`follow`] turns moves of the datastore's version into watch versions, but only once this
//! replica serves what the datastore says: a root rotation step persisted by another replica
//! is served first (`crate::rotation::follow`), so no agent is woken to sync stale bundles.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{ApiError, ErrorCode, WATCH_MAX_WAIT_SECS, WatchResponse};

use crate::holder::Holder;

/// The low bits of a watch version that carry the replica's configuration epoch.
pub const EPOCH_BITS: u32 = 24;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;

/// The watch version for datastore change version `store` and configuration `epoch`; pure.
pub fn watch_version(store: u64, epoch: u64) -> u64 {
    (store << EPOCH_BITS) | (epoch & EPOCH_MASK)
}

/// A configuration epoch other than `previous` (random, so that two replicas, or two starts of
/// one, rarely share one).
pub fn next_epoch(previous: u64) -> u64 {
    loop {
        let e = fastrand::u64(1..=EPOCH_MASK);
        if e != previous & EPOCH_MASK {
            return e;
        }
    }
}

/// Follows the datastore's change version until `stop`: each move is served (a rotation step
/// persisted elsewhere is applied first) and then announced to this replica's watchers.
pub async fn follow(holder: Arc<Holder>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut changes = holder.store.changes();
    loop {
        tokio::select! {
            () = &mut stop => break,
            moved = changes.changed() => if moved.is_err() { break },
        }
        let version = *changes.borrow_and_update();
        let h = Arc::clone(&holder);
        // Reading the rotation state (and, rarely, reopening the authority): off the workers.
        let _ = tokio::task::spawn_blocking(move || {
            crate::rotation::follow(&h, SystemTime::now());
            h.store_changed(version);
        })
        .await;
    }
}

/// The `version` and `wait` parameters of a watch query; pure.
pub fn parse_query(query: &str) -> Result<(Option<u64>, Duration), ApiError> {
    let mut version = None;
    let mut wait = WATCH_MAX_WAIT_SECS;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let bad = || {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("watch parameter `{kv}`: expected version=N and wait=SECONDS"),
            )
        };
        match kv.split_once('=') {
            Some(("version", v)) => version = Some(v.parse().map_err(|_| bad())?),
            Some(("wait", w)) => wait = w.parse::<u64>().map_err(|_| bad())?,
            _ => return Err(bad()),
        }
    }
    Ok((version, Duration::from_secs(wait.min(WATCH_MAX_WAIT_SECS))))
}

/// Answers a watch: at once when `version` is absent or already old, else when the change
/// version moves or `wait` passes.
pub async fn wait(holder: &Holder, query: &str) -> Result<WatchResponse, ApiError> {
    let (known, wait) = parse_query(query)?;
    let mut rx = holder.changes();
    let current = *rx.borrow_and_update();
    let Some(known) = known.filter(|k| *k == current) else {
        return Ok(WatchResponse { version: current });
    };
    let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v != known)).await;
    let version = *rx.borrow();
    Ok(WatchResponse { version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_of_either_part_moves_the_watch_version() {
        let e = next_epoch(0);
        assert!(e > 0 && e <= EPOCH_MASK);
        assert_ne!(next_epoch(e), e);
        let v = watch_version(7, e);
        assert_ne!(watch_version(8, e), v, "a datastore change");
        assert_ne!(watch_version(7, next_epoch(e)), v, "a reload");
        assert_eq!(watch_version(7, e) >> EPOCH_BITS, 7);
    }

    #[test]
    fn queries_are_parsed_and_the_wait_capped() {
        assert_eq!(
            parse_query("").expect("empty"),
            (None, Duration::from_secs(55))
        );
        assert_eq!(
            parse_query("version=7&wait=3").expect("both"),
            (Some(7), Duration::from_secs(3))
        );
        assert_eq!(
            parse_query("wait=9999").expect("capped").1,
            Duration::from_secs(55)
        );
        assert!(parse_query("version=x").is_err());
        assert!(parse_query("other=1").is_err());
    }
}
