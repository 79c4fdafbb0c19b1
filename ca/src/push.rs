//! Pushed changes: `GET /v1/watch` holds a node's request until what nodes sync changes
//! (an entry created or deleted, a reload that changes bundles or enforcement, a root rotation
//! step), then answers with the new change version; the agent syncs at once. An idle watcher
//! costs one connection task and one `tokio::sync::watch` receiver; the wait is bounded
//! ([`WATCH_MAX_WAIT_SECS`]) so agents re-poll and dead peers are noticed. Agents that do not
//! watch keep syncing on their interval.

use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{ApiError, ErrorCode, WATCH_MAX_WAIT_SECS, WatchResponse};

use crate::holder::Holder;

/// A change version unique to this start of the holder (its start time in microseconds), so a
/// restarted holder never answers a version an agent already holds.
pub fn start_version() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
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
