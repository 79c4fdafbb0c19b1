//! Where the JWT-SVID signing keys live (their life is [`super::plan`]'s):
//!
//! - **One holder (SQLite)**: `<stateDir>/jwt/<trust domain>.json`, mode 0600 from creation,
//!   replaced atomically. Nothing is shared, so the state folder guards these keys as it guards
//!   the builtin root's key.
//! - **Replicas (PostgreSQL)**: one datastore document per trust domain,
//!   `jwt-keys/<trust domain>`, sealed with the key-encryption key ([`Kek`], the document name
//!   as associated data) and written with compare-and-swap on its revision. Replicas racing to
//!   add the next key store exactly one (the losers read the winner's), so every replica signs
//!   with the same active key and serves the same JWKS; the database never holds a key in
//!   clear. Keys a replica kept in files before (a holder moved from SQLite, or replicas that
//!   each had their own) are merged into the document once, at start, and their file removed:
//!   tokens they signed keep verifying until they expire.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshcert_protocol::TrustDomain;
use zeroize::Zeroizing;

use super::{JwtError, StoredKey};
use crate::sealed::Kek;
use crate::store::Store;

/// Compare-and-swap attempts before giving up (each loss means another replica just wrote).
pub(super) const ATTEMPTS: usize = 5;

/// The key store: files, or sealed datastore documents.
pub(super) enum Vault {
    /// `<stateDir>/jwt/` (one holder).
    Files {
        /// The folder.
        dir: PathBuf,
    },
    /// Sealed documents shared by every replica.
    Sealed {
        /// The shared datastore.
        store: Arc<dyn Store>,
        /// The key-encryption key.
        kek: Kek,
    },
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files { dir } => f.debug_struct("Files").field("dir", dir).finish(),
            Self::Sealed { .. } => f.write_str("Sealed(..)"),
        }
    }
}

/// One trust domain's keys (oldest activation first) and the revision they were read at
/// (0: none stored yet; always 0 for files).
pub(super) struct Read {
    /// The keys.
    pub keys: Vec<StoredKey>,
    /// The document revision.
    pub revision: u64,
}

/// The document holding `td`'s keys.
fn document(td: &TrustDomain) -> String {
    format!("jwt-keys/{td}")
}

impl Vault {
    /// Whether other replicas may change the keys (so a cached copy grows stale).
    pub(super) fn is_shared(&self) -> bool {
        matches!(self, Self::Sealed { .. })
    }

    /// Reads `td`'s keys.
    pub(super) fn read(&self, td: &TrustDomain) -> Result<Read, JwtError> {
        match self {
            Self::Files { dir } => Ok(Read {
                keys: load_file(&dir.join(format!("{td}.json")))?,
                revision: 0,
            }),
            Self::Sealed { store, kek } => {
                let name = document(td);
                let Some((revision, sealed)) = store.load_document(&name)? else {
                    return Ok(Read {
                        keys: Vec::new(),
                        revision: 0,
                    });
                };
                let plain = kek.open(&name, &sealed)?;
                let keys = serde_json::from_slice(&plain).map_err(|e| JwtError::Damaged {
                    path: PathBuf::from(name),
                    reason: e.to_string(),
                })?;
                Ok(Read { keys, revision })
            }
        }
    }

    /// Writes `td`'s keys over `revision`: the new revision, or `None` when another replica
    /// wrote first (read again and decide again).
    pub(super) fn write(
        &self,
        td: &TrustDomain,
        revision: u64,
        keys: &[StoredKey],
    ) -> Result<Option<u64>, JwtError> {
        match self {
            Self::Files { dir } => {
                save_file(dir, &dir.join(format!("{td}.json")), keys)?;
                Ok(Some(0))
            }
            Self::Sealed { store, kek } => {
                let name = document(td);
                let plain =
                    Zeroizing::new(serde_json::to_vec(keys).map_err(|e| JwtError::Damaged {
                        path: PathBuf::from(&name),
                        reason: e.to_string(),
                    })?);
                let sealed = kek.seal(&name, &plain)?;
                Ok(store.store_document(&name, revision, &sealed)?)
            }
        }
    }

    /// Merges every key file of `legacy_dir` into the documents, then removes the file (see
    /// the module doc). Keys already in a document are not added twice.
    pub(super) fn migrate(&self, legacy_dir: &Path) -> Result<(), JwtError> {
        let io = |source| JwtError::Io {
            path: legacy_dir.to_owned(),
            source,
        };
        let listing = match std::fs::read_dir(legacy_dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        for file in listing {
            let path = file.map_err(io)?.path();
            let td = path
                .extension()
                .filter(|e| *e == "json")
                .and_then(|_| path.file_stem()?.to_str())
                .and_then(|s| TrustDomain::new(s).ok());
            let Some(td) = td else { continue };
            let legacy = load_file(&path)?;
            let added = self.merge(&td, legacy)?;
            std::fs::remove_file(&path).map_err(|source| JwtError::Io {
                path: path.clone(),
                source,
            })?;
            tracing::info!(trust_domain = %td, path = %path.display(), added, "JWT signing keys moved into the shared datastore");
        }
        Ok(())
    }

    /// Adds the keys of `legacy` the document lacks; how many were added.
    fn merge(&self, td: &TrustDomain, legacy: Vec<StoredKey>) -> Result<usize, JwtError> {
        for _ in 0..ATTEMPTS {
            let Read { mut keys, revision } = self.read(td)?;
            let missing: Vec<StoredKey> = legacy
                .iter()
                .filter(|k| !keys.iter().any(|s| s.kid == k.kid))
                .cloned()
                .collect();
            let added = missing.len();
            if added == 0 {
                return Ok(0);
            }
            keys.extend(missing);
            keys.sort_by_key(|k| k.activates_at);
            if self.write(td, revision, &keys)?.is_some() {
                return Ok(added);
            }
        }
        Err(JwtError::Contended {
            trust_domain: td.to_string(),
        })
    }
}

fn load_file(path: &Path) -> Result<Vec<StoredKey>, JwtError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            serde_json::from_slice(&bytes).map_err(|e| JwtError::Damaged {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(JwtError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the keys with mode 0600 from creation, then renames over `path`.
fn save_file(dir: &Path, path: &Path, keys: &[StoredKey]) -> Result<(), JwtError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| JwtError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let text = Zeroizing::new(serde_json::to_vec(keys).map_err(|e| JwtError::Damaged {
        path: path.to_owned(),
        reason: e.to_string(),
    })?);
    meshcert_daemon::fs::write_atomic(path, &text, 0o600).map_err(io(path))
}
