//! The volume's watcher, and the changes it sees: which entry folders someone else changed.
//!
//! [`VolumeWatch`] watches the volume folder and each entry folder, one level each, not the
//! data folders inside them: deleting, renaming or replacing a visible file, `..data` or a
//! data folder is seen at once. A write into a file of the served data folder (through its
//! visible symlink) is not an event here; the rotator's periodic check of every folder
//! ([`crate::rotation::executor::VOLUME_CHECK_EVERY`]) finds and restores it. Watching the
//! data folders too cost more than the rest of the agent together at 1000 entries: every
//! install created and removed a watched folder, each removal made notify scan all its
//! watches, and every read of a served file was an event.
//!
//! The agent's own installs also raise events (a new data folder created, `..data` swapped,
//! old data folders removed). Checking the whole volume on each of them made every rotation
//! cost O(entries) reads. [`Classifier`] follows the event stream of each entry folder, in
//! the kernel's order, and recognises the steps of an install by
//! [`crate::volume::Volume::install`]: a data folder created and its mode set before its
//! `..data` swap, the swap of `..data` from `....data.tmp`, symlinks renamed from their
//! `..NAME.tmp`, removals of data folders that `..data` no longer points to. Everything else
//! (a visible file or `..data` deleted, the served data folder removed, the folder moved
//! away) marks that entry folder only, and [`Changes`] hands the set to the rotator, which
//! compares just those folders with memory.
//!
//! When in doubt (a folder whose history the watcher did not see, such as after a restart),
//! an event counts as foreign: the cost is one folder's check, never a missed change.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::CreateKind;
use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::Notify;

use crate::volume::DATA_LINK;

/// Entry folders marked by the watcher, and a wake-up for whoever takes them: the folders
/// someone else changed (taken by the rotator, which checks them) and the folders that
/// appeared (taken by [`VolumeWatch::follow_new_folders`], which watches them).
#[derive(Debug, Default)]
pub struct Changes {
    pending: Mutex<Pending>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    all: bool,
    dirs: BTreeSet<String>,
}

/// Which entry folders were marked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Every entry folder (the volume folder itself changed, or an event could not be placed).
    All,
    /// These entry folders only.
    Dirs(BTreeSet<String>),
}

impl Changes {
    /// No changes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks entry folder `dir`.
    pub fn dir(&self, dir: &str) {
        if let Ok(mut p) = self.pending.lock()
            && !p.all
        {
            p.dirs.insert(dir.to_owned());
        }
        self.notify.notify_one();
    }

    /// Marks every entry folder (something happened that may concern any of them).
    pub fn all(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.all = true;
            p.dirs.clear();
        }
        self.notify.notify_one();
    }

    /// Waits until something was recorded (at once when something is pending).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Takes what was recorded; `None` when nothing was.
    pub fn take(&self) -> Option<Check> {
        let mut p = self.pending.lock().ok()?;
        let taken = std::mem::take(&mut *p);
        if taken.all {
            Some(Check::All)
        } else if taken.dirs.is_empty() {
            None
        } else {
            Some(Check::Dirs(taken.dirs))
        }
    }
}

/// The entry folder that `path` creates (or moves in) right under `root`, if it does.
fn new_entry_folder<'a>(root: &Path, kind: &EventKind, path: &'a Path) -> Option<&'a str> {
    let arrives = matches!(
        kind,
        EventKind::Create(CreateKind::Folder | CreateKind::Any)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any))
    );
    if !arrives || path.parent() != Some(root) {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    meshcert_protocol::entry::valid_dir(name).then_some(name)
}

/// The volume's watcher: the volume folder and each entry folder (see the module
/// documentation). It starts again when the volume folder itself was removed and recreated
/// (inotify watches the old folder's inode, which is gone).
pub struct VolumeWatch {
    root: PathBuf,
    changed: Arc<Changes>,
    /// Entry folders that appeared and need a watch of their own, which the watcher's thread
    /// cannot add itself (it is the one that would have to answer).
    new_folders: Arc<Changes>,
    watcher: Option<notify::RecommendedWatcher>,
    inode: Option<u64>,
}

impl VolumeWatch {
    /// Watches `root` (when it exists; see [`Self::renew_if_replaced`]) and reports what
    /// others change into `changed`.
    pub fn start(root: &Path, changed: Arc<Changes>) -> Self {
        let mut watch = Self {
            root: root.to_owned(),
            changed,
            new_folders: Arc::new(Changes::new()),
            watcher: None,
            inode: None,
        };
        watch.renew_if_replaced();
        watch
    }

    /// Entry folders that appeared: call [`Self::follow_new_folders`] when it has some.
    pub fn new_folders(&self) -> Arc<Changes> {
        self.new_folders.clone()
    }

    /// Watches the entry folders that appeared since the last call.
    pub fn follow_new_folders(&mut self) {
        match self.new_folders.take() {
            None => {}
            Some(Check::Dirs(dirs)) => {
                for dir in dirs {
                    self.follow(&dir);
                }
            }
            Some(Check::All) => self.follow_all(),
        }
    }

    /// Starts watching again when the volume folder was replaced (or appeared); call it
    /// periodically.
    pub fn renew_if_replaced(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(&self.root).ok().map(|m| m.ino());
        if inode.is_some() && (inode != self.inode || self.watcher.is_none()) {
            if self.inode.is_some() {
                tracing::warn!(path = %self.root.display(), "the volume folder was replaced; watching the new one");
                self.changed.all();
            }
            self.watcher = self.watch_root();
            self.inode = inode;
            // Folders that were there before the watch have raised no event.
            self.follow_all();
        }
    }

    /// Watches every entry folder there is now.
    fn follow_all(&mut self) {
        let Ok(list) = std::fs::read_dir(&self.root) else {
            return;
        };
        for dir in list.flatten() {
            if let Some(name) = dir.file_name().to_str()
                && meshcert_protocol::entry::valid_dir(name)
                && dir.file_type().is_ok_and(|t| t.is_dir())
            {
                self.follow(name);
            }
        }
    }

    fn follow(&mut self, dir: &str) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        // Gone again already: nothing to watch (its removal was an event of the volume folder).
        if let Err(e) = watcher.watch(&self.root.join(dir), RecursiveMode::NonRecursive) {
            tracing::debug!(dir, error = %e, "cannot watch an entry folder");
        }
    }

    fn watch_root(&self) -> Option<notify::RecommendedWatcher> {
        let mut classifier = Classifier::new();
        let base = self.root.clone();
        let changed = self.changed.clone();
        let new_folders = self.new_folders.clone();
        let mut watcher = volume_watcher(move |event: notify::Result<notify::Event>| {
            let event = match event {
                Ok(event) => event,
                // Events were lost (queue overflow): anything may have changed.
                Err(_) => return changed.all(),
            };
            if event.need_rescan() {
                return changed.all();
            }
            // A rename seen from both sides: its `From` and `To` events came before it.
            if matches!(
                event.kind,
                EventKind::Modify(ModifyKind::Name(RenameMode::Both))
            ) {
                return;
            }
            for path in &event.paths {
                if let Some(dir) = new_entry_folder(&base, &event.kind, path) {
                    new_folders.dir(dir);
                }
                match classifier.classify(&base, &event.kind, path) {
                    Verdict::Ignore => {}
                    Verdict::Dir(dir) => changed.dir(&dir),
                    Verdict::All => changed.all(),
                }
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the volume; checking it periodically only"))
        .ok()?;
        watcher
            .watch(&self.root, RecursiveMode::NonRecursive)
            .map_err(|e| tracing::warn!(error = %e, "cannot watch the volume; checking it periodically only"))
            .ok()?;
        Some(watcher)
    }
}

/// A watcher for the volume that does not follow symlinks: `..data` and the visible names
/// are symlinks into the data folder, and following them would report events under the link's
/// name instead of the real path (inotify gives one watch per folder, whatever its name).
fn volume_watcher<F: notify::EventHandler>(
    handler: F,
) -> notify::Result<notify::RecommendedWatcher> {
    notify::RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )
}

/// What one event means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A step of the agent's own install, or nothing that can alter a served file.
    Ignore,
    /// Entry folder `0` may have been changed by someone else.
    Dir(String),
    /// The volume folder itself, or a path outside it.
    All,
}

/// What the watcher saw of one entry folder since it started.
#[derive(Debug, Default)]
struct Folder {
    /// The data folder created last and not yet swapped in (being filled).
    filling: Option<String>,
    /// The data folder `..data` was last swapped to by an install (unknown before one).
    current: Option<String>,
    /// Names whose `..NAME.tmp` symlink was created and not yet renamed into place.
    staged: BTreeSet<String>,
}

/// Follows the watcher's event stream and tells the agent's own install steps from foreign
/// changes. Feed it every event in the order received.
#[derive(Debug, Default)]
pub struct Classifier {
    folders: HashMap<String, Folder>,
}

/// The `..NAME.tmp` name of a symlink staged by an install, as `NAME` (`....data.tmp` is
/// the staged `..data`).
fn staged_name(name: &str) -> Option<&str> {
    name.strip_prefix("..")?.strip_suffix(".tmp")
}

fn is_data_folder(name: &str) -> bool {
    name.starts_with("..") && name != DATA_LINK && staged_name(name).is_none()
}

impl Classifier {
    /// A classifier that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Classifies an event of kind `kind` on `path` (under the volume folder `root`). Events
    /// with several paths (a rename seen from both sides) are classified path by path.
    pub fn classify(&mut self, root: &Path, kind: &EventKind, path: &Path) -> Verdict {
        let verdict = self.follow(root, kind, path);
        // Creating a name never alters a served file: replacing one first deletes or renames
        // it, and writing into one is a modification.
        if matches!(kind, EventKind::Create(_)) && matches!(verdict, Verdict::Dir(_)) {
            return Verdict::Ignore;
        }
        verdict
    }

    fn follow(&mut self, root: &Path, kind: &EventKind, path: &Path) -> Verdict {
        if matches!(kind, EventKind::Access(_)) {
            return Verdict::Ignore;
        }
        let names = relative_names(root, path).unwrap_or_default();
        let Some((&dir, rest)) = names.split_first() else {
            return Verdict::All;
        };
        if !meshcert_protocol::entry::valid_dir(dir) {
            // Not an entry folder (nothing the agent serves).
            return Verdict::Ignore;
        }
        let foreign = Verdict::Dir(dir.to_owned());
        let Some((&name, inside)) = rest.split_first() else {
            // The entry folder itself: created by the first install; anything else is foreign.
            return if matches!(kind, EventKind::Create(_)) {
                Verdict::Ignore
            } else {
                self.folders.remove(dir);
                foreign
            };
        };
        let folder = self.folders.entry(dir.to_owned()).or_default();
        folder.follow(kind, name, !inside.is_empty(), foreign)
    }
}

/// The plain names of `path` below `root`; `None` outside it or for a name that is not UTF-8.
fn relative_names<'a>(root: &Path, path: &'a Path) -> Option<Vec<&'a str>> {
    path.strip_prefix(root)
        .ok()?
        .components()
        .map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect()
}

impl Folder {
    /// Follows an event on `name` in this entry folder (`inside`: on a name within `name`);
    /// `foreign` is the verdict for a change the agent did not make.
    fn follow(&mut self, kind: &EventKind, name: &str, inside: bool, foreign: Verdict) -> Verdict {
        let arrives = matches!(
            kind,
            EventKind::Create(_)
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        );
        if let Some(staged) = staged_name(name) {
            // A temporary symlink: never served.
            if matches!(kind, EventKind::Create(_)) {
                self.staged.insert(staged.to_owned());
            }
            return Verdict::Ignore;
        }
        if inside {
            // Inside a data folder.
            return if !is_data_folder(name) {
                foreign
            } else if self.filling.as_deref() == Some(name) {
                Verdict::Ignore
            } else if self.current.as_deref().is_some_and(|c| c != name) {
                // An older data folder: no longer served.
                Verdict::Ignore
            } else {
                foreign
            };
        }
        if name == DATA_LINK {
            return if arrives && self.staged.remove(DATA_LINK) {
                self.current = self.filling.take();
                Verdict::Ignore
            } else {
                foreign
            };
        }
        if is_data_folder(name) {
            return if matches!(kind, EventKind::Create(_)) {
                self.filling = Some(name.to_owned());
                Verdict::Ignore
            } else if self.filling.as_deref() == Some(name)
                || self.current.as_deref().is_some_and(|c| c != name)
            {
                // Its mode set while filled, or an older one removed.
                Verdict::Ignore
            } else {
                foreign
            };
        }
        // A visible name.
        if arrives && self.staged.remove(name) {
            Verdict::Ignore
        } else {
            foreign
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};

    use super::*;

    const CREATE: EventKind = EventKind::Create(CreateKind::Any);
    const WRITE: EventKind = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    const MODE: EventKind = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any));
    const FROM: EventKind = EventKind::Modify(ModifyKind::Name(RenameMode::From));
    const TO: EventKind = EventKind::Modify(ModifyKind::Name(RenameMode::To));
    const REMOVE: EventKind = EventKind::Remove(RemoveKind::Any);

    fn root() -> PathBuf {
        PathBuf::from("/run/meshcert/svids")
    }

    /// The events of one install of `web` into data folder `data`, replacing `old`.
    fn install(data: &str, old: Option<&str>, first: bool) -> Vec<(EventKind, String)> {
        let mut events = Vec::new();
        if first {
            events.push((CREATE, "web".to_owned()));
        }
        events.push((CREATE, format!("web/{data}")));
        for f in ["svid.pem", "svid.key", "federated"] {
            events.push((CREATE, format!("web/{data}/{f}")));
            events.push((WRITE, format!("web/{data}/{f}")));
        }
        events.push((MODE, format!("web/{data}")));
        events.push((CREATE, "web/....data.tmp".to_owned()));
        events.push((FROM, "web/....data.tmp".to_owned()));
        events.push((TO, "web/..data".to_owned()));
        if first {
            for f in ["svid.pem", "svid.key"] {
                events.push((CREATE, format!("web/..{f}.tmp")));
                events.push((FROM, format!("web/..{f}.tmp")));
                events.push((TO, format!("web/{f}")));
            }
        }
        if let Some(old) = old {
            events.push((REMOVE, format!("web/{old}/svid.pem")));
            events.push((REMOVE, format!("web/{old}")));
        }
        events
    }

    fn feed(c: &mut Classifier, events: &[(EventKind, String)]) -> Vec<Verdict> {
        events
            .iter()
            .map(|(kind, rel)| c.classify(&root(), kind, &root().join(rel)))
            .collect()
    }

    #[test]
    fn the_agents_own_installs_are_ignored() {
        let mut c = Classifier::new();
        let mut events = install("..2026_1", None, true);
        events.extend(install("..2026_2", Some("..2026_1"), false));
        events.extend(install("..2026_3", Some("..2026_2"), false));
        for (verdict, (kind, rel)) in feed(&mut c, &events).into_iter().zip(&events) {
            assert_eq!(verdict, Verdict::Ignore, "{kind:?} {rel}");
        }
    }

    #[test]
    fn foreign_changes_mark_their_folder() {
        let web = Verdict::Dir("web".to_owned());
        let cases: Vec<(&str, EventKind, &str, Verdict)> = vec![
            ("visible link deleted", REMOVE, "web/svid.pem", web.clone()),
            ("..data deleted", REMOVE, "web/..data", web.clone()),
            (
                "served key written",
                WRITE,
                "web/..2026_1/svid.key",
                web.clone(),
            ),
            ("served folder removed", REMOVE, "web/..2026_1", web.clone()),
            ("..data replaced by a rename", TO, "web/..data", web.clone()),
            (
                "link replaced by a rename",
                TO,
                "web/bundle.pem",
                web.clone(),
            ),
            ("folder moved away", FROM, "web", web.clone()),
            ("the volume folder itself", REMOVE, "", Verdict::All),
            ("not an entry folder", CREATE, ".hidden/x", Verdict::Ignore),
            ("a new entry folder", CREATE, "db", Verdict::Ignore),
        ];
        for (name, kind, rel, want) in cases {
            let mut c = Classifier::new();
            feed(&mut c, &install("..2026_1", None, true));
            let got = c.classify(&root(), &kind, &root().join(rel));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn an_unknown_history_counts_as_foreign() {
        // A watcher started after the last install (agent restart): no current data folder.
        let mut c = Classifier::new();
        let got = c.classify(&root(), &REMOVE, &root().join("web/..2026_1"));
        assert_eq!(got, Verdict::Dir("web".to_owned()));
        let got = c.classify(&root(), &WRITE, &root().join("web/..2026_1/svid.key"));
        assert_eq!(got, Verdict::Dir("web".to_owned()));
    }

    #[tokio::test]
    async fn changes_collect_folders_until_taken() {
        let changes = Changes::new();
        assert_eq!(changes.take(), None);
        changes.dir("web");
        changes.dir("db");
        changes.changed().await;
        assert_eq!(
            changes.take(),
            Some(Check::Dirs(["db".to_owned(), "web".to_owned()].into()))
        );
        changes.dir("web");
        changes.all();
        changes.dir("db");
        assert_eq!(changes.take(), Some(Check::All));
        assert_eq!(changes.take(), None);
    }
    /// The real sequence: installs by [`crate::volume::Volume::install`] seen through the real
    /// [`VolumeWatch`] leave no mark; a folder that appears later is watched too; foreign
    /// deletions mark their folder.
    #[tokio::test]
    async fn real_installs_leave_no_mark_and_deletions_do() {
        use std::collections::BTreeMap;
        use std::time::{Duration, SystemTime};

        use meshcert_protocol::SpiffeId;

        use crate::keys::{KeyAlgorithm, PrivateKey};
        use crate::svid::testca::TestCa;
        use crate::volume::{Contents, Volume};

        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("svids");
        let volume = Volume::new(&root);
        volume.ensure_root().expect("root");
        let changes = Arc::new(Changes::new());
        let ca = TestCa::new();
        let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
        let bundle = vec![ca.root.clone()];
        let federated = BTreeMap::new();
        let install = || {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
            let chain = ca.sign(
                &crate::csr::build(&key, Some(&id)).expect("csr"),
                &id,
                SystemTime::now(),
                Duration::from_secs(3600),
            );
            let contents = Contents {
                chain: &chain,
                key: &key,
                bundle: &bundle,
                federated: &federated,
                owner: None,
                gateway: None,
            };
            volume
                .install("web", &contents, SystemTime::now())
                .expect("install");
        };
        let settle = Duration::from_secs(10);

        // The first install happens before the watcher starts (an agent restarted).
        install();
        let mut watch = VolumeWatch::start(&root, changes.clone());
        let new_folders = watch.new_folders();
        for _ in 0..5 {
            install();
        }
        // Events are handled in order: once the new folder is seen, so were the installs.
        std::fs::create_dir(root.join("db")).expect("new folder");
        tokio::time::timeout(settle, new_folders.changed())
            .await
            .expect("the new folder is seen");
        assert_eq!(
            changes.take(),
            None,
            "the agent's own installs leave no mark"
        );

        let file = root.join("db").join("svid.pem");
        std::fs::write(&file, "x").expect("write");
        watch.follow_new_folders();
        std::fs::remove_file(&file).expect("delete");
        assert_eq!(
            next_marks(&changes, settle).await,
            Check::Dirs(["db".to_owned()].into()),
            "a folder that appeared is watched"
        );

        std::fs::remove_file(volume.entry_path("web").join(crate::volume::SVID_FILE))
            .expect("delete");
        assert_eq!(
            next_marks(&changes, settle).await,
            Check::Dirs(["web".to_owned()].into())
        );
    }

    /// The next marks recorded (a wake-up may come from marks already taken).
    async fn next_marks(changes: &Changes, wait: std::time::Duration) -> Check {
        tokio::time::timeout(wait, async {
            loop {
                changes.changed().await;
                if let Some(marks) = changes.take() {
                    return marks;
                }
            }
        })
        .await
        .expect("a mark")
    }
}
