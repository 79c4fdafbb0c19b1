//! The holder's datastore: join tokens, nodes, admin-created entries, issuances and the latest
//! report of each node, behind the [`Store`] trait: SQLite ([`sqlite`], the embedded default)
//! or PostgreSQL ([`postgres`], shared by several holder replicas).
//!
//! Every write is committed before the caller answers, so whatever the holder acknowledged
//! survives a kill -9.

use meshcert_protocol::{Entry, NodeReport};

pub mod changes;
pub mod group;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;
#[cfg(test)]
pub(crate) mod throwaway_pg;

pub use group::Committing;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Why the datastore failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be opened or is not a meshcert database.
    #[error("cannot open the datastore {path}: {reason}")]
    Open {
        /// The database file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A query failed.
    #[error("datastore query failed: {0}")]
    Query(#[from] rusqlite::Error),
    /// A stored value cannot be decoded.
    #[error("datastore holds an unreadable {what}: {reason}")]
    Corrupt {
        /// The kind of record.
        what: &'static str,
        /// Why it cannot be read.
        reason: String,
    },
    /// The record already exists.
    #[error("{0} already exists")]
    Exists(String),
    /// A PostgreSQL query failed.
    #[error("datastore query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The datastore cannot be reached now (no connection in time, the pool is closing).
    #[error("the datastore is unavailable: {0}")]
    Unavailable(String),
    /// The group commit this write joined failed (see [`group`]).
    #[error("the group commit failed: {reason}")]
    GroupFailed {
        /// Why the commit failed.
        reason: String,
        /// Whether that failure was retryable.
        retryable: bool,
    },
}

impl StoreError {
    /// Whether the same call may succeed when tried again: the database connection was lost,
    /// the server is restarting, a transaction lost a serialization race, or the database was
    /// busy. The holder answers these with the retryable `UNAVAILABLE` code.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Postgres(e) => postgres::is_retryable(e),
            Self::Unavailable(_) => true,
            Self::GroupFailed { retryable, .. } => *retryable,
            Self::Query(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            Self::Open { .. } | Self::Query(_) | Self::Corrupt { .. } | Self::Exists(_) => false,
        }
    }
}

/// The environment variable that turns group commit off (`off`): for benchmarks that measure
/// it against one commit per write, in the same run.
pub const GROUP_COMMIT_ENV: &str = "MESHCERT_CA_GROUP_COMMIT";

/// Opens the configured datastore (issuance writes group-committed, see [`group`]).
pub fn open(
    datastore: &crate::config::Datastore,
    state_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    use crate::config::Datastore;
    use group::GroupCommit;
    if std::env::var(GROUP_COMMIT_ENV).is_ok_and(|v| v == "off") {
        tracing::warn!("group commit is off ({GROUP_COMMIT_ENV}=off): one commit per write");
        return Ok(match datastore {
            Datastore::Sqlite(path) => std::sync::Arc::new(SqliteStore::open(
                &path
                    .clone()
                    .unwrap_or_else(|| state_dir.join("meshcert.db")),
            )?),
            Datastore::Postgres(url) => std::sync::Arc::new(PostgresStore::open(url)?),
        });
    }
    Ok(match datastore {
        Datastore::Sqlite(Some(path)) => {
            std::sync::Arc::new(GroupCommit::new(SqliteStore::open(path)?)?)
        }
        Datastore::Sqlite(None) => std::sync::Arc::new(GroupCommit::new(SqliteStore::open(
            &state_dir.join("meshcert.db"),
        )?)?),
        Datastore::Postgres(url) => {
            std::sync::Arc::new(GroupCommit::new(PostgresStore::open(url)?)?)
        }
    })
}

/// A join token as stored (the token itself is kept only as a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// The node name it binds.
    pub node: String,
    /// The mesh it binds.
    pub mesh: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
}

/// What consuming a token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// Consumed now; the node is registered.
    Consumed {
        /// Node name.
        node: String,
        /// Its mesh.
        mesh: String,
    },
    /// Already used.
    Used,
    /// Expired.
    Expired,
    /// No such token.
    Unknown,
}

/// A node as the holder knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Its mesh.
    pub mesh: String,
    /// Its node SPIFFE ID.
    pub spiffe_id: String,
    /// First attestation, Unix seconds.
    pub first_seen: u64,
    /// Banned: every later call fails.
    pub banned: bool,
    /// The Kubernetes cluster of a node attested with a service-account token; `None` for a
    /// node that joined with a join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// The result of registering a node attested through Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubernetesNodeOutcome {
    /// Registered (or registered again): the node may get its SVID.
    Registered,
    /// The node is banned.
    Banned,
    /// A node of this name exists in another cluster or mesh (or joined with a join token).
    Taken {
        /// Its cluster, `None` for a join-token node.
        cluster: Option<String>,
        /// Its mesh.
        mesh: String,
    },
}

/// One signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issuance {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The identity.
    pub spiffe_id: String,
    /// The node it was issued to.
    pub node: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// Issue time, Unix seconds.
    pub issued_at: u64,
    /// Signed for an agent-local entry (DISABLED enforcement), not a holder entry.
    #[serde(default)]
    pub local: bool,
}

/// What one pruning removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Issuances deleted.
    pub issuances: u64,
    /// Join tokens deleted.
    pub tokens: u64,
}

/// A node's latest report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    /// The node.
    pub node: String,
    /// What it reported.
    pub report: NodeReport,
    /// When, Unix seconds.
    pub received_at: u64,
}

/// The datastore seam.
pub trait Store: Send + Sync {
    /// Stores a new join token.
    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Consumes a token atomically and, in the same transaction, registers its node
    /// (`node_id(node, mesh)` gives the node's SPIFFE ID).
    fn consume_token(
        &self,
        hash: &str,
        now: u64,
        node_id: &dyn Fn(&str, &str) -> String,
    ) -> Result<TokenOutcome, StoreError>;
    /// Registers (again) a node attested through Kubernetes, in one transaction: refused when
    /// it is banned or when its name belongs to a node of another cluster or mesh.
    fn attest_kubernetes_node(
        &self,
        node: &NodeRecord,
    ) -> Result<KubernetesNodeOutcome, StoreError>;
    /// Whether a token (by hash) has been used; `None` when unknown.
    fn token_used(&self, hash: &str) -> Result<Option<bool>, StoreError>;
    /// A node by name.
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node, by name.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Bans a node; false when unknown.
    fn ban_node(&self, name: &str) -> Result<bool, StoreError>;
    /// Adds an admin-created entry; [`StoreError::Exists`] when the id is taken.
    fn insert_entry(&self, entry: &Entry) -> Result<(), StoreError>;
    /// Deletes an admin-created entry; false when unknown.
    fn delete_entry(&self, id: &str) -> Result<bool, StoreError>;
    /// Every admin-created entry.
    fn entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// The admin-created entry with this id (a lookup by key, not a scan).
    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;
    /// Whether an admin-created entry registers this SPIFFE ID (an indexed lookup).
    fn registers(&self, spiffe_id: &str) -> Result<bool, StoreError>;
    /// Records issuances, all in one transaction.
    fn record_issuances(&self, issued: &[Issuance]) -> Result<(), StoreError>;
    /// Every issuance, oldest first.
    fn issuances(&self) -> Result<Vec<Issuance>, StoreError>;
    /// How many certificates were issued, pruned ones included.
    fn issuance_count(&self) -> Result<u64, StoreError>;
    /// Deletes, in one transaction, the issuances that expired before `before` and the join
    /// tokens that expired before it (used or not); the pruned issuances stay counted by
    /// [`Store::issuance_count`].
    fn prune(&self, before: u64) -> Result<Pruned, StoreError>;
    /// Replaces a node's latest report.
    fn put_report(&self, report: &StoredReport) -> Result<(), StoreError>;
    /// Every node's latest report.
    fn reports(&self) -> Result<Vec<StoredReport>, StoreError>;
    /// The bundle version for bundles whose content has this digest, in one transaction: the
    /// stored version when the digest is the stored one, else the stored version plus one
    /// (1 the first time), persisted with the new digest.
    fn settle_bundle_version(&self, digest: &str) -> Result<u64, StoreError>;
    /// A named, versioned document every replica shares (root rotation state, encrypted builtin root).
    fn load_document(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Writes `value` if the stored revision is still `expected` (0: absent); returns the new
    /// revision, or None when another writer got there first.
    fn store_document(
        &self,
        name: &str,
        expected: u64,
        value: &[u8],
    ) -> Result<Option<u64>, StoreError>;
    /// The change version as this process last saw it, to wait on ([`changes`]): it grows in
    /// the same transaction as every write that changes what nodes sync (an entry created or
    /// deleted, a node banned, a document written), and every process on the datastore sees
    /// it move.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Records issuances like [`Store::record_issuances`], for a caller that awaits the commit
    /// instead of blocking its thread: the answer resolves once they are committed. By default
    /// they are committed at once, on the caller's thread; a group commit ([`group`]) queues
    /// them for its committer.
    fn submit_issuances(&self, issued: Vec<Issuance>) -> Committing {
        Committing::done(self.record_issuances(&issued))
    }
}
