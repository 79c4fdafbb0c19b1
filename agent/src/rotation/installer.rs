//! The seam through which the executor writes SVIDs: an entry folder per entry, replaced
//! atomically. The shared volume ([`Volume`]) implements it; tests use a recording one.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::volume::{Contents, OnDisk, Volume, VolumeError};

/// Writes, checks and removes entry folders.
pub trait Installer: Send + Sync + 'static {
    /// Writes `contents` into `dir`, replacing what was there atomically.
    fn install(
        &self,
        dir: &str,
        contents: &Contents<'_>,
        now: SystemTime,
    ) -> Result<(), VolumeError>;
    /// Whether `dir` holds exactly `contents`.
    fn matches(&self, dir: &str, contents: &Contents<'_>) -> bool;
    /// What `dir` holds, if anything the agent wrote.
    fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError>;
    /// Removes `dir`.
    fn remove(&self, dir: &str) -> Result<(), VolumeError>;
    /// Marks `dir`'s SVID expired at `not_after`.
    fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError>;
    /// Removes `dir`'s expired mark.
    fn clear_expired(&self, dir: &str) -> Result<(), VolumeError>;
    /// The path of `dir` (a hook runs there).
    fn entry_path(&self, dir: &str) -> PathBuf;
}

/// Runs a blocking volume call: off the async worker's duties on a multi-threaded runtime
/// (the volume's own worker thread bounds it with a timeout).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Installer for Volume {
    fn install(
        &self,
        dir: &str,
        contents: &Contents<'_>,
        now: SystemTime,
    ) -> Result<(), VolumeError> {
        blocking(|| Volume::install(self, dir, contents, now))
    }

    fn matches(&self, dir: &str, contents: &Contents<'_>) -> bool {
        Volume::matches(self, dir, contents)
    }

    fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError> {
        Volume::load(self, dir)
    }

    fn remove(&self, dir: &str) -> Result<(), VolumeError> {
        Volume::remove(self, dir)
    }

    fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError> {
        Volume::mark_expired(self, dir, not_after)
    }

    fn clear_expired(&self, dir: &str) -> Result<(), VolumeError> {
        Volume::clear_expired(self, dir)
    }

    fn entry_path(&self, dir: &str) -> PathBuf {
        Volume::entry_path(self, dir)
    }
}
