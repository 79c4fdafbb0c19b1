//! The datastore's change version: one number, kept in the datastore (`meta.change_version`),
//! grown in the same transaction as every write that changes what nodes sync (an entry created
//! or deleted, a node banned, a shared document written: the root rotation state, sealed key
//! material). Every process on the datastore follows it through a [`Changes`] channel:
//!
//! - SQLite has one holder: the store moves the channel itself after each such commit.
//! - PostgreSQL may have several replicas: the writing transaction also runs
//!   `pg_notify('meshcert_changes', version)`, delivered to every listening session at commit.
//!   Each store keeps one dedicated session `LISTEN`ing ([`listen`]); after a (re)connection,
//!   and every [`POLL_EVERY`] as a fallback (a connection pooler in transaction mode drops
//!   `LISTEN`), it reads the version instead.
//!
//! The holder turns moves of this channel into answers to watching agents (`crate::push`).

use std::time::Duration;

use tokio::sync::watch;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "meshcert_changes";
/// The `meta` key holding the version.
pub const KEY: &str = "change_version";
/// How often a listening session also reads the version, in case a notification was lost.
pub const POLL_EVERY: Duration = Duration::from_secs(10);
/// The pause before a lost listening session is opened again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The change version as this process last saw it; it only grows.
#[derive(Debug)]
pub struct Changes(watch::Sender<u64>);

impl Changes {
    /// Starts at `version` (the stored one).
    pub fn new(version: u64) -> Self {
        Self(watch::Sender::new(version))
    }

    /// Records a version seen (a commit of ours, a notification, a poll); older ones are
    /// ignored, so notifications arriving late cannot move it back.
    pub fn advance(&self, version: u64) {
        self.0.send_if_modified(|v| {
            let newer = version > *v;
            if newer {
                *v = version;
            }
            newer
        });
    }

    /// A receiver to wait on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Parses a stored or notified version.
pub fn parse(text: &str) -> Result<u64, super::StoreError> {
    text.parse()
        .map_err(|e: std::num::ParseIntError| super::StoreError::Corrupt {
            what: "change version",
            reason: e.to_string(),
        })
}

/// Reads the stored version (0 when nothing changed yet).
async fn read(client: &tokio_postgres::Client) -> Result<u64, super::StoreError> {
    match client
        .query_opt("SELECT value FROM meta WHERE key = $1", &[&KEY])
        .await?
    {
        Some(row) => parse(row.get(0)),
        None => Ok(0),
    }
}

/// One listening session until it fails: `LISTEN`, read the version, then follow the
/// notifications (and poll every [`POLL_EVERY`]).
async fn session<T>(
    config: &tokio_postgres::Config,
    tls: T,
    changes: &Changes,
    failing: &mut bool,
) -> Result<(), super::StoreError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection delivers notifications only while it is polled: a task of its own.
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    changes.advance(read(&client).await?);
    if std::mem::take(failing) {
        tracing::info!("following the datastore's changes again");
    }
    let mut poll = tokio::time::interval(POLL_EVERY);
    loop {
        tokio::select! {
            payload = rx.recv() => match payload {
                Some(p) => match parse(&p) {
                    Ok(v) => changes.advance(v),
                    Err(e) => tracing::warn!(error = %e, "ignoring a change notification"),
                },
                None => break,
            },
            _ = poll.tick() => changes.advance(read(&client).await?),
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Err(super::StoreError::Unavailable(
            "the listening session ended".into(),
        )),
    }
}

/// Follows the change version for as long as the store lives: a dedicated session, opened
/// again after any failure (the version read at each reconnection covers what was missed).
pub async fn listen<T>(config: tokio_postgres::Config, tls: T, changes: std::sync::Arc<Changes>)
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send,
    T::Stream: Send + 'static,
{
    let mut failing = false;
    loop {
        if let Err(e) = session(&config, tls.clone(), &changes, &mut failing).await {
            // Logged once per outage, not at every attempt.
            if failing {
                tracing::debug!(error = %e, "still cannot follow the datastore's changes");
            } else {
                tracing::warn!(error = %e, "lost the datastore's change notifications; reconnecting");
            }
            failing = true;
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}
