//! Registration entries: those declared in the configuration (read-only) and those created
//! through the admin socket (in the datastore), seen as one list.
//!
//! Entries on the holder never carry hooks: both sources refuse them, and an entry stored by an
//! older holder keeps its hook in the datastore (nothing stored is lost) but is served to
//! nodes without it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meshcert_protocol::{Entry, SpiffeId};

use crate::config::{Mesh, entry_problems};
use crate::store::{Store, StoreError};

/// Why an entry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The entry is invalid; one message per problem.
    #[error("invalid entry: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The SPIFFE ID is a node identity (`/meshcert/node/...`), never a workload's.
    #[error("spiffeId: `{0}` is reserved for node identities")]
    Reserved(String),
    /// The id is taken.
    #[error("an entry with id `{0}` already exists")]
    Exists(String),
    /// No such entry.
    #[error("no entry has the id `{0}`")]
    NotFound(String),
    /// The entry is declared in the configuration file; edit the file instead.
    #[error("entry `{0}` is declared in the configuration file; remove it there")]
    Declared(String),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Config entries plus datastore entries.
pub struct EntryBook {
    declared: Vec<Entry>,
    /// Index of `declared` by entry id.
    by_id: BTreeMap<String, usize>,
    /// The SPIFFE IDs `declared` registers.
    declared_ids: BTreeSet<String>,
    meshes: Vec<Mesh>,
    store: Arc<dyn Store>,
}

/// An entry as nodes receive it: without a hook (see the module documentation).
fn served(mut e: Entry) -> Entry {
    if e.hook.take().is_some() {
        tracing::warn!(entry_id = %e.id, "a stored entry carries a hook; it is served without it (hooks belong in the node's configuration)");
    }
    e
}

impl std::fmt::Debug for EntryBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryBook")
            .field("declared", &self.declared.len())
            .finish_non_exhaustive()
    }
}

impl EntryBook {
    /// A book over the configuration's entries and the datastore.
    pub fn new(declared: Vec<Entry>, meshes: Vec<Mesh>, store: Arc<dyn Store>) -> Self {
        let by_id = declared
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.clone(), i))
            .collect();
        let declared_ids = declared.iter().map(|e| e.spiffe_id.to_string()).collect();
        Self {
            declared,
            by_id,
            declared_ids,
            meshes,
            store,
        }
    }

    /// Every entry: declared ones first, then admin-created ones.
    pub fn all(&self) -> Result<Vec<Entry>, EntryError> {
        let mut out = self.declared.clone();
        out.extend(self.store.entries()?);
        Ok(out)
    }

    /// The entry with this id, as nodes receive it: an index lookup (the configuration's
    /// entries) or a lookup by key (the datastore's), never a scan.
    pub fn get(&self, id: &str) -> Result<Option<Entry>, EntryError> {
        if let Some(&i) = self.by_id.get(id) {
            return Ok(self.declared.get(i).cloned());
        }
        Ok(self.store.entry(id)?.map(served))
    }

    /// Whether any entry (of any node or mesh) registers `spiffe_id`.
    pub fn registers(&self, spiffe_id: &SpiffeId) -> Result<bool, EntryError> {
        let id = spiffe_id.to_string();
        Ok(self.declared_ids.contains(&id) || self.store.registers(&id)?)
    }

    /// The entries assigned to a node of a mesh, as nodes receive them.
    pub fn for_node(&self, node: &str, mesh: &str) -> Result<Vec<Entry>, EntryError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|e| e.is_assigned_to(node, mesh))
            .map(served)
            .collect())
    }

    /// Validates and stores a new entry.
    pub fn create(&self, entry: &Entry) -> Result<(), EntryError> {
        if entry
            .spiffe_id
            .path()
            .starts_with(crate::policy::NODE_ID_PREFIX)
        {
            return Err(EntryError::Reserved(entry.spiffe_id.to_string()));
        }
        let problems = entry_problems(entry, &self.meshes);
        if !problems.is_empty() {
            return Err(EntryError::Invalid(problems));
        }
        if self.by_id.contains_key(&entry.id) {
            return Err(EntryError::Exists(entry.id.clone()));
        }
        match self.store.insert_entry(entry) {
            Err(StoreError::Exists(_)) => Err(EntryError::Exists(entry.id.clone())),
            other => Ok(other?),
        }
    }

    /// Deletes an admin-created entry.
    pub fn delete(&self, id: &str) -> Result<(), EntryError> {
        if self.by_id.contains_key(id) {
            return Err(EntryError::Declared(id.to_owned()));
        }
        if self.store.delete_entry(id)? {
            Ok(())
        } else {
            Err(EntryError::NotFound(id.to_owned()))
        }
    }
}
