//! The shared volume's atomic writer, laid out the way Kubernetes writes projected volumes:
//!
//! ```text
//! <volume>/<entry dir>/
//!   ..2026_11_27_18_00_00.000000001/   data folder, 0550 once complete, owned by the entry owner
//!     svid.pem  svid.key  bundle.pem  svid-bundle.pem  federated/<trust domain>.pem
//!   ..data -> ..2026_11_27_18_00_00.000000001   swapped with one rename
//!   svid.pem -> ..data/svid.pem   (and svid.key, bundle.pem, svid-bundle.pem, federated)
//! ```
//!
//! Every file is created with its final mode, handed to its owner before a byte is written,
//! and fsync'd; the data folder is fsync'd before the swap; older data folders are removed
//! after it. A reader that resolves `..data` once sees one rotation's key and chain together.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use meshcert_protocol::{Owner, TrustDomain};
use zeroize::Zeroizing;

use crate::keys::{KeyError, PrivateKey};
use crate::svid;
use crate::sys::{self, SysError};

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
    /// Ownership could not be given to the entry's owner.
    #[error(transparent)]
    Owner(#[from] SysError),
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

struct Rendered {
    files: Vec<(&'static str, Zeroizing<Vec<u8>>, u32)>,
    federated: Vec<(String, Vec<u8>)>,
}

impl Contents<'_> {
    fn render(&self) -> Rendered {
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

fn visible(contents: &Contents<'_>) -> Vec<&'static str> {
    let mut names = Vec::new();
    if contents.gateway.is_some() {
        names.extend(GATEWAY_VISIBLE);
    }
    names.extend(VISIBLE);
    names
}

/// The shared volume rooted at one folder.
#[derive(Debug, Clone)]
pub struct Volume {
    root: PathBuf,
}

fn check_dir(dir: &str) -> Result<(), VolumeError> {
    if meshcert_protocol::entry::valid_dir(dir) {
        Ok(())
    } else {
        Err(VolumeError::BadDir(dir.to_owned()))
    }
}

impl Volume {
    /// The volume at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The volume's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of entry folder `dir`.
    pub fn entry_path(&self, dir: &str) -> PathBuf {
        self.root.join(dir)
    }

    /// Creates the root folder (0755) if needed.
    pub fn ensure_root(&self) -> Result<(), VolumeError> {
        create_traversable(&self.root)
    }

    /// Writes `contents` into a fresh data folder of `dir` and swaps `..data` to it.
    pub fn install(
        &self,
        dir: &str,
        contents: &Contents<'_>,
        now: SystemTime,
    ) -> Result<(), VolumeError> {
        check_dir(dir)?;
        let entry = self.entry_path(dir);
        create_traversable(&entry)?;
        let rendered = contents.render();
        let data_name = data_folder_name(&entry, now);
        let data = entry.join(&data_name);
        if let Err(e) = self.fill(&data, &rendered, contents.owner) {
            let _ = remove_tree(&data);
            return Err(e);
        }
        // Swap ..data with one rename.
        replace_symlink(&entry, DATA_LINK, Path::new(&data_name))?;
        for name in visible(contents) {
            let target = Path::new(DATA_LINK).join(name);
            if fs::read_link(entry.join(name)).ok().as_deref() != Some(target.as_path()) {
                replace_symlink(&entry, name, &target)?;
            }
        }
        if contents.gateway.is_none() {
            for name in GATEWAY_VISIBLE {
                let _ = fs::remove_file(entry.join(name));
            }
        }
        fsync_dir(&entry)?;
        // Older data folders are no longer reachable through ..data.
        for old in data_folders(&entry)? {
            if old != data_name {
                let path = entry.join(&old);
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old data folder");
                }
            }
        }
        Ok(())
    }

    fn fill(&self, data: &Path, r: &Rendered, owner: Option<Owner>) -> Result<(), VolumeError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(data)
            .map_err(io("cannot create", data))?;
        for (name, bytes, mode) in &r.files {
            write_file(&data.join(name), bytes, *mode, owner)?;
        }
        let fed = data.join(FEDERATED_DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&fed)
            .map_err(io("cannot create", &fed))?;
        for (name, bytes) in &r.federated {
            write_file(&fed.join(name), bytes, 0o444, owner)?;
        }
        for dir in [&fed, &data.to_path_buf()] {
            if let Some(o) = owner {
                sys::lchown(dir, o.uid, o.gid)?;
            }
            fsync_dir(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o550))
                .map_err(io("cannot set the mode of", dir))?;
        }
        Ok(())
    }

    /// Whether the visible files of `dir` are exactly `contents` (nothing deleted or changed).
    pub fn matches(&self, dir: &str, contents: &Contents<'_>) -> bool {
        let entry = self.entry_path(dir);
        let Ok(target) = fs::read_link(entry.join(DATA_LINK)) else {
            return false;
        };
        if !target.to_string_lossy().starts_with("..") || target.components().count() != 1 {
            return false;
        }
        for name in visible(contents) {
            if fs::read_link(entry.join(name)).ok() != Some(Path::new(DATA_LINK).join(name)) {
                return false;
            }
        }
        if contents.gateway.is_none()
            && GATEWAY_VISIBLE
                .iter()
                .any(|name| fs::symlink_metadata(entry.join(name)).is_ok())
        {
            return false;
        }
        let r = contents.render();
        for (name, bytes, mode) in &r.files {
            let path = entry.join(name);
            // A changed mode or owner counts as tampering too.
            let Ok(meta) = fs::metadata(&path) else {
                return false;
            };
            if meta.permissions().mode() & 0o7777 != *mode
                || contents
                    .owner
                    .is_some_and(|o| (meta.uid(), meta.gid()) != (o.uid, o.gid))
            {
                return false;
            }
            match fs::read(&path) {
                Ok(found) if found == bytes.as_slice() => {}
                _ => return false,
            }
        }
        let fed = entry.join(FEDERATED_DIR);
        let Ok(listing) = fs::read_dir(&fed) else {
            return false;
        };
        if listing.count() != r.federated.len() {
            return false;
        }
        r.federated
            .iter()
            .all(|(name, bytes)| fs::read(fed.join(name)).ok().as_deref() == Some(bytes.as_slice()))
    }

    /// The chain and key currently installed in `dir`, read through one resolution of `..data`.
    pub fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError> {
        check_dir(dir)?;
        let entry = self.entry_path(dir);
        let Ok(target) = fs::read_link(entry.join(DATA_LINK)) else {
            return Ok(None);
        };
        let data = entry.join(target);
        let cert_path = data.join(SVID_FILE);
        let key_path = data.join(KEY_FILE);
        let (Ok(cert), Ok(key)) = (
            fs::read_to_string(&cert_path),
            fs::read_to_string(&key_path),
        ) else {
            return Ok(None);
        };
        let key = Zeroizing::new(key);
        let gateway_chain = fs::read_to_string(data.join(GATEWAY_SVID_FILE))
            .ok()
            .map(|text| svid::certs_from_pem(&text));
        Ok(Some(OnDisk {
            chain: svid::certs_from_pem(&cert),
            key: PrivateKey::from_pem(&key)?,
            gateway_chain,
        }))
    }

    /// Removes an entry's folder.
    pub fn remove(&self, dir: &str) -> Result<(), VolumeError> {
        check_dir(dir)?;
        let entry = self.entry_path(dir);
        if entry.exists() {
            remove_tree(&entry).map_err(io("cannot remove", &entry))?;
        }
        Ok(())
    }

    /// The entry folders present in the volume.
    pub fn dirs(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .map(|it| {
                it.filter_map(Result::ok)
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| meshcert_protocol::entry::valid_dir(n))
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
    /// replaced atomically (a staged `..state.tmp` renamed into place).
    pub fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError> {
        check_dir(dir)?;
        let entry = self.entry_path(dir);
        if !entry.is_dir() {
            return Ok(());
        }
        let text = format!(
            "EXPIRED {}\nThe SVID in this folder expired before the agent could replace it; it is no longer served. A new one replaces it once the CA holder answers.\n",
            humantime::format_rfc3339_seconds(not_after)
        );
        let tmp = entry.join(format!("..{STATE_FILE}.tmp"));
        let _ = fs::remove_file(&tmp);
        write_file(&tmp, text.as_bytes(), 0o444, None)?;
        let dest = entry.join(STATE_FILE);
        fs::rename(&tmp, &dest).map_err(io("cannot rename into", &dest))
    }

    /// Removes `dir`'s [`STATE_FILE`], if any (a fresh SVID is installed).
    pub fn clear_expired(&self, dir: &str) -> Result<(), VolumeError> {
        check_dir(dir)?;
        let path = self.entry_path(dir).join(STATE_FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("cannot remove", &path)(e))
            }
            _ => Ok(()),
        }
    }
}

fn data_folder_name(entry: &Path, now: SystemTime) -> String {
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
    while entry.join(&name).exists() {
        n += 1;
        name = format!("{base}.{n}");
    }
    name
}

fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<Owner>,
) -> Result<(), VolumeError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create", path))?;
    if let Some(o) = owner {
        sys::fchown(&file, path, o.uid, o.gid)?;
    }
    file.write_all(bytes).map_err(io("cannot write", path))?;
    file.sync_all().map_err(io("cannot fsync", path))
}

fn fsync_dir(dir: &Path) -> Result<(), VolumeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync", dir))
}

/// Creates `dir` (and its parents) if needed and makes it 0755 whatever the umask: workloads of
/// other users must traverse the volume and entry folders to reach their files. (A systemd
/// `UMask=0077` would otherwise leave them 0700 and owned by the agent.) Folders hold no secret;
/// the files in them are created with their own final modes.
fn create_traversable(dir: &Path) -> Result<(), VolumeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("cannot create", dir))?;
    let meta = fs::metadata(dir).map_err(io("cannot read", dir))?;
    if meta.permissions().mode() & 0o7777 != 0o755 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(io("cannot set the mode of", dir))?;
    }
    Ok(())
}

/// Points `entry/name` at `target` with one rename of a fresh temporary symlink.
fn replace_symlink(entry: &Path, name: &str, target: &Path) -> Result<(), VolumeError> {
    let tmp = entry.join(format!("..{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io("cannot create the symlink", &tmp))?;
    let dest = entry.join(name);
    // A folder put in the way of a visible name is moved aside by removing it first.
    if fs::symlink_metadata(&dest)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        remove_tree(&dest).map_err(io("cannot remove", &dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io("cannot rename into", &dest))
}

/// The data folders (`..<time>`) of an entry folder.
fn data_folders(entry: &Path) -> Result<Vec<String>, VolumeError> {
    let mut out = Vec::new();
    for e in fs::read_dir(entry).map_err(io("cannot list", entry))? {
        let e = e.map_err(io("cannot list", entry))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && name.starts_with("..") && name != DATA_LINK {
            out.push(name);
        }
    }
    Ok(out)
}

/// Removes a tree whose folders may be read-only (0550) for the agent.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        for e in fs::read_dir(path)? {
            remove_tree(&e?.path())?;
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshcert_protocol::SpiffeId;

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
        create_traversable(&entry).expect("entry");
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
            (DATA_LINK, 0o550),
        ];
        for (name, mode) in modes {
            let meta = fs::metadata(entry.join(name)).expect(name);
            assert_eq!(meta.mode() & 0o777, mode, "{name}");
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{name}");
        }
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
        let entry = volume.entry_path("web");
        assert_eq!(data_folders(&entry).expect("list").len(), 1);
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
        let volume = Volume::new(tmp.path());
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
        let tampers: [(&str, Tamper); 5] = [
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
            ("delete the folder", |e| remove_tree(e).expect("rm")),
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
        volume.remove("web").expect("remove");
        assert!(!entry.exists());
        assert!(
            volume
                .install("../x", &contents, SystemTime::now())
                .is_err()
        );
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
