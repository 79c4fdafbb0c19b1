//! The SQLite datastore: one file `<stateDir>/meshcert.db`, WAL journal, `synchronous=FULL` so
//! that a committed write survives a crash. Reports alone (status, rewritten every heartbeat)
//! commit with `synchronous=NORMAL`: a power loss or OS crash may lose the reports written
//! since the last FULL commit; a process crash loses none, and no issuance or token use is ever
//! written that way.
//!
//! Writes go through one connection; the reads every API call makes (the caller's node record,
//! an entry by id) go through a second one, so that they never wait behind a commit's fsync: in
//! WAL mode a reader sees the last committed state without taking the writer's lock.

use std::path::Path;
use std::sync::Mutex;

use meshcert_protocol::Entry;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::changes::{self, Changes};
use super::{
    Issuance, KubernetesNodeOutcome, NodeRecord, Pruned, Store, StoreError, StoredReport,
    TokenOutcome, TokenRecord,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    mesh TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    mesh TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    banned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issuances (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    node TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    node TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_spiffe_id ON entries (json_extract(body, '$.spiffeId'));
CREATE INDEX IF NOT EXISTS issuances_not_after ON issuances (not_after);
CREATE INDEX IF NOT EXISTS tokens_expires_at ON tokens (expires_at);
";

/// SQLite behind a mutex (one writer; every call is short), and a second connection for the
/// per-call reads.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// One holder per file: our own commits are the only moves of the change version.
    changes: Changes,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (or creates) the database and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        // Databases from before the `local` marker get the column (default: not local).
        let has_local: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('issuances') WHERE name = 'local'")
            .and_then(|mut s| s.exists([]))
            .map_err(open_err)?;
        if !has_local {
            conn.execute_batch("ALTER TABLE issuances ADD COLUMN local INTEGER NOT NULL DEFAULT 0")
                .map_err(open_err)?;
        }
        // Databases from before Kubernetes attestation get the node's cluster (none: a VM).
        let has_cluster: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('nodes') WHERE name = 'cluster'")
            .and_then(|mut s| s.exists([]))
            .map_err(open_err)?;
        if !has_cluster {
            conn.execute_batch("ALTER TABLE nodes ADD COLUMN cluster TEXT")
                .map_err(open_err)?;
        }
        let version = conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [changes::KEY],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(open_err)?
            .map_or(Ok(0), |v| changes::parse(&v))?;
        // Only reads go through it (a read-only open would depend on the WAL files' state).
        let reader = Connection::open(path).map_err(open_err)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            changes: Changes::new(version),
        })
    }

    /// Runs `write` in one transaction and, when it says it changed what nodes sync (`true`
    /// in its answer), grows the change version in that same transaction.
    fn changing<T>(
        &self,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (answer, changed) = write(&tx)?;
        if !changed {
            return Ok(answer);
        }
        let version: String = tx.query_row(
            "INSERT INTO meta (key, value) VALUES (?1, '1')
             ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)
             RETURNING value",
            [changes::KEY],
            |r| r.get(0),
        )?;
        tx.commit()?;
        self.changes.advance(changes::parse(&version)?);
        Ok(answer)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection of the per-call reads (never behind a commit).
    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        name: r.get(0)?,
        mesh: r.get(1)?,
        spiffe_id: r.get(2)?,
        first_seen: to_u64(r.get(3)?),
        banned: r.get::<_, i64>(4)? != 0,
        cluster: r.get(5)?,
    })
}

impl Store for SqliteStore {
    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO tokens (hash, node, mesh, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.hash, t.node, t.mesh, to_i64(t.expires_at)],
        )?;
        Ok(())
    }

    fn consume_token(
        &self,
        hash: &str,
        now: u64,
        node_id: &dyn Fn(&str, &str) -> String,
    ) -> Result<TokenOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(String, String, i64, i64)> = tx
            .query_row(
                "SELECT node, mesh, expires_at, used FROM tokens WHERE hash = ?1",
                params![hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((node, mesh, expires_at, used)) = row else {
            return Ok(TokenOutcome::Unknown);
        };
        if used != 0 {
            return Ok(TokenOutcome::Used);
        }
        if to_u64(expires_at) <= now {
            return Ok(TokenOutcome::Expired);
        }
        let changed = tx.execute(
            "UPDATE tokens SET used = 1, used_at = ?2 WHERE hash = ?1 AND used = 0",
            params![hash, to_i64(now)],
        )?;
        if changed != 1 {
            return Ok(TokenOutcome::Used);
        }
        tx.execute(
            "INSERT INTO nodes (name, mesh, spiffe_id, first_seen) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET mesh = excluded.mesh, spiffe_id = excluded.spiffe_id",
            params![node, mesh, node_id(&node, &mesh), to_i64(now)],
        )?;
        tx.commit()?;
        Ok(TokenOutcome::Consumed { node, mesh })
    }

    fn attest_kubernetes_node(
        &self,
        node: &NodeRecord,
    ) -> Result<KubernetesNodeOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<(i64, Option<String>, String)> = tx
            .query_row(
                "SELECT banned, cluster, mesh FROM nodes WHERE name = ?1",
                params![node.name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match existing {
            Some((banned, _, _)) if banned != 0 => return Ok(KubernetesNodeOutcome::Banned),
            Some((_, cluster, mesh)) if cluster != node.cluster || mesh != node.mesh => {
                return Ok(KubernetesNodeOutcome::Taken { cluster, mesh });
            }
            _ => {}
        }
        tx.execute(
            "INSERT INTO nodes (name, mesh, spiffe_id, first_seen, cluster) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET spiffe_id = excluded.spiffe_id",
            params![
                node.name,
                node.mesh,
                node.spiffe_id,
                to_i64(node.first_seen),
                node.cluster
            ],
        )?;
        tx.commit()?;
        Ok(KubernetesNodeOutcome::Registered)
    }

    fn token_used(&self, hash: &str) -> Result<Option<bool>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT used FROM tokens WHERE hash = ?1",
                params![hash],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|u| u != 0))
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        // Read for every call on the API: the statement is prepared once per connection.
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT name, mesh, spiffe_id, first_seen, banned, cluster FROM nodes WHERE name = ?1",
        )?;
        Ok(stmt.query_row(params![name], node_row).optional()?)
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, mesh, spiffe_id, first_seen, banned, cluster FROM nodes ORDER BY name",
        )?;
        let rows = stmt.query_map([], node_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn ban_node(&self, name: &str) -> Result<bool, StoreError> {
        self.changing(|tx| {
            let banned =
                tx.execute("UPDATE nodes SET banned = 1 WHERE name = ?1", params![name])? == 1;
            Ok((banned, banned))
        })
    }

    fn insert_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let body = serde_json::to_string(entry).map_err(|e| StoreError::Corrupt {
            what: "entry",
            reason: e.to_string(),
        })?;
        self.changing(|tx| {
            let changed = tx.execute(
                "INSERT OR IGNORE INTO entries (id, body) VALUES (?1, ?2)",
                params![entry.id, body],
            )?;
            if changed == 0 {
                return Err(StoreError::Exists(format!("entry `{}`", entry.id)));
            }
            Ok(((), true))
        })
    }

    fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        self.changing(|tx| {
            let deleted = tx.execute("DELETE FROM entries WHERE id = ?1", params![id])? == 1;
            Ok((deleted, deleted))
        })
    }

    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        // Read for every sync.
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT body FROM entries ORDER BY id")?;
        let bodies: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str(b).map_err(|e| StoreError::Corrupt {
                    what: "entry",
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let body: Option<String> = self
            .reader()
            .prepare_cached("SELECT body FROM entries WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| StoreError::Corrupt {
                what: "entry",
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    fn registers(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .reader()
            .prepare_cached(
                "SELECT 1 FROM entries WHERE json_extract(body, '$.spiffeId') = ?1 LIMIT 1",
            )?
            .exists(params![spiffe_id])?)
    }

    fn prune(&self, before: u64) -> Result<Pruned, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before = to_i64(before);
        let issuances = tx.execute(
            "DELETE FROM issuances WHERE not_after < ?1",
            params![before],
        )?;
        let tokens = tx.execute("DELETE FROM tokens WHERE expires_at < ?1", params![before])?;
        let issuances = u64::try_from(issuances).unwrap_or(0);
        if issuances > 0 {
            let pruned = SqliteStore::meta(&tx, "issuances_pruned")?
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('issuances_pruned', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![(pruned + issuances).to_string()],
            )?;
        }
        tx.commit()?;
        Ok(Pruned {
            issuances,
            tokens: u64::try_from(tokens).unwrap_or(0),
        })
    }

    fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO issuances (serial, spiffe_id, node, not_after, issued_at, local)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for i in issued {
                insert.execute(params![
                    i.serial,
                    i.spiffe_id,
                    i.node,
                    to_i64(i.not_after),
                    to_i64(i.issued_at),
                    i64::from(i.local)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn issuances(&self) -> Result<Vec<Issuance>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT serial, spiffe_id, node, not_after, issued_at, local FROM issuances
             ORDER BY issued_at, serial",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Issuance {
                serial: r.get(0)?,
                spiffe_id: r.get(1)?,
                node: r.get(2)?,
                not_after: to_u64(r.get(3)?),
                issued_at: to_u64(r.get(4)?),
                local: r.get::<_, i64>(5)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn issuance_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT (SELECT COUNT(*) FROM issuances)
                  + COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'issuances_pruned'), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok(to_u64(n))
    }

    fn put_report(&self, r: &StoredReport) -> Result<(), StoreError> {
        let body = serde_json::to_string(&r.report).map_err(|e| StoreError::Corrupt {
            what: "report",
            reason: e.to_string(),
        })?;
        // A report is status, rewritten every heartbeat: its commit does not wait for an
        // fsync (`synchronous=NORMAL` for this one transaction; the WAL is synced by the next
        // FULL commit or checkpoint). The connection is back to FULL before the lock is let go.
        // Written for every heartbeat: the insert is prepared once per connection. The pragmas
        // are not cached: SQLite applies `synchronous` when the statement is prepared.
        let conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let written = conn
            .prepare_cached(
                "INSERT INTO reports (node, body, received_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET body = excluded.body, received_at = excluded.received_at",
            )
            .and_then(|mut s| s.execute(params![r.node, body, to_i64(r.received_at)]));
        conn.pragma_update(None, "synchronous", "FULL")?;
        written?;
        Ok(())
    }

    fn settle_bundle_version(&self, digest: &str) -> Result<u64, StoreError> {
        settle(&mut self.conn(), digest)
    }

    fn load_document(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let row: Option<(i64, Vec<u8>)> = conn
            .query_row(
                "SELECT revision, value FROM documents WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(rev, value)| (u64::try_from(rev).unwrap_or(0), value)))
    }

    fn store_document(
        &self,
        name: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        let expected = i64::try_from(expected).unwrap_or(i64::MAX);
        let next = expected.saturating_add(1);
        self.changing(|tx| {
            // One statement: insert when absent (expected 0), else update only at the expected
            // revision; zero rows changed means another writer got there first.
            let changed = if expected == 0 {
                tx.execute(
                    "INSERT INTO documents (name, revision, value) VALUES (?1, 1, ?2) ON CONFLICT (name) DO NOTHING",
                    rusqlite::params![name, value],
                )?
            } else {
                tx.execute(
                    "UPDATE documents SET revision = ?3, value = ?2 WHERE name = ?1 AND revision = ?4",
                    rusqlite::params![name, value, next, expected],
                )?
            } == 1;
            Ok((changed.then(|| u64::try_from(next).unwrap_or(0)), changed))
        })
    }

    fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node, body, received_at FROM reports ORDER BY node")?;
        let rows: Vec<(String, String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(node, body, at)| {
                Ok(StoredReport {
                    node,
                    report: serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                        what: "report",
                        reason: e.to_string(),
                    })?,
                    received_at: to_u64(at),
                })
            })
            .collect()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl SqliteStore {
    fn meta(tx: &rusqlite::Transaction<'_>, key: &str) -> Result<Option<String>, StoreError> {
        Ok(tx
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

/// Settles the bundle version (see [`Store::settle_bundle_version`]).
fn settle(conn: &mut Connection, digest: &str) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version = SqliteStore::meta(&tx, "bundle_version")?
        .map(|v| {
            v.parse::<u64>().map_err(|e| StoreError::Corrupt {
                what: "bundle version",
                reason: e.to_string(),
            })
        })
        .transpose()?;
    let stored = SqliteStore::meta(&tx, "bundle_digest")?;
    if let Some(v) = version
        && stored.as_deref() == Some(digest)
    {
        return Ok(v);
    }
    let next = version.unwrap_or(0) + 1;
    let put = "INSERT INTO meta (key, value) VALUES (?1, ?2)
               ON CONFLICT(key) DO UPDATE SET value = excluded.value";
    tx.execute(put, params!["bundle_version", next.to_string()])?;
    tx.execute(put, params!["bundle_digest", digest])?;
    tx.commit()?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_commits_without_fsync_and_leaves_issuances_fully_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let s = SqliteStore::open(&path).expect("open");
        let synchronous = |s: &SqliteStore| -> i64 {
            s.conn()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("pragma")
        };
        assert_eq!(synchronous(&s), 2, "FULL");
        s.put_report(&StoredReport {
            node: "n1".into(),
            report: serde_json::from_value(
                serde_json::json!({"bundleVersion": 1, "identities": []}),
            )
            .expect("report"),
            received_at: 1,
        })
        .expect("report");
        // Back to FULL for whatever comes next: an issuance still waits for its fsync.
        assert_eq!(synchronous(&s), 2, "FULL after a report");
        s.record_issuances(&[Issuance {
            serial: "01".into(),
            spiffe_id: "spiffe://t/w".into(),
            node: "n1".into(),
            not_after: 10,
            issued_at: 1,
            local: false,
        }])
        .expect("issuance");
        drop(s);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.reports().expect("reports").len(), 1);
        assert_eq!(s.issuances().expect("issuances").len(), 1);
    }

    #[test]
    fn the_bundle_version_grows_only_when_the_content_changes_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let s = SqliteStore::open(&path).expect("open");
        assert_eq!(s.settle_bundle_version("a").expect("v"), 1);
        assert_eq!(s.settle_bundle_version("a").expect("v"), 1);
        assert_eq!(s.settle_bundle_version("b").expect("v"), 2);
        drop(s);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.settle_bundle_version("b").expect("v"), 2);
        assert_eq!(s.settle_bundle_version("a").expect("v"), 3);
    }

    #[test]
    fn entries_are_found_by_id_and_by_spiffe_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("db")).expect("open");
        let e: Entry = serde_json::from_value(serde_json::json!({
            "id": "pay", "spiffeId": "spiffe://a.test/pay", "nodes": ["n"], "dir": "pay"
        }))
        .expect("entry");
        s.insert_entry(&e).expect("insert");
        assert_eq!(s.entry("pay").expect("q"), Some(e));
        assert_eq!(s.entry("nope").expect("q"), None);
        assert!(s.registers("spiffe://a.test/pay").expect("q"));
        assert!(!s.registers("spiffe://a.test/pay/x").expect("q"));
        let plan: String = s
            .conn()
            .query_row(
                "EXPLAIN QUERY PLAN SELECT 1 FROM entries WHERE json_extract(body, '$.spiffeId') = 'x'",
                [],
                |r| r.get(3),
            )
            .expect("plan");
        assert!(plan.contains("entries_spiffe_id"), "{plan}");
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meshcert.db");
        std::fs::write(&path, vec![0x42; 8192]).expect("write");
        let err = SqliteStore::open(&path).expect_err("corrupt");
        assert!(err.to_string().contains("meshcert.db"), "{err}");
    }
}
