//! The PostgreSQL datastore (`holder.datastore: postgres://...`): the one several holder
//! replicas share.
//!
//! The [`Store`] trait is synchronous (the holder's operations are), so this store drives
//! `tokio-postgres` and its `deadpool` pool on a small runtime of its own and the caller waits
//! for the answer; on a multi-threaded runtime the wait is marked blocking (`block_in_place`)
//! so the worker's other tasks move elsewhere. Issuances are the exception: the group commit's
//! own thread records them ([`super::group`]) and the signing call awaits that, so their wait
//! blocks no worker.
//!
//! Concurrency between replicas rests on the database: a token is consumed under `SELECT ... FOR
//! UPDATE`, a node is registered by a conditional upsert, the bundle version and the pruned count
//! are settled under a transaction-scoped advisory lock. Schema migrations run on a connection of
//! their own holding `pg_advisory_lock` (see [`migrate`]), so replicas started together migrate
//! once and never deadlock: a waiting replica holds nothing but its wait for that lock.
//!
//! TLS: `sslmode=require` (or `verify-ca`/`verify-full`) in the URL connects through rustls and
//! verifies the server against `sslrootcert=<PEM file>` (mandatory then); otherwise no TLS.
//!
//! One file past 600 lines on purpose: like `sqlite.rs`, every query of the [`Store`] trait
//! sits beside the schema it reads, so a schema change and the queries it touches are read
//! together.

use std::future::Future;
use std::path::PathBuf;
use std::sync::mpsc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use meshcert_protocol::Entry;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use super::changes::{self, Changes};
use super::{
    Issuance, KubernetesNodeOutcome, NodeRecord, Pruned, Store, StoreError, StoredReport,
    TokenOutcome, TokenRecord,
};

/// The advisory lock key of schema migrations ("meshcert" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x6d65_7368_6365_7274;
/// The advisory lock key of the settled bundle version and the pruned-issuance count.
const META_LOCK: i64 = MIGRATION_LOCK + 1;

/// The schema, one migration per element; `schema_version` records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &["
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    mesh TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    used_at BIGINT
);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    mesh TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    banned BOOLEAN NOT NULL DEFAULT FALSE,
    cluster TEXT
);
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE issuances (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    node TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    local BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE reports (
    node TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE documents (
    name TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    value BYTEA NOT NULL
);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);
CREATE INDEX issuances_not_after ON issuances (not_after);
CREATE INDEX issuances_issued_at ON issuances (issued_at, serial);
CREATE INDEX tokens_expires_at ON tokens (expires_at);
"];

/// PostgreSQL through a pool, driven on the store's own runtime.
pub struct PostgresStore {
    pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
    /// Followed by a listening session of its own (see [`changes::listen`]).
    changes: std::sync::Arc<Changes>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks; from inside another runtime that would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The URL's own options split from the two this module reads itself: `sslrootcert` (which
/// `tokio-postgres` does not know) and a `sslmode` of `verify-ca`/`verify-full` (always what
/// rustls does: it is passed on as `require`).
#[derive(Debug, PartialEq, Eq)]
struct Target {
    url: String,
    tls: bool,
    root_cert: Option<PathBuf>,
}

fn split_url(url: &str) -> Target {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut tls = false;
    let mut root_cert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (key, value) {
            ("sslrootcert", v) => root_cert = Some(PathBuf::from(v)),
            ("sslmode", "require" | "verify-ca" | "verify-full") => {
                tls = true;
                kept.push("sslmode=require".to_owned());
            }
            _ => kept.push(pair.to_owned()),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Target {
        url,
        tls,
        root_cert,
    }
}

/// A URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn tls_config(target: &Target) -> Result<rustls::ClientConfig, String> {
    let path = target.root_cert.as_ref().ok_or(
        "sslmode=require needs sslrootcert=<PEM file> naming the CA of the database's certificate",
    )?;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for block in pem::parse_many(&pem).map_err(|e| format!("{}: {e}", path.display()))? {
        if block.tag() == "CERTIFICATE" {
            roots
                .add(block.into_contents().into())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(
        rustls::crypto::aws_lc_rs::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl PostgresStore {
    /// Connects, runs the migrations this database lacks (once across replicas) and returns
    /// the store. The URL is the `holder.datastore` value.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: PathBuf::from(redact(url)),
            reason,
        };
        let target = split_url(url);
        let config: tokio_postgres::Config = target
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(format!("not a PostgreSQL URL: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshcert-postgres")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("cannot start the datastore's runtime: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = if target.tls {
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                tls_config(&target).map_err(open_err)?,
            ))
        } else {
            None
        };
        let manager = match &tls {
            Some(t) => Manager::from_config(config.clone(), t.clone(), manager_config),
            None => Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config),
        };
        let pool = {
            let _enter = runtime.enter();
            Pool::builder(manager)
                .max_size(16)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(std::time::Duration::from_secs(10)))
                .create_timeout(Some(std::time::Duration::from_secs(10)))
                .build()
                .map_err(|e| open_err(e.to_string()))?
        };
        let mut store = Self {
            pool,
            runtime: Some(runtime),
            changes: std::sync::Arc::new(Changes::new(0)),
        };
        let migration = (config.clone(), tls.clone());
        store
            .block(async move {
                match migration {
                    (config, Some(t)) => migrate(&config, t).await,
                    (config, None) => migrate(&config, tokio_postgres::NoTls).await,
                }
            })
            .map_err(|e| open_err(e.to_string()))?;
        let version = store
            .with(|c| async move {
                match c
                    .query_opt("SELECT value FROM meta WHERE key = $1", &[&changes::KEY])
                    .await?
                {
                    Some(row) => changes::parse(row.get(0)),
                    None => Ok(0),
                }
            })
            .map_err(|e| open_err(e.to_string()))?;
        store.changes = std::sync::Arc::new(Changes::new(version));
        let follow = std::sync::Arc::clone(&store.changes);
        if let Some(rt) = store.runtime.as_ref() {
            match tls {
                Some(t) => rt.spawn(changes::listen(config, t, follow)),
                None => rt.spawn(changes::listen(config, tokio_postgres::NoTls, follow)),
            };
        }
        Ok(store)
    }

    /// [`Self::with`] for a write that may change what nodes sync: `work` answers the new
    /// change version when it grew it (see [`grow_changes`]), and this process follows it at
    /// once, without waiting for its own notification.
    fn changing<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(T, Option<u64>), StoreError>> + Send,
    {
        let (answer, version) = self.with(work)?;
        if let Some(v) = version {
            self.changes.advance(v);
        }
        Ok(answer)
    }

    /// Runs `sql` (one row keyed by `$1`) and grows the change version in the same
    /// transaction; whether the row was there.
    fn change_one(&self, sql: &'static str, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.changing(move |mut c| async move {
            let tx = c.transaction().await?;
            if tx.execute(sql, &[&key]).await? != 1 {
                return Ok((false, None));
            }
            let version = grow_changes(&tx).await?;
            tx.commit().await?;
            Ok((true, Some(version)))
        })
    }

    /// Runs `work` on the store's runtime and waits for its answer.
    fn block<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let Some(rt) = self.runtime.as_ref() else {
            return Err(StoreError::Unavailable("the datastore is closing".into()));
        };
        let (tx, rx) = mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(work.await);
        });
        let wait = move || {
            rx.recv()
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the datastore task ended".into())))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Runs `work` with a pooled connection.
    fn with<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool
                .get()
                .await
                .map_err(|e| StoreError::Unavailable(format!("no database connection: {e}")))?;
            work(client).await
        })
    }
}

/// Brings the schema up to date, in a session of its own that holds `pg_advisory_lock` for the
/// whole migration: replicas starting together queue on that lock; the first migrates, the
/// others then find nothing to do. A waiter holds no other lock, so there is no deadlock (a
/// migration waiting on a table a waiting replica had locked is how SPIRE deadlocked).
async fn migrate<T>(config: &tokio_postgres::Config, tls: T) -> Result<u32, StoreError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send,
    T::Stream: Send + 'static,
{
    let (mut client, connection) = config.connect(tls).await?;
    let driver = tokio::spawn(connection);
    let outcome = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await?;
        let tx = client.transaction().await?;
        let current: i32 = match tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await?
        {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        let mut ran = 0;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(current).unwrap_or(0))
        {
            tx.batch_execute(sql).await?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute("UPDATE schema_version SET version = $1", &[&version])
                .await?;
            ran += 1;
        }
        tx.commit().await?;
        Ok::<u32, StoreError>(ran)
    }
    .await;
    // Ending the session releases the lock whatever happened.
    drop(client);
    let _ = driver.await;
    let ran = outcome?;
    if ran > 0 {
        tracing::info!(migrations = ran, "datastore schema migrated");
    }
    Ok(ran)
}

/// How many migrations a database has run (tests: replicas started together migrate once).
pub fn schema_version(store: &PostgresStore) -> Result<i32, StoreError> {
    store.with(|c| async move {
        Ok(c.query_one("SELECT version FROM schema_version", &[])
            .await?
            .get(0))
    })
}

fn node_row(r: &Row) -> NodeRecord {
    NodeRecord {
        name: r.get(0),
        mesh: r.get(1),
        spiffe_id: r.get(2),
        first_seen: to_u64(r.get(3)),
        banned: r.get(4),
        cluster: r.get(5),
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

/// Whether a PostgreSQL failure may succeed when tried again: the connection was lost, the
/// server is shutting down or starting, or the transaction lost a serialization race.
pub fn is_retryable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let class = code.code().get(..2).unwrap_or("");
            class == "08"
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
        }
    }
}

/// Grows the change version inside `tx` and notifies every listening replica (delivered at
/// commit, so only committed changes are announced); the new version.
async fn grow_changes(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let version: String = tx
        .query_one(
            "INSERT INTO meta (key, value) VALUES ($1, '1')
             ON CONFLICT (key) DO UPDATE SET value = (meta.value::BIGINT + 1)::TEXT
             RETURNING value",
            &[&changes::KEY],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, $2)", &[&changes::CHANNEL, &version])
        .await?;
    changes::parse(&version)
}

const NODE_COLUMNS: &str = "name, mesh, spiffe_id, first_seen, banned, cluster";

impl Store for PostgresStore {
    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |c| async move {
            c.execute(
                "INSERT INTO tokens (hash, node, mesh, expires_at) VALUES ($1, $2, $3, $4)",
                &[&t.hash, &t.node, &t.mesh, &to_i64(t.expires_at)],
            )
            .await?;
            Ok(())
        })
    }

    fn consume_token(
        &self,
        hash: &str,
        now: u64,
        node_id: &dyn Fn(&str, &str) -> String,
    ) -> Result<TokenOutcome, StoreError> {
        let hash = hash.to_owned();
        // Read the token first (the node ID depends on it), then consume it under a row lock.
        let read_hash = hash.clone();
        let row: Option<(String, String)> = self.with(move |c| async move {
            Ok(c.query_opt(
                "SELECT node, mesh FROM tokens WHERE hash = $1",
                &[&read_hash],
            )
            .await?
            .map(|r| (r.get(0), r.get(1))))
        })?;
        let Some((node, mesh)) = row else {
            return Ok(TokenOutcome::Unknown);
        };
        let spiffe_id = node_id(&node, &mesh);
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let Some(r) = tx
                .query_opt(
                    "SELECT node, mesh, expires_at, used FROM tokens WHERE hash = $1 FOR UPDATE",
                    &[&hash],
                )
                .await?
            else {
                return Ok(TokenOutcome::Unknown);
            };
            let (node, mesh, expires_at, used): (String, String, i64, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if used {
                return Ok(TokenOutcome::Used);
            }
            if to_u64(expires_at) <= now {
                return Ok(TokenOutcome::Expired);
            }
            tx.execute(
                "UPDATE tokens SET used = TRUE, used_at = $2 WHERE hash = $1",
                &[&hash, &to_i64(now)],
            )
            .await?;
            tx.execute(
                "INSERT INTO nodes (name, mesh, spiffe_id, first_seen) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET mesh = excluded.mesh, spiffe_id = excluded.spiffe_id",
                &[&node, &mesh, &spiffe_id, &to_i64(now)],
            )
            .await?;
            tx.commit().await?;
            Ok(TokenOutcome::Consumed { node, mesh })
        })
    }

    fn attest_kubernetes_node(
        &self,
        node: &NodeRecord,
    ) -> Result<KubernetesNodeOutcome, StoreError> {
        let n = node.clone();
        self.with(move |c| async move {
            // One statement: registers the node unless its name is banned or belongs to a node
            // of another cluster or mesh; a concurrent replica cannot slip in between.
            let changed = c
                .execute(
                    "INSERT INTO nodes (name, mesh, spiffe_id, first_seen, cluster)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET spiffe_id = excluded.spiffe_id
                     WHERE NOT nodes.banned AND nodes.mesh = excluded.mesh
                       AND nodes.cluster IS NOT DISTINCT FROM excluded.cluster",
                    &[
                        &n.name,
                        &n.mesh,
                        &n.spiffe_id,
                        &to_i64(n.first_seen),
                        &n.cluster,
                    ],
                )
                .await?;
            if changed == 1 {
                return Ok(KubernetesNodeOutcome::Registered);
            }
            let r = c
                .query_one(
                    "SELECT banned, cluster, mesh FROM nodes WHERE name = $1",
                    &[&n.name],
                )
                .await?;
            if r.get::<_, bool>(0) {
                return Ok(KubernetesNodeOutcome::Banned);
            }
            Ok(KubernetesNodeOutcome::Taken {
                cluster: r.get(1),
                mesh: r.get(2),
            })
        })
    }

    fn token_used(&self, hash: &str) -> Result<Option<bool>, StoreError> {
        let hash = hash.to_owned();
        self.with(move |c| async move {
            Ok(
                c.query_opt("SELECT used FROM tokens WHERE hash = $1", &[&hash])
                    .await?
                    .map(|r| r.get(0)),
            )
        })
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let name = name.to_owned();
        // Read for every call on the API: prepared once per pooled connection.
        self.with(move |c| async move {
            let stmt = c
                .prepare_cached("SELECT name, mesh, spiffe_id, first_seen, banned, cluster FROM nodes WHERE name = $1")
                .await?;
            Ok(c.query_opt(&stmt, &[&name]).await?.as_ref().map(node_row))
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.with(move |c| async move {
            let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name");
            Ok(c.query(&sql, &[]).await?.iter().map(node_row).collect())
        })
    }

    fn ban_node(&self, name: &str) -> Result<bool, StoreError> {
        self.change_one("UPDATE nodes SET banned = TRUE WHERE name = $1", name)
    }

    fn insert_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let body = encode("entry", entry)?;
        let (id, spiffe_id) = (entry.id.clone(), entry.spiffe_id.to_string());
        self.changing(move |mut c| async move {
            let tx = c.transaction().await?;
            let changed = tx
                .execute(
                    "INSERT INTO entries (id, spiffe_id, body) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO NOTHING",
                    &[&id, &spiffe_id, &body],
                )
                .await?;
            if changed == 0 {
                return Err(StoreError::Exists(format!("entry `{id}`")));
            }
            let version = grow_changes(&tx).await?;
            tx.commit().await?;
            Ok(((), Some(version)))
        })
    }

    fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        self.change_one("DELETE FROM entries WHERE id = $1", id)
    }

    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.with(move |c| async move {
            c.query("SELECT body FROM entries ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| decode("entry", r.get(0)))
                .collect()
        })
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| async move {
            let stmt = c
                .prepare_cached("SELECT body FROM entries WHERE id = $1")
                .await?;
            c.query_opt(&stmt, &[&id])
                .await?
                .map(|r| decode("entry", r.get(0)))
                .transpose()
        })
    }

    fn registers(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        let spiffe_id = spiffe_id.to_owned();
        self.with(move |c| async move {
            Ok(c.query_opt(
                "SELECT 1 FROM entries WHERE spiffe_id = $1 LIMIT 1",
                &[&spiffe_id],
            )
            .await?
            .is_some())
        })
    }

    fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError> {
        let issued = issued.to_vec();
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO issuances (serial, spiffe_id, node, not_after, issued_at, local)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .await?;
            for i in &issued {
                tx.execute(
                    &stmt,
                    &[
                        &i.serial,
                        &i.spiffe_id,
                        &i.node,
                        &to_i64(i.not_after),
                        &to_i64(i.issued_at),
                        &i.local,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn issuances(&self) -> Result<Vec<Issuance>, StoreError> {
        self.with(move |c| async move {
            let rows = c
                .query(
                    "SELECT serial, spiffe_id, node, not_after, issued_at, local FROM issuances
                     ORDER BY issued_at, serial",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Issuance {
                    serial: r.get(0),
                    spiffe_id: r.get(1),
                    node: r.get(2),
                    not_after: to_u64(r.get(3)),
                    issued_at: to_u64(r.get(4)),
                    local: r.get(5),
                })
                .collect())
        })
    }

    fn issuance_count(&self) -> Result<u64, StoreError> {
        self.with(move |c| async move {
            let n: i64 = c
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM issuances)
                      + COALESCE((SELECT value::BIGINT FROM meta WHERE key = 'issuances_pruned'), 0)",
                    &[],
                )
                .await?
                .get(0);
            Ok(to_u64(n))
        })
    }

    fn prune(&self, before: u64) -> Result<Pruned, StoreError> {
        let before = to_i64(before);
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let issuances = tx
                .execute("DELETE FROM issuances WHERE not_after < $1", &[&before])
                .await?;
            let tokens = tx
                .execute("DELETE FROM tokens WHERE expires_at < $1", &[&before])
                .await?;
            if issuances > 0 {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('issuances_pruned', $1)
                     ON CONFLICT (key) DO UPDATE
                     SET value = (meta.value::BIGINT + excluded.value::BIGINT)::TEXT",
                    &[&issuances.to_string()],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(Pruned { issuances, tokens })
        })
    }

    fn put_report(&self, r: &StoredReport) -> Result<(), StoreError> {
        let body = encode("report", &r.report)?;
        let (node, at) = (r.node.clone(), to_i64(r.received_at));
        // A report is status, rewritten every heartbeat: its commit does not wait for the WAL
        // flush (`synchronous_commit = off` for this transaction only). A database crash may
        // lose the last fraction of a second of reports; issuances and token uses commit
        // synchronously, and flush any report before them.
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await?;
            tx.execute(
                "INSERT INTO reports (node, body, received_at) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET body = excluded.body, received_at = excluded.received_at",
                &[&node, &body, &at],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        self.with(move |c| async move {
            c.query(
                "SELECT node, body, received_at FROM reports ORDER BY node",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(StoredReport {
                    node: r.get(0),
                    report: decode("report", r.get(1))?,
                    received_at: to_u64(r.get(2)),
                })
            })
            .collect()
        })
    }

    fn settle_bundle_version(&self, digest: &str) -> Result<u64, StoreError> {
        let digest = digest.to_owned();
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&META_LOCK])
                .await?;
            let get = "SELECT value FROM meta WHERE key = $1";
            let version =
                match tx.query_opt(get, &[&"bundle_version"]).await? {
                    Some(r) => Some(r.get::<_, String>(0).parse::<u64>().map_err(|e| {
                        StoreError::Corrupt {
                            what: "bundle version",
                            reason: e.to_string(),
                        }
                    })?),
                    None => None,
                };
            let stored: Option<String> = tx
                .query_opt(get, &[&"bundle_digest"])
                .await?
                .map(|r| r.get(0));
            if let Some(v) = version
                && stored.as_deref() == Some(digest.as_str())
            {
                return Ok(v);
            }
            let next = version.unwrap_or(0) + 1;
            let put = "INSERT INTO meta (key, value) VALUES ($1, $2)
                       ON CONFLICT (key) DO UPDATE SET value = excluded.value";
            tx.execute(put, &[&"bundle_version", &next.to_string()])
                .await?;
            tx.execute(put, &[&"bundle_digest", &digest]).await?;
            tx.commit().await?;
            Ok(next)
        })
    }

    fn load_document(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let name = name.to_owned();
        self.with(move |c| async move {
            Ok(c.query_opt(
                "SELECT revision, value FROM documents WHERE name = $1",
                &[&name],
            )
            .await?
            .map(|r| (to_u64(r.get(0)), r.get(1))))
        })
    }

    fn store_document(
        &self,
        name: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.changing(move |mut c| async move {
            let tx = c.transaction().await?;
            let row = if expected == 0 {
                tx.query_opt(
                    "INSERT INTO documents (name, revision, value) VALUES ($1, 1, $2)
                     ON CONFLICT (name) DO NOTHING RETURNING revision",
                    &[&name, &value],
                )
                .await?
            } else {
                tx.query_opt(
                    "UPDATE documents SET revision = revision + 1, value = $3
                     WHERE name = $1 AND revision = $2 RETURNING revision",
                    &[&name, &to_i64(expected), &value],
                )
                .await?
            };
            let Some(revision) = row.map(|r| to_u64(r.get(0))) else {
                return Ok((None, None));
            };
            let version = grow_changes(&tx).await?;
            tx.commit().await?;
            Ok((Some(revision), Some(version)))
        })
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_keeps_its_options_and_gives_up_the_ones_rustls_reads() {
        assert_eq!(
            split_url(
                "postgres://u@db/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a"
            ),
            Target {
                url: "postgres://u@db/x?sslmode=require&application_name=a".into(),
                tls: true,
                root_cert: Some("/ca.pem".into()),
            }
        );
        assert_eq!(
            split_url("postgres://u@db/x"),
            Target {
                url: "postgres://u@db/x".into(),
                tls: false,
                root_cert: None
            }
        );
        assert_eq!(redact("postgres://u:secret@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
    }

    #[test]
    fn tls_without_a_root_certificate_is_refused_naming_the_option() {
        let err = PostgresStore::open("postgres://u@127.0.0.1:1/x?sslmode=require")
            .expect_err("no sslrootcert");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }
}
