//! The shared volume's atomic writer, laid out the way Kubernetes writes projected volumes:
//!
//! ```text
//! <volume>/<entry dir>/                  the agent's, 0755
//!   ..2026_11_27_18_00_00.000000001/   data folder, the agent's, 0555 once complete
//!     svid.pem  svid.key  bundle.pem  svid-bundle.pem  federated/<trust domain>.pem
//!                                       (files owned by the entry's owner)
//!   ..data -> ..2026_11_27_18_00_00.000000001   swapped with one rename
//!   svid.pem -> ..data/svid.pem   (and svid.key, bundle.pem, svid-bundle.pem, federated)
//! ```
//!
//! Every file is created with its final mode (`fchmod` of the open descriptor, whatever the
//! umask), handed to its owner before a byte is written, and fsync'd; the data folder is
//! fsync'd before the swap; older data folders are removed after it. A reader that resolves
//! `..data` once sees one rotation's key and chain together.
//!
//! Folders belong to the agent, so a workload can read its files but never replace what the
//! agent later reads, removes or chmods; a pre-existing folder owned by another user is
//! refused. Every operation goes through [`crate::folder`]: relative to an open folder, never
//! through a symlink, reading only regular files of a bounded size.
//!
//! One file on purpose: the layout, the install that writes it, the check that compares a
//! folder with it and the load that adopts it must change together.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use meshcert_protocol::{Owner, TrustDomain};
use zeroize::Zeroizing;

use crate::folder::{Folder, Kind, Meta};
use crate::keys::{KeyError, PrivateKey};
use crate::svid;
use crate::sys;
use crate::worker::{self, Worker};

/// The symlink to the current data folder.
pub const DATA_LINK: &str = "..data";
/// The chain, leaf first.
pub const SVID_FILE: &str = "svid.pem";
/// The private key, PKCS#8 PEM.
pub const KEY_FILE: &str = "svid.key";
/// The own trust domain's bundle.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Key first, then the chain.
pub const COMBINED_FILE: &str = "svid-bundle.pem";
/// Folder of the other trust domains' bundles.
pub const FEDERATED_DIR: &str = "federated";
/// A gateway's second chain, to the virtual mesh's shared root (limited trust only).
pub const GATEWAY_SVID_FILE: &str = "gateway-svid.pem";
/// The shared root a gateway's second chain verifies against (limited trust only).
pub const GATEWAY_BUNDLE_FILE: &str = "gateway-bundle.pem";
/// The visible names that exist only for gateways under limited trust.
pub const GATEWAY_VISIBLE: [&str; 2] = [GATEWAY_SVID_FILE, GATEWAY_BUNDLE_FILE];
/// Every visible name, each a symlink through `..data`.
/// `svid.pem` comes last: on the first install, once it is visible every other name is too.
pub const VISIBLE: [&str; 5] = [
    KEY_FILE,
    BUNDLE_FILE,
    COMBINED_FILE,
    FEDERATED_DIR,
    SVID_FILE,
];

/// Why the volume could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A folder of the volume belongs to another user, who could change what the agent
    /// later reads or removes: the agent does not use it.
    #[error("{path} belongs to uid {uid}, not to the agent: remove it (the agent creates its own)")]
    Foreign {
        /// The folder.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// The volume operation did not finish in time (a hung filesystem) or the folder is still
    /// busy with one that did not.
    #[error("the volume did not answer: {0}")]
    Stalled(String),
    /// The entry's folder name is not one plain path segment.
    #[error("`{0}` is not a usable folder name")]
    BadDir(String),
    /// The key on disk is unusable.
    #[error("the key on disk is unusable: {0}")]
    Key(#[from] KeyError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A gateway's second chain (leaf first) and the shared root it verifies against.
pub type GatewayFiles<'a> = (&'a [Vec<u8>], &'a [Vec<u8>]);

/// What goes into one entry's folder.
#[derive(Debug, Clone, Copy)]
pub struct Contents<'a> {
    /// The SVID chain, leaf first (DER).
    pub chain: &'a [Vec<u8>],
    /// Its key.
    pub key: &'a PrivateKey,
    /// The own trust domain's roots (DER).
    pub bundle: &'a [Vec<u8>],
    /// Other trust domains' roots, written under `federated/` (empty: none).
    pub federated: &'a BTreeMap<TrustDomain, Vec<Vec<u8>>>,
    /// Owner of the files; the agent's own user when `None`.
    pub owner: Option<Owner>,
    /// A gateway's second chain (to the shared root) and that root, under limited trust.
    pub gateway: Option<GatewayFiles<'a>>,
}

/// An entry folder's files as bytes with their modes and owner: what an install writes and a
/// check compares, owned so that it can go to the worker thread.
#[derive(Debug)]
pub struct Rendered {
    files: Vec<(&'static str, Zeroizing<Vec<u8>>, u32)>,
    federated: Vec<(String, Vec<u8>)>,
    owner: Option<Owner>,
    gateway: bool,
}

impl Rendered {
    fn visible(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.gateway {
            names.extend(GATEWAY_VISIBLE);
        }
        names.extend(VISIBLE);
        names
    }

    /// The owner the files get: the entry's, else the agent's own.
    fn file_owner(&self) -> (u32, u32) {
        self.owner
            .map(|o| (o.uid, o.gid))
            .unwrap_or_else(sys::current_owner)
    }
}

impl Contents<'_> {
    /// The files of this folder, rendered.
    pub fn render(&self) -> Rendered {
        let key_pem = self.key.to_pem();
        let chain_pem = svid::certs_to_pem(self.chain);
        let key_mode = if self.owner.is_some() { 0o440 } else { 0o400 };
        let mut combined = Zeroizing::new(key_pem.as_bytes().to_vec());
        combined.extend_from_slice(chain_pem.as_bytes());
        Rendered {
            files: vec![
                (SVID_FILE, Zeroizing::new(chain_pem.into_bytes()), 0o444),
                (
                    KEY_FILE,
                    Zeroizing::new(key_pem.as_bytes().to_vec()),
                    key_mode,
                ),
                (
                    BUNDLE_FILE,
                    Zeroizing::new(svid::certs_to_pem(self.bundle).into_bytes()),
                    0o444,
                ),
                (COMBINED_FILE, combined, key_mode),
            ]
            .into_iter()
            .chain(self.gateway.into_iter().flat_map(|(chain, root)| {
                [
                    (
                        GATEWAY_SVID_FILE,
                        Zeroizing::new(svid::certs_to_pem(chain).into_bytes()),
                        0o444,
                    ),
                    (
                        GATEWAY_BUNDLE_FILE,
                        Zeroizing::new(svid::certs_to_pem(root).into_bytes()),
                        0o444,
                    ),
                ]
            }))
            .collect(),
            federated: self
                .federated
                .iter()
                .map(|(td, certs)| (format!("{td}.pem"), svid::certs_to_pem(certs).into_bytes()))
                .collect(),
            owner: self.owner,
            gateway: self.gateway.is_some(),
        }
    }
}

/// What an entry folder holds.
#[derive(Debug, Clone)]
pub struct OnDisk {
    /// The chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Its key.
    pub key: PrivateKey,
    /// A gateway's second chain, when present.
    pub gateway_chain: Option<Vec<Vec<u8>>>,
}

/// The shared volume rooted at one folder. Its operations run on a [`Worker`] thread, so that
/// one that blocks (a hung filesystem) costs its caller a timeout, not its loop.
#[derive(Debug, Clone)]
pub struct Volume {
    layout: Layout,
    worker: Arc<Worker>,
}

/// The operations themselves, on the calling thread.
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
}

fn check_dir(dir: &str) -> Result<(), VolumeError> {
    if meshcert_protocol::entry::valid_dir(dir) {
        Ok(())
    } else {
        Err(VolumeError::BadDir(dir.to_owned()))
    }
}

/// Whether a folder's owner is one the agent trusts not to change it: the agent itself or root.
fn trusted(meta: &Meta) -> bool {
    meta.uid == sys::current_owner().0 || meta.uid == 0
}

/// The data folder `..data` points at, when it is one plain `..<name>` in the entry folder.
fn data_target(entry: &Folder) -> Option<String> {
    let target = entry.read_link(DATA_LINK)?;
    let name = target.to_str()?;
    (name.starts_with("..")
        && name != DATA_LINK
        && name.len() > 2
        && target.components().count() == 1)
        .then(|| name.to_owned())
}

impl Volume {
    /// The volume at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            layout: Layout { root: root.into() },
            worker: Arc::new(Worker::new(worker::DEFAULT_TIMEOUT)),
        }
    }

    /// The volume's root folder.
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// The folder of entry folder `dir`.
    pub fn entry_path(&self, dir: &str) -> PathBuf {
        self.layout.root.join(dir)
    }

    /// Creates the root folder if needed and makes it 0755; refuses one owned by another user
    /// (neither the agent nor root). Runs on the calling thread (at start).
    pub fn ensure_root(&self) -> Result<(), VolumeError> {
        self.layout.ensure_root()
    }

    /// Runs `op` on the worker for folder `dir`.
    fn off_thread<R: Send + 'static>(
        &self,
        dir: &str,
        op: impl FnOnce(&Layout) -> Result<R, VolumeError> + Send + 'static,
    ) -> Result<R, VolumeError> {
        check_dir(dir)?;
        let layout = self.layout.clone();
        self.worker
            .run(dir, move || op(&layout))
            .map_err(|e| VolumeError::Stalled(e.to_string()))?
    }

    /// Writes `contents` into a fresh data folder of `dir` and swaps `..data` to it.
    pub fn install(
        &self,
        dir: &str,
        contents: &Contents<'_>,
        now: SystemTime,
    ) -> Result<(), VolumeError> {
        let rendered = contents.render();
        let owned = dir.to_owned();
        self.off_thread(dir, move |l| l.install_rendered(&owned, &rendered, now))
    }

    /// Whether the visible files of `dir` are exactly `contents` (nothing deleted or changed).
    /// A folder whose check did not return in time counts as unchanged: it is skipped.
    pub fn matches(&self, dir: &str, contents: &Contents<'_>) -> bool {
        let rendered = contents.render();
        let owned = dir.to_owned();
        match self.off_thread(dir, move |l| Ok(l.matches_rendered(&owned, &rendered))) {
            Ok(same) => same,
            Err(e) => {
                tracing::debug!(dir, error = %e, "the entry folder was not checked");
                true
            }
        }
    }

    /// The chain and key currently installed in `dir`, read through one resolution of `..data`.
    /// `None` when there is none, or when the data folder is not the agent's (nothing in it
    /// can be trusted to be what the agent wrote).
    pub fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError> {
        let owned = dir.to_owned();
        self.off_thread(dir, move |l| l.load(&owned))
    }

    /// Removes an entry's folder (never following a symlink).
    pub fn remove(&self, dir: &str) -> Result<(), VolumeError> {
        let owned = dir.to_owned();
        self.off_thread(dir, move |l| l.remove(&owned))
    }

    /// The entry folders present in the volume.
    pub fn dirs(&self) -> Vec<String> {
        self.layout.dirs()
    }
}

impl Layout {
    fn ensure_root(&self) -> Result<(), VolumeError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io("cannot create", &self.root))?;
        let root = self.open_root()?;
        traversable(&root)
    }

    fn open_root(&self) -> Result<Folder, VolumeError> {
        Folder::open(&self.root).map_err(io("cannot open", &self.root))
    }

    /// Opens (and with `create`, makes) the entry folder `dir`, agent-owned and 0755.
    fn open_entry(&self, root: &Folder, dir: &str, create: bool) -> Result<Folder, VolumeError> {
        check_dir(dir)?;
        if create {
            root.create_dir(dir)
                .map_err(io("cannot create", &root.join(dir)))?;
        }
        let entry = root
            .open_dir(dir)
            .map_err(io("cannot open", &root.join(dir)))?;
        traversable(&entry)?;
        Ok(entry)
    }

    fn install_rendered(
        &self,
        dir: &str,
        rendered: &Rendered,
        now: SystemTime,
    ) -> Result<(), VolumeError> {
        // The root too comes back if it was removed.
        self.ensure_root()?;
        let root = self.open_root()?;
        let entry = self.open_entry(&root, dir, true)?;
        let data_name = data_folder_name(&entry, now)?;
        if let Err(e) = fill(&entry, &data_name, rendered) {
            let _ = entry.remove_tree(&data_name);
            return Err(e);
        }
        // Swap ..data with one rename.
        replace_symlink(&entry, DATA_LINK, Path::new(&data_name))?;
        for name in rendered.visible() {
            let target = Path::new(DATA_LINK).join(name);
            if entry.read_link(name).as_deref() != Some(target.as_path()) {
                replace_symlink(&entry, name, &target)?;
            }
        }
        if !rendered.gateway {
            for name in GATEWAY_VISIBLE {
                let _ = entry.remove_tree(name);
            }
        }
        entry.fsync().map_err(io("cannot fsync", entry.path()))?;
        // Older data folders are no longer reachable through ..data.
        for old in data_folders(&entry)? {
            if old != data_name
                && let Err(e) = entry.remove_tree(&old)
            {
                tracing::warn!(path = %entry.join(&old).display(), error = %e, "cannot remove an old data folder");
            }
        }
        Ok(())
    }

    fn matches_rendered(&self, dir: &str, rendered: &Rendered) -> bool {
        match self.differs(dir, rendered) {
            None => true,
            Some(why) => {
                tracing::debug!(dir, why, "the entry folder differs from what was installed");
                false
            }
        }
    }

    /// How `dir` differs from `r`, if it does.
    fn differs(&self, dir: &str, r: &Rendered) -> Option<String> {
        let root = match self.open_root() {
            Ok(root) => root,
            Err(e) => return Some(e.to_string()),
        };
        let entry = match self.open_entry(&root, dir, false) {
            Ok(entry) => entry,
            Err(e) => return Some(e.to_string()),
        };
        let Some(target) = data_target(&entry) else {
            return Some("..data is missing or points elsewhere".into());
        };
        for name in r.visible() {
            if entry.read_link(name).as_deref() != Some(Path::new(DATA_LINK).join(name).as_path()) {
                return Some(format!("{name} is not the symlink through ..data"));
            }
        }
        if !r.gateway
            && GATEWAY_VISIBLE
                .iter()
                .any(|name| entry.meta_of(name).ok().flatten().is_some())
        {
            return Some("gateway files are present".into());
        }
        let data = match entry.open_dir(&target) {
            Ok(data) => data,
            Err(e) => return Some(format!("the data folder cannot be opened: {e}")),
        };
        match data.meta() {
            Ok(m) if trusted(&m) && m.mode == DATA_MODE => {}
            _ => return Some("the data folder's owner or mode changed".into()),
        }
        let owner = r.file_owner();
        let same =
            |folder: &Folder, name: &str, bytes: &[u8], mode: u32| match folder.read_file(name) {
                Ok(Some((found, m))) => found == bytes && m.mode == mode && (m.uid, m.gid) == owner,
                _ => false,
            };
        for (name, bytes, mode) in &r.files {
            if !same(&data, name, bytes, *mode) {
                return Some(format!("{name} changed (content, mode, owner or type)"));
            }
        }
        let Ok(fed) = data.open_dir(FEDERATED_DIR) else {
            return Some("federated/ is missing".into());
        };
        if fed.list().map(|l| l.len()).ok() != Some(r.federated.len()) {
            return Some("federated/ holds other files".into());
        }
        for (name, bytes) in &r.federated {
            if !same(&fed, name, bytes, 0o444) {
                return Some(format!("federated/{name} changed"));
            }
        }
        None
    }

    fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError> {
        check_dir(dir)?;
        let root = self.open_root()?;
        let Ok(entry) = root.open_dir(dir) else {
            return Ok(None);
        };
        let Some(target) = data_target(&entry) else {
            return Ok(None);
        };
        let Ok(data) = entry.open_dir(&target) else {
            return Ok(None);
        };
        if !data.meta().is_ok_and(|m| trusted(&m)) || !entry.meta().is_ok_and(|m| trusted(&m)) {
            tracing::warn!(
                dir,
                "the entry's data folder is not the agent's; not served"
            );
            return Ok(None);
        }
        let read = |name: &str| match data.read_file(name) {
            Ok(Some((bytes, _))) => String::from_utf8(bytes).ok().map(Zeroizing::new),
            _ => None,
        };
        let (Some(cert), Some(key)) = (read(SVID_FILE), read(KEY_FILE)) else {
            return Ok(None);
        };
        let gateway_chain = read(GATEWAY_SVID_FILE).map(|text| svid::certs_from_pem(&text));
        Ok(Some(OnDisk {
            chain: svid::certs_from_pem(&cert),
            key: PrivateKey::from_pem(&key)?,
            gateway_chain,
        }))
    }

    fn remove(&self, dir: &str) -> Result<(), VolumeError> {
        check_dir(dir)?;
        let root = self.open_root()?;
        root.remove_tree(dir)
            .map_err(io("cannot remove", &self.root.join(dir)))
    }

    fn dirs(&self) -> Vec<String> {
        self.open_root()
            .ok()
            .and_then(|root| root.list().ok())
            .map(|names| {
                names
                    .into_iter()
                    .filter(|(n, is_dir)| *is_dir && meshcert_protocol::entry::valid_dir(n))
                    .map(|(n, _)| n)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The file beside `..data` that says the folder's SVID expired before it could be replaced
/// (the CA holder could not be reached): its files stay, for the record, but are no longer
/// valid or served. The next install removes it.
pub const STATE_FILE: &str = "state";

impl Volume {
    /// Writes [`STATE_FILE`] into `dir`: `EXPIRED <not_after, RFC 3339>` and a sentence, 0444,
    /// replaced atomically (a staged `..state.tmp` renamed into place). Nothing when the
    /// folder is gone.
    pub fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError> {
        let owned = dir.to_owned();
        self.off_thread(dir, move |l| l.mark_expired(&owned, not_after))
    }

    /// Removes `dir`'s [`STATE_FILE`], if any (a fresh SVID is installed).
    pub fn clear_expired(&self, dir: &str) -> Result<(), VolumeError> {
        let owned = dir.to_owned();
        self.off_thread(dir, move |l| l.clear_expired(&owned))
    }
}

impl Layout {
    /// The entry folder `dir` when it exists (agent-owned, 0755), never following a symlink.
    fn existing_entry(&self, dir: &str) -> Result<Option<Folder>, VolumeError> {
        let root = self.open_root()?;
        match root
            .meta_of(dir)
            .map_err(io("cannot read", &root.join(dir)))?
        {
            Some(m) if m.kind == Kind::Dir => self.open_entry(&root, dir, false).map(Some),
            _ => Ok(None),
        }
    }

    fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError> {
        let Some(entry) = self.existing_entry(dir)? else {
            return Ok(());
        };
        let text = format!(
            "EXPIRED {}\nThe SVID in this folder expired before the agent could replace it; it is no longer served. A new one replaces it once the CA holder answers.\n",
            humantime::format_rfc3339_seconds(not_after)
        );
        let tmp = format!("..{STATE_FILE}.tmp");
        let _ = entry.remove_tree(&tmp);
        write_file(&entry, &tmp, text.as_bytes(), 0o444, None)?;
        entry
            .rename(&tmp, STATE_FILE)
            .map_err(io("cannot rename into", &entry.join(STATE_FILE)))
    }

    fn clear_expired(&self, dir: &str) -> Result<(), VolumeError> {
        let Some(entry) = self.existing_entry(dir)? else {
            return Ok(());
        };
        entry
            .remove_file(STATE_FILE)
            .map_err(io("cannot remove", &entry.join(STATE_FILE)))
    }
}

/// The mode of a complete data folder (and its `federated/`): the agent's, read-only, readable
/// by everyone (the key files keep their own modes).
pub const DATA_MODE: u32 = 0o555;

/// Fills the fresh data folder `name` of `entry` with `r`: files created with their final
/// mode and owner, written and fsync'd; folders fsync'd, then made [`DATA_MODE`].
fn fill(entry: &Folder, name: &str, r: &Rendered) -> Result<(), VolumeError> {
    if !entry
        .create_dir(name)
        .map_err(io("cannot create", &entry.join(name)))?
    {
        return Err(VolumeError::Io {
            action: "cannot create",
            path: entry.join(name),
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    let data = entry
        .open_dir(name)
        .map_err(io("cannot open", &entry.join(name)))?;
    data.chmod(0o700)
        .map_err(io("cannot set the mode of", data.path()))?;
    let owner = r.owner.map(|o| (o.uid, o.gid));
    for (file, bytes, mode) in &r.files {
        write_file(&data, file, bytes, *mode, owner)?;
    }
    data.create_dir(FEDERATED_DIR)
        .map_err(io("cannot create", &data.join(FEDERATED_DIR)))?;
    let fed = data
        .open_dir(FEDERATED_DIR)
        .map_err(io("cannot open", &data.join(FEDERATED_DIR)))?;
    for (file, bytes) in &r.federated {
        write_file(&fed, file, bytes, 0o444, owner)?;
    }
    for folder in [&fed, &data] {
        folder.fsync().map_err(io("cannot fsync", folder.path()))?;
        folder
            .chmod(DATA_MODE)
            .map_err(io("cannot set the mode of", folder.path()))?;
    }
    Ok(())
}

/// Makes an agent's folder 0755 whatever the umask (workloads of other users must traverse
/// it; it holds no secret, the files in it have their own modes); refuses a folder owned by
/// another user, who could change what the agent later reads or removes.
fn traversable(folder: &Folder) -> Result<(), VolumeError> {
    let meta = folder.meta().map_err(io("cannot read", folder.path()))?;
    if !trusted(&meta) {
        return Err(VolumeError::Foreign {
            path: folder.path().to_owned(),
            uid: meta.uid,
        });
    }
    if meta.mode != 0o755 {
        folder
            .chmod(0o755)
            .map_err(io("cannot set the mode of", folder.path()))?;
    }
    Ok(())
}

fn data_folder_name(entry: &Folder, now: SystemTime) -> Result<String, VolumeError> {
    // Kubernetes' style: ..2026_11_27_18_00_00.123456789 (UTC).
    let t = time::OffsetDateTime::from(now);
    let base = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    );
    let mut name = base.clone();
    let mut n = 0;
    while entry
        .meta_of(&name)
        .map_err(io("cannot read", &entry.join(&name)))?
        .is_some()
    {
        n += 1;
        name = format!("{base}.{n}");
    }
    Ok(name)
}

fn write_file(
    folder: &Folder,
    name: &str,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), VolumeError> {
    let path = folder.join(name);
    let mut file = folder
        .create_file(name, mode, owner)
        .map_err(io("cannot create", &path))?;
    file.write_all(bytes).map_err(io("cannot write", &path))?;
    file.sync_all().map_err(io("cannot fsync", &path))
}

/// Points `entry/name` at `target` with one rename of a fresh temporary symlink.
fn replace_symlink(entry: &Folder, name: &str, target: &Path) -> Result<(), VolumeError> {
    let tmp = format!("..{name}.tmp");
    let _ = entry.remove_tree(&tmp);
    entry
        .symlink(target, &tmp)
        .map_err(io("cannot create the symlink", &entry.join(&tmp)))?;
    // A folder put in the way of a visible name is removed first (rename cannot replace it).
    if entry
        .meta_of(name)
        .ok()
        .flatten()
        .is_some_and(|m| m.kind == Kind::Dir)
    {
        entry
            .remove_tree(name)
            .map_err(io("cannot remove", &entry.join(name)))?;
    }
    entry
        .rename(&tmp, name)
        .map_err(io("cannot rename into", &entry.join(name)))
}

/// The data folders (`..<time>`) of an entry folder.
fn data_folders(entry: &Folder) -> Result<Vec<String>, VolumeError> {
    Ok(entry
        .list()
        .map_err(io("cannot list", entry.path()))?
        .into_iter()
        .filter(|(name, is_dir)| *is_dir && name.starts_with("..") && name != DATA_LINK)
        .map(|(name, _)| name)
        .collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshcert_protocol::SpiffeId;

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::csr;
    use crate::keys::KeyAlgorithm;
    use crate::svid::testca::TestCa;

    #[test]
    fn folders_stay_traversable_whatever_the_umask() {
        // What a `UMask=0077` leaves behind: a 0700 folder. Workloads of other users must still
        // reach their files, so the volume and entry folders end up 0755.
        let tmp = tempfile::tempdir().expect("tempdir");
        let entry = tmp.path().join("svids").join("web");
        fs::create_dir_all(&entry).expect("mkdir");
        for dir in [tmp.path().join("svids"), entry.clone()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let volume = Volume::new(tmp.path().join("svids"));
        volume.ensure_root().expect("root");
        let root = volume.layout.open_root().expect("open");
        volume.layout.open_entry(&root, "web", true).expect("entry");
        for dir in [tmp.path().join("svids"), entry] {
            let mode = fs::metadata(&dir).expect("meta").permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{}", dir.display());
        }
    }

    struct Fixture {
        ca: TestCa,
        id: SpiffeId,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                ca: TestCa::new(),
                id: SpiffeId::new("spiffe://mesh-a.test/web").expect("id"),
            }
        }
        fn issue(&self) -> (Vec<Vec<u8>>, PrivateKey) {
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
            let chain = self.ca.sign(
                &csr::build(&key, Some(&self.id)).expect("csr"),
                &self.id,
                SystemTime::now(),
                Duration::from_secs(3600),
            );
            (chain, key)
        }
    }

    #[test]
    fn install_lays_out_the_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume::new(tmp.path().join("svids"));
        volume.ensure_root().expect("root");
        let f = Fixture::new();
        let (chain, key) = f.issue();
        let bundle = vec![f.ca.root.clone()];
        let other = TrustDomain::new("mesh-b.test").expect("td");
        let federated = BTreeMap::from([(other, vec![TestCa::new().root])]);
        let (uid, gid) = sys::current_owner();
        let contents = Contents {
            chain: &chain,
            key: &key,
            bundle: &bundle,
            federated: &federated,
            owner: Some(Owner { uid, gid }),
            gateway: None,
        };
        volume
            .install("web", &contents, SystemTime::now())
            .expect("install");
        let entry = volume.entry_path("web");
        for name in VISIBLE {
            let link = fs::read_link(entry.join(name)).expect("symlink");
            assert_eq!(link, Path::new("..data").join(name));
        }
        let modes = [
            (SVID_FILE, 0o444),
            (KEY_FILE, 0o440),
            (BUNDLE_FILE, 0o444),
            (COMBINED_FILE, 0o440),
            ("federated/mesh-b.test.pem", 0o444),
            (DATA_LINK, 0o555),
        ];
        for (name, mode) in modes {
            let meta = fs::metadata(entry.join(name)).expect(name);
            assert_eq!(meta.mode() & 0o777, mode, "{name}");
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{name}");
        }
        let meta = fs::metadata(&entry).expect("entry");
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o755, uid));
        let combined = fs::read_to_string(entry.join(COMBINED_FILE)).expect("read");
        assert!(combined.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(volume.matches("web", &contents));
        let back = volume.load("web").expect("load").expect("present");
        assert_eq!(back.chain, chain);
        assert_eq!(back.key.pkcs8_der(), key.pkcs8_der());
        assert!(back.gateway_chain.is_none());
    }

    #[test]
    fn rotation_swaps_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume::new(tmp.path());
        let f = Fixture::new();
        let bundle = vec![f.ca.root.clone()];
        let none = BTreeMap::new();
        let mut last = None;
        for _ in 0..5 {
            let (chain, key) = f.issue();
            let contents = Contents {
                chain: &chain,
                key: &key,
                bundle: &bundle,
                federated: &none,
                owner: None,
                gateway: None,
            };
            volume
                .install("web", &contents, SystemTime::now())
                .expect("install");
            last = Some((chain, key));
        }
        let root = volume.layout.open_root().expect("open");
        let entry = volume
            .layout
            .open_entry(&root, "web", false)
            .expect("entry");
        assert_eq!(data_folders(&entry).expect("list").len(), 1);
        let entry = volume.entry_path("web");
        let (chain, key) = last.expect("installed");
        let info = svid::check(&chain, &key, &bundle, &f.id, SystemTime::now()).expect("valid");
        let disk = volume.load("web").expect("load").expect("present");
        assert_eq!(
            svid::leaf_info(&disk.chain[0]).expect("leaf").serial,
            info.serial
        );
        assert_eq!(disk.key.pkcs8_der(), key.pkcs8_der());
        let key_mode = fs::metadata(entry.join(KEY_FILE)).expect("meta").mode() & 0o777;
        assert_eq!(key_mode, 0o400);
    }

    #[test]
    fn tampering_is_detected_and_removal_works() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume::new(tmp.path().join("svids"));
        let f = Fixture::new();
        let (chain, key) = f.issue();
        let bundle = vec![f.ca.root.clone()];
        let none = BTreeMap::new();
        let contents = Contents {
            chain: &chain,
            key: &key,
            bundle: &bundle,
            federated: &none,
            owner: None,
            gateway: None,
        };
        let entry = volume.entry_path("web");
        type Tamper = fn(&Path);
        fn in_data(e: &Path, name: &str, plant: impl FnOnce(&Path)) {
            let data = e.join(DATA_LINK);
            fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
            fs::remove_file(data.join(name)).expect("rm");
            plant(&data.join(name));
        }
        let tampers: [(&str, Tamper); 9] = [
            ("delete the whole volume", |e| {
                let root = e.parent().expect("volume");
                let above = Folder::open(root.parent().expect("above")).expect("open");
                let name = root.file_name().expect("name").to_str().expect("utf-8");
                above.remove_tree(name).expect("rm")
            }),
            ("make the key readable by all", |e| {
                fs::set_permissions(e.join(KEY_FILE), fs::Permissions::from_mode(0o644))
                    .expect("chmod")
            }),
            ("delete a visible link", |e| {
                fs::remove_file(e.join(SVID_FILE)).expect("rm")
            }),
            ("delete ..data", |e| {
                fs::remove_file(e.join(DATA_LINK)).expect("rm")
            }),
            ("replace a link by a file", |e| {
                fs::remove_file(e.join(KEY_FILE)).expect("rm");
                fs::write(e.join(KEY_FILE), "x").expect("write");
            }),
            ("delete the folder", |e| {
                let parent = Folder::open(e.parent().expect("parent")).expect("open");
                parent.remove_tree("web").expect("rm")
            }),
            ("a FIFO in place of the key", |e| {
                in_data(e, KEY_FILE, |p| {
                    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o400))
                        .expect("fifo")
                })
            }),
            ("the chain a symlink to /dev/zero", |e| {
                in_data(e, SVID_FILE, |p| {
                    std::os::unix::fs::symlink("/dev/zero", p).expect("symlink")
                })
            }),
            ("the bundle a symlink out of the volume", |e| {
                in_data(e, BUNDLE_FILE, |p| {
                    std::os::unix::fs::symlink("/etc/hostname", p).expect("symlink")
                })
            }),
        ];
        for (name, tamper) in tampers {
            volume
                .install("web", &contents, SystemTime::now())
                .expect("install");
            assert!(volume.matches("web", &contents), "{name}: fresh");
            tamper(&entry);
            assert!(!volume.matches("web", &contents), "{name}: detected");
        }
        volume
            .install("web", &contents, SystemTime::now())
            .expect("install");
        assert_eq!(volume.dirs(), vec!["web".to_owned()]);
        // A FIFO planted in the served data folder: found, and removed with the folder.
        in_data(&entry, KEY_FILE, |p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o400)).expect("fifo")
        });
        assert!(volume.load("web").expect("load").is_none());
        volume.remove("web").expect("remove");
        assert!(!entry.exists());
        assert!(
            volume
                .install("../x", &contents, SystemTime::now())
                .is_err()
        );
    }

    /// As root (CI runs as root): folders another user owns are refused or not trusted.
    #[test]
    fn folders_of_other_users_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CI runs as root): it gives folders to another user"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume::new(tmp.path().join("svids"));
        volume.ensure_root().expect("root");
        let f = Fixture::new();
        let (chain, key) = f.issue();
        let bundle = vec![f.ca.root.clone()];
        let none = BTreeMap::new();
        let contents = Contents {
            chain: &chain,
            key: &key,
            bundle: &bundle,
            federated: &none,
            owner: Some(Owner {
                uid: 4242,
                gid: 4242,
            }),
            gateway: None,
        };
        // An entry folder made beforehand by another user is refused, and left alone.
        let planted = volume.entry_path("planted");
        fs::create_dir(&planted).expect("mkdir");
        sys::lchown(&planted, 4242, 4242).expect("chown");
        let err = volume
            .install("planted", &contents, SystemTime::now())
            .expect_err("refused");
        assert!(
            matches!(err, VolumeError::Foreign { uid: 4242, .. }),
            "{err}"
        );
        assert_eq!(fs::read_dir(&planted).expect("list").count(), 0);

        // The layout of earlier versions: a data folder the owner could make writable.
        volume
            .install("web", &contents, SystemTime::now())
            .expect("install");
        assert!(volume.matches("web", &contents));
        let data = volume.entry_path("web").join(DATA_LINK);
        let meta = fs::metadata(&data).expect("data");
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, DATA_MODE));
        let key_meta = fs::metadata(volume.entry_path("web").join(KEY_FILE)).expect("key");
        assert_eq!((key_meta.uid(), key_meta.gid()), (4242, 4242));
        sys::lchown(&fs::canonicalize(&data).expect("resolve"), 4242, 4242).expect("chown");
        assert!(
            !volume.matches("web", &contents),
            "a data folder of the owner's"
        );
        assert!(volume.load("web").expect("load").is_none(), "not trusted");
        volume
            .install("web", &contents, SystemTime::now())
            .expect("restored");
        assert!(volume.matches("web", &contents));
    }

    #[test]
    fn gateway_files_come_and_go_with_the_gateway_chain() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume::new(tmp.path());
        let f = Fixture::new();
        let shared = TestCa::new();
        let (chain, key) = f.issue();
        let gateway_chain = shared.sign(
            &csr::build(&key, Some(&f.id)).expect("csr"),
            &f.id,
            SystemTime::now(),
            Duration::from_secs(3600),
        );
        let bundle = vec![f.ca.root.clone()];
        let shared_root = vec![shared.root.clone()];
        let none = BTreeMap::new();
        let mut contents = Contents {
            chain: &chain,
            key: &key,
            bundle: &bundle,
            federated: &none,
            owner: None,
            gateway: Some((&gateway_chain, &shared_root)),
        };
        volume
            .install("gw", &contents, SystemTime::now())
            .expect("install");
        let entry = volume.entry_path("gw");
        assert!(volume.matches("gw", &contents));
        let disk = volume.load("gw").expect("load").expect("present");
        assert_eq!(
            disk.gateway_chain.as_deref(),
            Some(gateway_chain.as_slice())
        );
        svid::check(
            &gateway_chain,
            &disk.key,
            &shared_root,
            &f.id,
            SystemTime::now(),
        )
        .expect("the second chain verifies against the shared root");
        assert!(fs::read(entry.join(GATEWAY_BUNDLE_FILE)).is_ok());

        contents.gateway = None;
        assert!(!volume.matches("gw", &contents));
        volume
            .install("gw", &contents, SystemTime::now())
            .expect("install");
        assert!(volume.matches("gw", &contents));
        for name in GATEWAY_VISIBLE {
            assert!(
                fs::symlink_metadata(entry.join(name)).is_err(),
                "{name} left behind"
            );
        }
    }
}
