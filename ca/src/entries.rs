//! Registration entries: those declared in the configuration (read-only) and those created
//! through the admin socket (in the datastore), seen as one list.

use std::sync::Arc;

use meshcert_protocol::Entry;

use crate::config::{Mesh, entry_problems};
use crate::store::{Store, StoreError};

/// Why an entry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The entry is invalid; one message per problem.
    #[error("invalid entry: {}", .0.join("; "))]
    Invalid(Vec<String>),
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
    meshes: Vec<Mesh>,
    store: Arc<dyn Store>,
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
        Self {
            declared,
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

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Result<Option<Entry>, EntryError> {
        if let Some(e) = self.declared.iter().find(|e| e.id == id) {
            return Ok(Some(e.clone()));
        }
        Ok(self.store.entries()?.into_iter().find(|e| e.id == id))
    }

    /// The entries assigned to a node of a mesh.
    pub fn for_node(&self, node: &str, mesh: &str) -> Result<Vec<Entry>, EntryError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|e| e.is_assigned_to(node, mesh))
            .collect())
    }

    /// Validates and stores a new entry.
    pub fn create(&self, entry: &Entry) -> Result<(), EntryError> {
        let problems = entry_problems(entry, &self.meshes);
        if !problems.is_empty() {
            return Err(EntryError::Invalid(problems));
        }
        if self.declared.iter().any(|e| e.id == entry.id) {
            return Err(EntryError::Exists(entry.id.clone()));
        }
        match self.store.insert_entry(entry) {
            Err(StoreError::Exists(_)) => Err(EntryError::Exists(entry.id.clone())),
            other => Ok(other?),
        }
    }

    /// Deletes an admin-created entry.
    pub fn delete(&self, id: &str) -> Result<(), EntryError> {
        if self.declared.iter().any(|e| e.id == id) {
            return Err(EntryError::Declared(id.to_owned()));
        }
        if self.store.delete_entry(id)? {
            Ok(())
        } else {
            Err(EntryError::NotFound(id.to_owned()))
        }
    }
}
