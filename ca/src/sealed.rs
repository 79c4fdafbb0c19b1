//! Builtin roots shared by holder replicas on PostgreSQL: the first replica generates the root,
//! seals it (AES-256-GCM, aws-lc-rs) with the key-encryption key every replica reads from
//! `holder.keyEncryptionKeyFile`, and stores it as a datastore document; the others (and the
//! first one at a restart) unseal it into their state folder, where the authority loads it as
//! it loads any builtin root. The database never holds a root key in clear.
//!
//! Roots introduced by root rotations are shared the same way ([`share_rotation_roots`]): one
//! sealed document, [`ROTATION_ROOTS`], maps each root's fingerprint to its certificate and key,
//! and every replica keeps `<stateDir>/rotation/` and that document holding the same roots. The
//! JWT-SVID signing keys use the same [`Kek`] (`crate::jwt`).
//!
//! "Generated once": the document is written with a compare-and-set on an absent document, so
//! when replicas start together each may generate a candidate, but exactly one is stored and
//! every replica (the losers overwrite theirs before using it) serves that one.
//!
//! On SQLite (one holder) nothing is shared: the builtin root stays in the state folder only.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::authority::{AuthorityError, load_or_create_root_at, write_private, write_public};
use crate::config::{Config, Datastore, RootSource};
use crate::store::{Store, StoreError};

/// The sealed document's format marker (version 1: marker, nonce, ciphertext and tag).
const MAGIC: &[u8; 4] = b"mcs1";

/// The document holding every root introduced by a rotation (fingerprint → root), sealed.
pub const ROTATION_ROOTS: &str = "rotation-roots";

/// Compare-and-swap attempts on [`ROTATION_ROOTS`] before giving up.
const ATTEMPTS: usize = 5;

/// Why a builtin root cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key-encryption key file cannot be read or is not 32 bytes of base64.
    #[error("holder.keyEncryptionKeyFile {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL, but no key-encryption key configured.
    #[error(
        "holder.keyEncryptionKeyFile is required when holder.datastore is PostgreSQL (it seals the keys the replicas share)"
    )]
    NoKey,
    /// The stored document does not open with this key (another key, or tampered with).
    #[error(
        "the shared document `{name}` does not decrypt with holder.keyEncryptionKeyFile (a different key on this replica?)"
    )]
    Unseal {
        /// The document.
        name: String,
    },
    /// The local root is not the one the replicas share.
    #[error(
        "{path} is not the builtin root the replicas share (document `{name}`); move it away to use the shared one"
    )]
    Diverged {
        /// The local certificate.
        path: PathBuf,
        /// The document.
        name: String,
    },
    /// Encryption failed (no randomness).
    #[error("cannot seal the builtin root: {0}")]
    Crypto(String),
    /// Other replicas kept changing the shared rotation roots while this one tried to.
    #[error("the shared document `{name}` kept changing; retry")]
    Contended {
        /// The document.
        name: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The root cannot be generated or written.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

/// The key-encryption key (AES-256-GCM).
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the key: the file holds 32 bytes in base64 (`openssl rand -base64 32`).
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let bad = |reason: String| SealError::Key {
            path: path.to_owned(),
            reason,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| bad(format!("not base64 ({e})")))?,
        );
        Self::from_bytes(&bytes).map_err(bad)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != 32 {
            return Err(format!("{} bytes; an AES-256 key is 32", bytes.len()));
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|e| e.to_string())?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Encrypts `plain`, bound to the document `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|e| SealError::Crypto(e.to_string()))?;
        let mut body = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|e| SealError::Crypto(e.to_string()))?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decrypts a document sealed by [`Kek::seal`] under the same `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let fail = || SealError::Unseal {
            name: name.to_owned(),
        };
        let rest = sealed.strip_prefix(MAGIC.as_slice()).ok_or_else(fail)?;
        if rest.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| fail())?
            .to_vec();
        Ok(Zeroizing::new(plain))
    }
}

/// What a sealed document holds (one root; [`ROTATION_ROOTS`] maps fingerprints to these).
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(rename_all = "camelCase")]
struct SealedRoot {
    certificate_pem: String,
    key_pem: String,
}

/// One builtin root to share.
struct Slot<'a> {
    document: String,
    source: &'a RootSource,
    common_name: String,
    cert: PathBuf,
    key: PathBuf,
}

fn slots(config: &Config) -> Vec<Slot<'_>> {
    let dir = &config.holder.state_dir;
    let mut out = vec![Slot {
        document: "builtin-root".into(),
        source: &config.root,
        common_name: config.display_name.clone(),
        cert: dir.join("root.pem"),
        key: dir.join("root.key"),
    }];
    for (mesh, source) in &config.mesh_roots {
        out.push(Slot {
            document: format!("builtin-root/{mesh}"),
            source,
            common_name: format!("{} mesh {mesh}", config.display_name),
            cert: dir.join("roots").join(format!("{mesh}.pem")),
            key: dir.join("roots").join(format!("{mesh}.key")),
        });
    }
    out.retain(|s| matches!(s.source, RootSource::Builtin { .. }));
    out
}

/// On PostgreSQL, makes every builtin root of `config` the one the replicas share (see the
/// module doc) before the authority loads it; on SQLite, does nothing.
pub fn share_builtin_roots(
    config: &Config,
    store: &dyn Store,
    now: SystemTime,
) -> Result<(), SealError> {
    if !matches!(config.holder.datastore, Datastore::Postgres(_)) {
        return Ok(());
    }
    let slots = slots(config);
    if slots.is_empty() {
        return Ok(());
    }
    let kek = kek(config)?;
    for slot in &slots {
        share(&kek, slot, store, now)?;
    }
    Ok(())
}

/// The configured key-encryption key.
fn kek(config: &Config) -> Result<Kek, SealError> {
    Kek::load(
        config
            .holder
            .key_encryption_key_file
            .as_deref()
            .ok_or(SealError::NoKey)?,
    )
}

fn share(kek: &Kek, slot: &Slot<'_>, store: &dyn Store, now: SystemTime) -> Result<(), SealError> {
    if let Some((_, sealed)) = store.load_document(&slot.document)? {
        return install(kek, slot, &sealed, false);
    }
    if let Some(dir) = slot.cert.parent() {
        crate::authority::create_dir(dir)?;
    }
    // Generates the root into the state folder (or keeps the one already there: a holder that
    // moved from SQLite to PostgreSQL shares the root it had).
    load_or_create_root_at(slot.source, &slot.common_name, &slot.cert, &slot.key, now)?;
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| AuthorityError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let plain = Zeroizing::new(
        serde_json::to_vec(&SealedRoot {
            certificate_pem: read(&slot.cert)?,
            key_pem: Zeroizing::new(read(&slot.key)?).to_string(),
        })
        .map_err(|e| SealError::Crypto(e.to_string()))?,
    );
    let sealed = kek.seal(&slot.document, &plain)?;
    if store.store_document(&slot.document, 0, &sealed)?.is_some() {
        tracing::info!(document = %slot.document, "builtin root sealed into the shared datastore");
        return Ok(());
    }
    // Another replica stored its root first: serve that one.
    let (_, sealed) = store
        .load_document(&slot.document)?
        .ok_or_else(|| StoreError::Unavailable("the shared builtin root vanished".into()))?;
    install(kek, slot, &sealed, true)
}

/// Writes the shared root into the state folder; a different local root is an error unless
/// `replace` (this replica's own candidate lost the race and was never used).
fn install(kek: &Kek, slot: &Slot<'_>, sealed: &[u8], replace: bool) -> Result<(), SealError> {
    let plain = kek.open(&slot.document, sealed)?;
    let root: SealedRoot = serde_json::from_slice(&plain).map_err(|_| SealError::Unseal {
        name: slot.document.clone(),
    })?;
    match std::fs::read_to_string(&slot.cert) {
        Ok(local) if local == root.certificate_pem && slot.key.exists() => return Ok(()),
        Ok(_) if !replace => {
            return Err(SealError::Diverged {
                path: slot.cert.clone(),
                name: slot.document.clone(),
            });
        }
        _ => {}
    }
    if let Some(dir) = slot.cert.parent() {
        crate::authority::create_dir(dir)?;
    }
    write_private(&slot.key, &Zeroizing::new(root.key_pem.clone()))?;
    write_public(&slot.cert, &root.certificate_pem)?;
    tracing::info!(document = %slot.document, path = %slot.cert.display(), "using the replicas' shared builtin root");
    Ok(())
}

/// Every root introduced by a rotation, by fingerprint.
type RotationRoots = std::collections::BTreeMap<String, SealedRoot>;

/// On PostgreSQL, makes `<stateDir>/rotation/` and the shared [`ROTATION_ROOTS`] document hold
/// the same roots: roots this replica introduced (a rotation it prepared, or roots it had
/// before it shared a datastore) are sealed into the document, and roots another replica
/// introduced are written into the folder, where the authority loads them. Call it after a
/// rotation root's files are written, and before the authority loads the rotation's roots.
/// On SQLite, does nothing: the folder is the only copy.
pub fn share_rotation_roots(config: &Config, store: &dyn Store) -> Result<(), SealError> {
    if !matches!(config.holder.datastore, Datastore::Postgres(_)) {
        return Ok(());
    }
    let dir = config.holder.state_dir.join(crate::rotation::FOLDER);
    sync_rotation_roots(&kek(config)?, &dir, store)
}

/// [`share_rotation_roots`] for the folder `dir`.
fn sync_rotation_roots(kek: &Kek, dir: &Path, store: &dyn Store) -> Result<(), SealError> {
    for _ in 0..ATTEMPTS {
        let (revision, mut shared) = match store.load_document(ROTATION_ROOTS)? {
            None => (0, RotationRoots::new()),
            Some((revision, sealed)) => {
                let plain = kek.open(ROTATION_ROOTS, &sealed)?;
                let roots = serde_json::from_slice(&plain).map_err(|_| SealError::Unseal {
                    name: ROTATION_ROOTS.into(),
                })?;
                (revision, roots)
            }
        };
        let local = local_rotation_roots(dir)?;
        for (fp, root) in &shared {
            if !local.contains_key(fp) {
                install_rotation_root(dir, fp, root)?;
            }
        }
        let before = shared.len();
        for (fp, root) in local {
            shared.entry(fp).or_insert(root);
        }
        if shared.len() == before {
            return Ok(());
        }
        let plain = Zeroizing::new(
            serde_json::to_vec(&shared).map_err(|e| SealError::Crypto(e.to_string()))?,
        );
        let sealed = kek.seal(ROTATION_ROOTS, &plain)?;
        if store
            .store_document(ROTATION_ROOTS, revision, &sealed)?
            .is_some()
        {
            tracing::info!(
                added = shared.len() - before,
                "rotation roots sealed into the shared datastore"
            );
            return Ok(());
        }
    }
    Err(SealError::Contended {
        name: ROTATION_ROOTS.into(),
    })
}

/// The roots of `dir`: every `<fingerprint>.pem` with its `.key` whose certificate has that
/// fingerprint (anything else is not a rotation root and stays out of the document).
fn local_rotation_roots(dir: &Path) -> Result<RotationRoots, SealError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AuthorityError::Io { path, source }
    };
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RotationRoots::new()),
        Err(e) => return Err(io(dir)(e).into()),
    };
    let mut out = RotationRoots::new();
    for file in listing {
        let cert = file.map_err(io(dir))?.path();
        let Some(fp) = cert
            .extension()
            .filter(|e| *e == "pem")
            .and_then(|_| cert.file_stem()?.to_str())
        else {
            continue;
        };
        let key = cert.with_extension("key");
        let certificate_pem = std::fs::read_to_string(&cert).map_err(io(&cert))?;
        let matches = pem::parse(&certificate_pem)
            .is_ok_and(|p| crate::authority::fingerprint(p.contents()) == fp);
        if !matches || !key.exists() {
            tracing::warn!(path = %cert.display(), "not a rotation root (no key, or another fingerprint); not shared");
            continue;
        }
        let key_pem = Zeroizing::new(std::fs::read_to_string(&key).map_err(io(&key))?);
        out.insert(
            fp.to_owned(),
            SealedRoot {
                certificate_pem,
                key_pem: key_pem.to_string(),
            },
        );
    }
    Ok(out)
}

/// Writes a shared rotation root into `dir` (key 0600 from creation), as `prepare_root` does.
fn install_rotation_root(dir: &Path, fp: &str, root: &SealedRoot) -> Result<(), SealError> {
    crate::authority::create_dir(dir)?;
    write_private(
        &dir.join(format!("{fp}.key")),
        &Zeroizing::new(root.key_pem.clone()),
    )?;
    write_public(&dir.join(format!("{fp}.pem")), &root.certificate_pem)?;
    tracing::info!(
        fingerprint = fp,
        "using a rotation root another replica introduced"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_document_opens_only_with_its_key_and_name() {
        let kek = Kek::from_bytes(&[7; 32]).expect("key");
        let sealed = kek.seal("builtin-root", b"secret key").expect("seal");
        assert!(
            !sealed.windows(10).any(|w| w == b"secret key"),
            "never in clear"
        );
        assert_eq!(
            kek.open("builtin-root", &sealed).expect("open").as_slice(),
            b"secret key"
        );
        assert!(kek.open("builtin-root/other", &sealed).is_err());
        let other = Kek::from_bytes(&[8; 32]).expect("key");
        assert!(other.open("builtin-root", &sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(kek.open("builtin-root", &tampered).is_err());
        assert!(Kek::from_bytes(&[1; 16]).is_err());
    }

    /// A rotation root written into `state_dir` as `prepare_root` writes it; its fingerprint.
    fn rotation_root(state_dir: &Path) -> String {
        let ca =
            crate::authority::generate_root("V", "org", 2048, 30, SystemTime::now()).expect("root");
        let fp = ca.fingerprint();
        crate::authority::create_dir(&state_dir.join(crate::rotation::FOLDER)).expect("folder");
        crate::authority::persist_root(&ca, &crate::rotation::root_files(state_dir, &fp))
            .expect("persist");
        fp
    }

    fn replicas_hold_the_same_rotation_roots_and_the_database_none_in_clear(store: &dyn Store) {
        let kek = Kek::from_bytes(&[5; 32]).expect("key");
        let (a, b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let folder = |d: &tempfile::TempDir| d.path().join(crate::rotation::FOLDER);
        // Replica A prepares a rotation: its root is sealed into the document.
        let first = rotation_root(a.path());
        sync_rotation_roots(&kek, &folder(&a), store).expect("A shares");
        let (_, sealed) = store
            .load_document(ROTATION_ROOTS)
            .expect("load")
            .expect("stored");
        assert!(
            !sealed.windows(11).any(|w| w == b"PRIVATE KEY"),
            "the database never holds a rotation root's key in clear"
        );
        // Replica B receives it, byte for byte, the key owner-only.
        sync_rotation_roots(&kek, &folder(&b), store).expect("B receives");
        for ext in ["pem", "key"] {
            let name = format!("{first}.{ext}");
            assert_eq!(
                std::fs::read(folder(&b).join(&name)).expect("B has it"),
                std::fs::read(folder(&a).join(&name)).expect("A has it"),
            );
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(folder(&b).join(format!("{first}.key")))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // B's own root (and not a stray file) reaches A; nothing is lost on either side.
        let second = rotation_root(b.path());
        std::fs::write(folder(&b).join("stray.pem"), "not a root").expect("stray");
        sync_rotation_roots(&kek, &folder(&b), store).expect("B shares");
        sync_rotation_roots(&kek, &folder(&a), store).expect("A receives");
        assert!(folder(&a).join(format!("{second}.key")).exists());
        assert!(folder(&a).join(format!("{first}.key")).exists());
        assert!(!folder(&a).join("stray.pem").exists());
        // Another key-encryption key does not open the document.
        let other = Kek::from_bytes(&[6; 32]).expect("key");
        let c = tempfile::tempdir().expect("c");
        assert!(matches!(
            sync_rotation_roots(&other, &folder(&c), store),
            Err(SealError::Unseal { .. })
        ));
    }

    #[test]
    fn rotation_roots_are_shared_on_sqlite() {
        replicas_hold_the_same_rotation_roots_and_the_database_none_in_clear(
            &*crate::store::suite::sqlite().store,
        );
    }

    #[test]
    fn rotation_roots_are_shared_on_postgres() {
        let f = crate::store::suite::postgres();
        replicas_hold_the_same_rotation_roots_and_the_database_none_in_clear(&*f.store);
    }

    fn replica_config() -> String {
        format!(
            "{}  datastore: URL\n  keyEncryptionKeyFile: KEK\n",
            crate::testing::VIRTUAL_MESH
        )
    }

    fn replica(url: &str, kek: &Path) -> (tempfile::TempDir, crate::config::Config) {
        let dir = tempfile::tempdir().expect("tmp");
        let text = replica_config()
            .replace("STATE", &dir.path().display().to_string())
            .replace("URL", url)
            .replace("KEK", &kek.display().to_string());
        (dir, crate::config::parse(&text).expect("valid"))
    }

    #[test]
    fn replicas_starting_together_share_one_sealed_builtin_root() {
        let (_cluster, url) = crate::store::suite::postgres_database();
        let keys = tempfile::tempdir().expect("tmp");
        let kek = keys.path().join("kek");
        std::fs::write(
            &kek,
            base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
        )
        .expect("kek");
        let now = SystemTime::now();
        let replicas: Vec<_> = (0..3).map(|_| replica(&url, &kek)).collect();
        let opened: Vec<crate::holder::Holder> = std::thread::scope(|s| {
            let running: Vec<_> = replicas
                .iter()
                .map(|(_, c)| s.spawn(|| crate::holder::Holder::open(c.clone(), now)))
                .collect();
            running
                .into_iter()
                .map(|t| t.join().expect("thread").expect("open"))
                .collect()
        });
        let roots: Vec<String> = replicas
            .iter()
            .map(|(d, _)| std::fs::read_to_string(d.path().join("root.pem")).expect("root"))
            .collect();
        assert!(
            roots.iter().all(|r| *r == roots[0]),
            "one root for every replica"
        );
        let versions: Vec<u64> = opened.iter().map(|h| h.serving().bundle_version).collect();
        assert_eq!(versions, vec![1; 3]);
        let (_, sealed) = opened[0]
            .store
            .load_document("builtin-root")
            .expect("load")
            .expect("stored");
        assert!(
            !sealed.windows(11).any(|w| w == b"PRIVATE KEY"),
            "the database never holds the root key in clear"
        );
        // A replica with another key-encryption key refuses to start, naming the setting.
        let wrong = keys.path().join("wrong");
        std::fs::write(
            &wrong,
            base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
        )
        .expect("kek");
        let (_d, c) = replica(&url, &wrong);
        let err = crate::holder::Holder::open(c, now).expect_err("wrong key");
        assert!(err.to_string().contains("keyEncryptionKeyFile"), "{err}");
    }
}
