//! The configuration-file watcher: inotify on the file's folder (editors replace the file, and
//! a Kubernetes ConfigMap volume swaps its `..data` symlink rather than writing the file), with
//! events debounced and a change reported only when the file's content digest differs from the
//! content last seen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::mpsc;

/// Quiet time after the last event before the file is read: editors and the kubelet write in
/// several steps.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches one configuration file; [`ConfigWatcher::changed`] resolves when its content changed.
pub struct ConfigWatcher {
    path: PathBuf,
    events: mpsc::UnboundedReceiver<()>,
    /// `None` when the folder cannot be watched: [`ConfigWatcher::changed`] then never resolves
    /// (SIGHUP still reloads).
    watcher: Option<notify::RecommendedWatcher>,
    last: Option<Vec<u8>>,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.path)
            .field("watching", &self.watcher.is_some())
            .finish_non_exhaustive()
    }
}

impl ConfigWatcher {
    /// Starts watching `path`'s folder and records the file's current content as seen. When the
    /// folder cannot be watched, a warning says so and only SIGHUP reloads.
    pub fn start(path: &Path) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = watch_folder(path, tx);
        Self {
            path: path.to_owned(),
            events,
            watcher,
            last: digest(path),
        }
    }

    /// Whether the folder is being watched.
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Resolves once the file can be read and its content differs from the content last seen
    /// (which it then becomes). Cancel-safe: events stay queued.
    pub async fn changed(&mut self) {
        if self.watcher.is_none() {
            return std::future::pending().await;
        }
        loop {
            if self.events.recv().await.is_none() {
                return std::future::pending().await;
            }
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, self.events.recv()).await {}
            let now = digest(&self.path);
            if now.is_some() && now != self.last {
                self.last = now;
                return;
            }
        }
    }

    /// Records the file's current content as seen (after a reload asked for otherwise, such as
    /// SIGHUP), so the same content does not reload twice.
    pub fn seen(&mut self) {
        self.last = digest(&self.path);
    }
}

/// Watches `path`'s folder, non-recursively; sends a unit per event on the file itself or on a
/// `..`-prefixed name (a ConfigMap's `..data` symlink and its timestamped folders).
fn watch_folder(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let Some(name) = path.file_name().map(ToOwned::to_owned) else {
        tracing::warn!(path = %path.display(), "the configuration path names no file; reload with SIGHUP");
        return None;
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == name.as_os_str() || n.to_string_lossy().starts_with(".."))
        });
        if relevant {
            let _ = tx.send(());
        }
    };
    let mut watcher = notify::recommended_watcher(handler)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the configuration file; reload with SIGHUP"))
        .ok()?;
    watcher
        .watch(&folder, notify::RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(folder = %folder.display(), error = %e, "cannot watch the configuration folder; reload with SIGHUP"))
        .ok()?;
    Some(watcher)
}

/// SHA-256 of the file's content, or `None` when it cannot be read.
fn digest(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok().map(|b| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &b)
            .as_ref()
            .to_vec()
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Long enough for any inotify delivery on a loaded machine; the tests finish at the event.
    const DEADLINE: Duration = Duration::from_secs(20);

    async fn changed_within(watcher: &mut ConfigWatcher, within: Duration) -> bool {
        tokio::time::timeout(within, watcher.changed())
            .await
            .is_ok()
    }

    /// A ConfigMap volume as the kubelet lays it out: `config.yaml -> ..data/config.yaml`,
    /// `..data -> ..<timestamp>`.
    fn configmap(dir: &Path, version: &str, content: &str) {
        let data = dir.join(format!("..{version}"));
        std::fs::create_dir(&data).expect("data folder");
        std::fs::write(data.join("config.yaml"), content).expect("write");
        let tmp = dir.join("..data_tmp");
        symlink(format!("..{version}"), &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    }

    #[tokio::test]
    async fn sees_a_configmap_data_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        configmap(dir.path(), "v1", "a: 1\n");
        symlink("..data/config.yaml", dir.path().join("config.yaml")).expect("symlink");
        let path = dir.path().join("config.yaml");
        let mut watcher = ConfigWatcher::start(&path);
        assert!(watcher.is_watching());
        configmap(dir.path(), "v2", "a: 2\n");
        assert!(
            changed_within(&mut watcher, DEADLINE).await,
            "the ..data swap was not seen"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "a: 2\n");
    }

    #[tokio::test]
    async fn sees_a_replaced_file_and_ignores_a_rewrite_of_the_same_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let mut watcher = ConfigWatcher::start(&path);
        // The same content, written again: no change.
        std::fs::write(&path, "a: 1\n").expect("rewrite");
        // Then a new content, by replacing the file as editors do.
        let tmp = dir.path().join("ca.yaml.swp");
        std::fs::write(&tmp, "a: 2\n").expect("write");
        std::fs::rename(&tmp, &path).expect("replace");
        assert!(
            changed_within(&mut watcher, DEADLINE).await,
            "the replaced file was not seen"
        );
        // The rewrite with the same content was folded into the new content's digest: the
        // watcher now has nothing more to report.
        std::fs::write(&path, "a: 2\n").expect("same again");
        assert!(!changed_within(&mut watcher, Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn seen_content_does_not_report_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let mut watcher = ConfigWatcher::start(&path);
        std::fs::write(&path, "a: 2\n").expect("write");
        // A SIGHUP reload read it first.
        watcher.seen();
        assert!(!changed_within(&mut watcher, Duration::from_secs(2)).await);
    }
}
