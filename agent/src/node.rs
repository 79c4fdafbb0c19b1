//! The node identity and the last sync, kept in the state folder:
//!
//! - `node.key`: the node's private key, PKCS#8 PEM, created 0600;
//! - `node.pem`: the node SVID chain, leaf first;
//! - `last-sync.json`: the entries, bundles, trust domain and enforcement of the last sync, so
//!   a restarted agent serves what is on disk at once even when the holder is down.
//!
//! Every file is replaced atomically (temp file with its final mode, fsync, rename, fsync of the
//! folder). A new key and SVID are first both written as `*.next`, then renamed key first; a
//! crash between the two renames is finished on the next load.
//!
//! Joining (a one-time token) and renewing (the node's own SVID) live here too: both end in a
//! new identity stored in the state folder.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use meshcert_protocol::Enforcement;
use meshcert_protocol::api::{AttestRequest, RenewRequest, SyncResponse};

use crate::config::Config;
use crate::issuer::{Issuer, IssuerError};
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};
use crate::rotation::signing::generate_key;
use crate::svid::{self, LeafInfo, SvidError};

/// The node key's file name.
pub const KEY_FILE: &str = "node.key";
/// The node SVID's file name.
pub const CERT_FILE: &str = "node.pem";
/// The last sync's file name.
pub const LAST_SYNC_FILE: &str = "last-sync.json";

/// Why the state folder could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The node key is unusable.
    #[error("the node key {path} is unusable: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: KeyError,
    },
    /// The node SVID is unusable.
    #[error("the node SVID {path} is unusable: {source}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: SvidError,
    },
    /// The last sync is not readable JSON.
    #[error("{path} is not a readable last sync: {message}")]
    LastSync {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The node SVID without its key: what the rotation core reasons about.
#[derive(Debug, Clone)]
pub struct NodeCertificate {
    /// The leaf's identity and validity.
    pub info: LeafInfo,
    /// The node SVID chain, leaf first.
    pub chain: Vec<Vec<u8>>,
}

/// The node's key and SVID.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node key.
    pub key: PrivateKey,
    /// The node SVID chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's identity and validity.
    pub info: LeafInfo,
}

impl NodeIdentity {
    /// Its public half (no key), for the rotation core.
    pub fn certificate(&self) -> NodeCertificate {
        NodeCertificate {
            info: self.info.clone(),
            chain: self.chain.clone(),
        }
    }

    /// Builds an identity from a fresh key and the holder's chain, checking that they match.
    pub fn new(key: PrivateKey, chain: Vec<Vec<u8>>) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::Empty)?;
        let info = svid::leaf_info(leaf)?;
        if key.public_key_raw()? != info.public_key {
            return Err(SvidError::KeyMismatch);
        }
        Ok(Self { key, chain, info })
    }
}

/// Creates the state folder (0700) if needed.
pub fn ensure_dir(state_dir: &Path) -> Result<(), NodeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io("cannot create the state folder", state_dir))
}

/// Writes `bytes` to `path` atomically: a temp file created with `mode`, fsync'd, renamed over
/// `path`, and the folder fsync'd.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    let tmp = temp_path(path, ".tmp");
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(io("cannot rename into", path))?;
    sync_parent(path)
}

fn temp_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    // A leftover from a crash would keep its old mode: remove it so `mode` applies.
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create", path))?;
    file.write_all(bytes).map_err(io("cannot write", path))?;
    file.sync_all().map_err(io("cannot fsync", path))
}

fn sync_parent(path: &Path) -> Result<(), NodeError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync", parent))
}

/// Loads the node identity, or `None` when the node has not joined. Finishes a replacement a
/// crash interrupted.
pub fn load(state_dir: &Path) -> Result<Option<NodeIdentity>, NodeError> {
    let key_path = state_dir.join(KEY_FILE);
    let cert_path = state_dir.join(CERT_FILE);
    let key_next = temp_path(&key_path, ".next");
    let cert_next = temp_path(&cert_path, ".next");
    match (key_next.exists(), cert_next.exists()) {
        // The key was renamed, the certificate not yet: finish.
        (false, true) => {
            fs::rename(&cert_next, &cert_path).map_err(io("cannot rename", &cert_next))?
        }
        // Nothing renamed yet: the old pair is intact. The certificate goes first, for the same
        // reason `store` writes the key first.
        (true, _) => {
            let _ = fs::remove_file(&cert_next);
            let _ = fs::remove_file(&key_next);
        }
        (false, false) => {}
    }
    if !key_path.exists() && !cert_path.exists() {
        return Ok(None);
    }
    let key_text = fs::read_to_string(&key_path).map_err(io("cannot read", &key_path))?;
    let key = PrivateKey::from_pem(&key_text).map_err(|source| NodeError::Key {
        path: key_path.clone(),
        source,
    })?;
    let cert_text = fs::read_to_string(&cert_path).map_err(io("cannot read", &cert_path))?;
    let chain = svid::certs_from_pem(&cert_text);
    NodeIdentity::new(key, chain)
        .map(Some)
        .map_err(|source| NodeError::Cert {
            path: cert_path,
            source,
        })
}

/// Stores a node identity, replacing the old one atomically.
pub fn store(state_dir: &Path, identity: &NodeIdentity) -> Result<(), NodeError> {
    ensure_dir(state_dir)?;
    let key_path = state_dir.join(KEY_FILE);
    let cert_path = state_dir.join(CERT_FILE);
    let key_next = temp_path(&key_path, ".next");
    let cert_next = temp_path(&cert_path, ".next");
    // The key first: a `cert.next` without a `key.next` must only ever mean "the key was
    // renamed already" (see `load`), never "the key was not written yet".
    write_new(&key_next, identity.key.to_pem().as_bytes(), 0o600)?;
    write_new(
        &cert_next,
        svid::certs_to_pem(&identity.chain).as_bytes(),
        0o644,
    )?;
    sync_parent(&key_path)?;
    fs::rename(&key_next, &key_path).map_err(io("cannot rename into", &key_path))?;
    fs::rename(&cert_next, &cert_path).map_err(io("cannot rename into", &cert_path))?;
    sync_parent(&key_path)
}

/// The last sync, if one was stored and is readable.
pub fn load_last_sync(state_dir: &Path) -> Result<Option<SyncResponse>, NodeError> {
    let path = state_dir.join(LAST_SYNC_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(NodeError::Io {
                action: "cannot read",
                path,
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| NodeError::LastSync {
            path,
            message: e.to_string(),
        })
}

/// Stores the last sync atomically.
pub fn store_last_sync(state_dir: &Path, sync: &SyncResponse) -> Result<(), NodeError> {
    let path = state_dir.join(LAST_SYNC_FILE);
    let bytes = serde_json::to_vec_pretty(sync).map_err(|e| NodeError::LastSync {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomic(&path, &bytes, 0o600)
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The state folder failed.
    #[error(transparent)]
    State(#[from] NodeError),
    /// A key could not be generated.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A CSR could not be built.
    #[error(transparent)]
    Csr(#[from] crate::csr::CsrError),
    /// The holder refused or could not be reached.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The holder's answer was not a usable SVID.
    #[error("the holder's node SVID is unusable: {0}")]
    Svid(#[from] SvidError),
}

/// Joins the holder with a one-time token: a fresh node key, a CSR, the node SVID back; stored
/// in the state folder and returned, with the first sync answer the join carries.
pub async fn join<I: Issuer>(
    issuer: &I,
    config: &Config,
    token: &str,
) -> Result<(NodeIdentity, SyncResponse), JoinError> {
    let key = generate_key(config.key_algorithm).await?;
    let request = AttestRequest {
        token: token.to_owned(),
        csr: crate::csr::build(&key, None)?.into(),
    };
    let response = issuer.attest(request).await?;
    let identity = NodeIdentity::new(
        key,
        response.svid.chain.iter().map(|c| c.0.clone()).collect(),
    )?;
    if response.node != config.node_name || response.mesh != config.mesh {
        tracing::warn!(
            holder_node = %response.node,
            holder_mesh = %response.mesh,
            node = %config.node_name,
            mesh = %config.mesh,
            "the join token was for another node name or mesh than the config says; using the holder's"
        );
    }
    store(&config.state_dir, &identity)?;
    let seed = SyncResponse {
        node: response.node,
        mesh: response.mesh,
        trust_domain: identity.info.spiffe_id.trust_domain().clone(),
        enforcement: Enforcement::MeshDefault,
        entries: Vec::new(),
        bundles: response.bundles,
    };
    Ok((identity, seed))
}

/// Why a node SVID renewal failed, and whether it was because the holder is down.
#[derive(Debug, Clone)]
pub struct RenewFailure {
    /// What failed.
    pub message: String,
    /// The holder as a whole could not serve (the renewal waits for it, not backed off).
    pub holder_down: bool,
}

impl RenewFailure {
    fn other(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            holder_down: false,
        }
    }
}

/// Renews the node SVID: a fresh key, a CSR, the holder's new SVID, stored in `state_dir` and
/// put in use by `issuer`. Returns the new leaf.
pub async fn renew<I: Issuer>(
    issuer: &I,
    algorithm: KeyAlgorithm,
    state_dir: &Path,
) -> Result<NodeCertificate, RenewFailure> {
    let key = generate_key(algorithm).await.map_err(RenewFailure::other)?;
    let csr = crate::csr::build(&key, None).map_err(RenewFailure::other)?;
    let response = issuer
        .renew(RenewRequest { csr: csr.into() })
        .await
        .map_err(|e| RenewFailure {
            message: e.to_string(),
            holder_down: e.is_holder_down(),
        })?;
    let chain = response.svid.chain.into_iter().map(|c| c.0).collect();
    let identity = NodeIdentity::new(key, chain).map_err(RenewFailure::other)?;
    store(state_dir, &identity).map_err(RenewFailure::other)?;
    issuer
        .set_identity(&identity.chain, &identity.key)
        .map_err(RenewFailure::other)?;
    Ok(identity.certificate())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use meshcert_protocol::SpiffeId;

    use super::*;
    use crate::csr;
    use crate::keys::KeyAlgorithm;
    use crate::svid::testca::TestCa;

    fn identity(ca: &TestCa) -> NodeIdentity {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let id = SpiffeId::new("spiffe://mesh-a.test/meshcert/node/n1").expect("id");
        let chain = ca.sign(
            &csr::build(&key, None).expect("csr"),
            &id,
            SystemTime::now(),
            Duration::from_secs(3600),
        );
        NodeIdentity::new(key, chain).expect("matches")
    }

    #[test]
    fn store_then_load_with_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        assert!(load(&state).expect("empty").is_none());
        let ca = TestCa::new();
        let first = identity(&ca);
        store(&state, &first).expect("store");
        let mode = fs::metadata(state.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load(&state).expect("load").expect("present");
        assert_eq!(back.chain, first.chain);
        assert_eq!(back.key.pkcs8_der(), first.key.pkcs8_der());

        let second = identity(&ca);
        store(&state, &second).expect("replace");
        let back = load(&state).expect("load").expect("present");
        assert_eq!(back.info.serial, second.info.serial);
    }

    #[test]
    fn interrupted_replacement_is_finished_or_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let ca = TestCa::new();
        let old = identity(&ca);
        store(state, &old).expect("store");
        let new = identity(&ca);
        // Crash after the new key was written, before the certificate: old pair kept.
        write_new(
            &state.join("node.key.next"),
            new.key.to_pem().as_bytes(),
            0o600,
        )
        .expect("write");
        let back = load(state).expect("load").expect("present");
        assert_eq!(back.info.serial, old.info.serial);
        // Crash after both .next files were written, before any rename: old pair kept.
        write_new(
            &state.join("node.pem.next"),
            svid::certs_to_pem(&new.chain).as_bytes(),
            0o644,
        )
        .expect("write");
        write_new(
            &state.join("node.key.next"),
            new.key.to_pem().as_bytes(),
            0o600,
        )
        .expect("write");
        let back = load(state).expect("load").expect("present");
        assert_eq!(back.info.serial, old.info.serial);
        // Crash between the key rename and the certificate rename: new pair completed.
        write_new(
            &state.join("node.pem.next"),
            svid::certs_to_pem(&new.chain).as_bytes(),
            0o644,
        )
        .expect("write");
        write_atomic(&state.join(KEY_FILE), new.key.to_pem().as_bytes(), 0o600).expect("write");
        let back = load(state).expect("load").expect("present");
        assert_eq!(back.info.serial, new.info.serial);
    }

    #[test]
    fn mismatched_pair_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let a = identity(&ca);
        let b = identity(&ca);
        store(dir.path(), &a).expect("store");
        write_atomic(&dir.path().join(KEY_FILE), b.key.to_pem().as_bytes(), 0o600).expect("w");
        assert!(matches!(load(dir.path()), Err(NodeError::Cert { .. })));
    }
}
