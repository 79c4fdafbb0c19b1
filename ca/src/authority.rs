//! The certificate authority: the root (generated once and persisted, or provided), one ECDSA
//! P-256 intermediate per mesh, and the signing of leaf SVIDs and the API's server certificate.
//!
//! Shared trust: one root signs every mesh's intermediate. Limited trust: each mesh has its own
//! root signing its intermediate, and the shared root signs one more intermediate per mesh, the
//! gateway intermediate, which signs gateways' second SVIDs.
//!
//! Files in the state folder: `root.key` (PKCS#8 PEM, mode 0600 from creation), `root.pem`,
//! under limited trust `roots/<mesh>.key|.pem` (builtin mesh roots),
//! `intermediates/<mesh>.key` (0600) and `intermediates/<mesh>.pem`, and
//! `intermediates/gateway/<mesh>.key|.pem`. A root certificate without
//! a usable key is an error naming the file, never a reason to generate a new root.
//!
//! One file past 600 lines on purpose: which key signs what (root, intermediates, gateway
//! intermediates, leaves, the server certificate), their validity and backdating, and the
//! checks of the chains nodes present are one set of rules; apart, a change to one link would
//! not be seen beside the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshcert_protocol::api::{Bundles, Der};
use meshcert_protocol::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};
use zeroize::Zeroizing;

use crate::config::{Mesh, RootSource};

/// Clock skew allowance: leaves start this far in the past.
pub const BACKDATE: Duration = Duration::from_secs(10);
/// Longest intermediate lifetime.
pub const INTERMEDIATE_MAX_LIFETIME: Duration = Duration::from_secs(30 * 86400);
/// Longest server certificate lifetime.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 86400);

/// Why the authority cannot load, create or sign.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unusable (corrupt key, not a CA, mismatched key...).
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Key generation or signing failed.
    #[error("cannot {what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The failure.
        #[source]
        source: rcgen::Error,
    },
    /// No intermediate for this mesh.
    #[error("no intermediate for mesh `{0}`")]
    UnknownMesh(String),
}

fn crypto(what: &'static str) -> impl FnOnce(rcgen::Error) -> AuthorityError {
    move |source| AuthorityError::Crypto { what, source }
}

/// A CA certificate with its key: the root or an intermediate.
pub struct SigningCa {
    /// The certificate (DER).
    pub der: Vec<u8>,
    /// The certificate's name, key identifier and usages with its key, read from `der` once
    /// (not again for every certificate it signs).
    issuer: Issuer<'static, KeyPair>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("fingerprint", &fingerprint(&self.der))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl SigningCa {
    fn from_parts(der: Vec<u8>, key: KeyPair, path: &Path) -> Result<Self, AuthorityError> {
        let bad = |reason: String| AuthorityError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("the private key does not match the certificate".into()));
        }
        let (not_before, not_after) = validity(&cert);
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(der.as_slice()), key)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        Ok(Self {
            der,
            issuer,
            not_before,
            not_after,
        })
    }

    fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn key(&self) -> &KeyPair {
        self.issuer.key()
    }

    /// The certificate as PEM.
    pub fn pem(&self) -> String {
        to_pem(&self.der)
    }

    /// SHA-256 fingerprint of the certificate, lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }
}

/// The PEM form of a DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// SHA-256 of `der`, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    (
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    )
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random positive serial number of 16 octets (RFC 5280 allows up to 20).
pub fn random_serial() -> Vec<u8> {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // Never expected; fastrand is still unpredictable enough for a serial.
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes[0] = (bytes[0] & 0x7f).max(1);
    bytes.to_vec()
}

/// A public key taken from a CSR, used verbatim (its exact SubjectPublicKeyInfo) in the leaf.
#[derive(Debug, Clone)]
pub struct CsrKey {
    /// The SubjectPublicKeyInfo DER from the CSR.
    pub spki: Vec<u8>,
    /// The subject public key bits.
    pub raw: Vec<u8>,
    /// The algorithm rcgen writes into the certificate's SubjectPublicKeyInfo: it must match
    /// the key (rsaEncryption, or id-ecPublicKey with the key's curve).
    pub alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki.clone()
    }
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf certificate.
    pub leaf: Vec<u8>,
    /// The intermediate that signed it.
    pub intermediate: Vec<u8>,
    /// Serial, lowercase hex.
    pub serial: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The X509-SVID leaf parameters for `id`; pure, so its rules are unit-tested.
///
/// `notBefore = now − 10 s`, `notAfter = min(now + ttl, now + max_ttl, ca_not_after)`.
pub fn leaf_params(
    id: &SpiffeId,
    rsa: bool,
    serial: &[u8],
    now: SystemTime,
    ttl: Duration,
    max_ttl: Duration,
    ca_not_after: SystemTime,
) -> Result<CertificateParams, AuthorityError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| AuthorityError::Crypto {
            what: "encode the SPIFFE ID",
            source: e,
        })?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.is_ca = IsCa::ExplicitNoCa;
    // digitalSignature always; keyEncipherment only for RSA keys (RSA key transport).
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.not_before = (now - BACKDATE).into();
    let end = (now + ttl.min(max_ttl)).min(ca_not_after);
    p.not_after = end.into();
    Ok(p)
}

/// Makes a rename or a new entry in `dir` durable: fsync of the folder itself.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    meshcert_daemon::fs::sync_dir(dir)
}

/// Writes `bytes` to `path` atomically with `mode` from creation ([`meshcert_daemon::fs`]).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuthorityError> {
    meshcert_daemon::fs::write_atomic(path, bytes, mode).map_err(|source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key (PEM) with mode 0600 from creation; the caller's text is zeroised by
/// the caller ([`Zeroizing`]).
pub(crate) fn write_private(path: &Path, text: &Zeroizing<String>) -> Result<(), AuthorityError> {
    write_atomic(path, text.as_bytes(), 0o600)
}

/// Writes a public file (certificate) atomically.
pub(crate) fn write_public(path: &Path, text: &str) -> Result<(), AuthorityError> {
    write_atomic(path, text.as_bytes(), 0o644)
}

fn read_key(path: &Path) -> Result<KeyPair, AuthorityError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| AuthorityError::Io {
                path: path.to_owned(),
                source,
            })?,
        );
    KeyPair::from_pem(&text).map_err(|e| AuthorityError::BadFile {
        path: path.to_owned(),
        reason: format!("not a usable private key ({e})"),
    })
}

fn read_cert(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    let text = std::fs::read(path).map_err(|source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    })?;
    let block = pem::parse(&text).map_err(|e| AuthorityError::BadFile {
        path: path.to_owned(),
        reason: format!("not a PEM certificate ({e})"),
    })?;
    Ok(block.into_contents())
}

/// Checks that a certificate can serve as a root now: CA, keyCertSign, in validity, RSA ≥ 2048.
pub fn check_root(der: &[u8], now: SystemTime) -> Result<(), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err("the certificate is not a CA (basic constraints cA is not true)".into());
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err("the certificate's key usage lacks keyCertSign".into());
    }
    let (nb, na) = validity(&cert);
    if now < nb {
        return Err(format!(
            "the certificate is not valid before {}",
            rfc3339(nb)
        ));
    }
    if now >= na {
        return Err(format!("the certificate expired at {}", rfc3339(na)));
    }
    if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = cert.public_key().parsed()
        && rsa.key_size() < 2048
    {
        return Err(format!(
            "the RSA key has {} bits; at least 2048 are required",
            rsa.key_size()
        ));
    }
    Ok(())
}

/// RFC 3339 text of a time, for messages and status.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Creates a folder (and its parents) and makes the new entries durable: the folders the
/// holder creates are at most two levels deep (`intermediates/gateway`), so the parent and
/// grandparent are fsync'd.
pub(crate) fn create_dir(dir: &Path) -> Result<(), AuthorityError> {
    let io = |source| AuthorityError::Io {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    for parent in dir.ancestors().skip(1).take(2) {
        if !parent.as_os_str().is_empty() {
            sync_dir(parent).map_err(io)?;
        }
    }
    Ok(())
}

/// Loads the root, or generates and persists the builtin one (`root.pem`, `root.key`) on first
/// start.
pub fn load_or_create_root(
    source: &RootSource,
    common_name: &str,
    state_dir: &Path,
    now: SystemTime,
) -> Result<SigningCa, AuthorityError> {
    load_or_create_root_at(
        source,
        common_name,
        &state_dir.join("root.pem"),
        &state_dir.join("root.key"),
        now,
    )
}

/// Loads a root, or generates and persists a builtin one at the given paths.
pub(crate) fn load_or_create_root_at(
    source: &RootSource,
    common_name: &str,
    builtin_cert: &Path,
    builtin_key: &Path,
    now: SystemTime,
) -> Result<SigningCa, AuthorityError> {
    let (cert_path, key_path) = match source {
        RootSource::Provided {
            cert_file,
            key_file,
        } => (cert_file.clone(), key_file.clone()),
        RootSource::Builtin { .. } => (builtin_cert.to_owned(), builtin_key.to_owned()),
    };
    let bad = |path: &Path, reason: String| AuthorityError::BadFile {
        path: path.to_owned(),
        reason,
    };
    if cert_path.exists() || matches!(source, RootSource::Provided { .. }) {
        let der = read_cert(&cert_path)?;
        if !key_path.exists() {
            return Err(bad(
                &key_path,
                format!(
                    "missing, but the root certificate {} exists; restore the key (a new root is never generated over an existing one)",
                    cert_path.display()
                ),
            ));
        }
        check_root(&der, now).map_err(|r| bad(&cert_path, r))?;
        let key = read_key(&key_path)?;
        return SigningCa::from_parts(der, key, &cert_path)
            .map_err(|e| bad(&key_path, e.to_string()));
    }
    let RootSource::Builtin {
        ttl_days,
        rsa_bits,
        org_name,
    } = source
    else {
        return Err(bad(&cert_path, "missing".into()));
    };
    // A key without a certificate is what a crash between the two writes leaves: reuse it.
    let key = if key_path.exists() {
        read_key(&key_path)?
    } else {
        let size = match rsa_bits {
            2048 => rcgen::RsaKeySize::_2048,
            3072 => rcgen::RsaKeySize::_3072,
            _ => rcgen::RsaKeySize::_4096,
        };
        tracing::info!(bits = rsa_bits, "generating the root key");
        let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
            .map_err(crypto("generate the root key"))?;
        write_private(&key_path, &Zeroizing::new(key.serialize_pem()))?;
        key
    };
    let params = root_params(common_name, org_name, *ttl_days, now);
    let cert = params
        .self_signed(&key)
        .map_err(crypto("sign the root certificate"))?;
    write_public(&cert_path, &cert.pem())?;
    tracing::info!(path = %cert_path.display(), "root certificate created");
    SigningCa::from_parts(cert.der().to_vec(), key, &cert_path)
}

/// Loads and checks a provided root (certificate and key files).
pub fn load_root(source: &RootSource, now: SystemTime) -> Result<SigningCa, AuthorityError> {
    let none = Path::new("/nonexistent");
    load_or_create_root_at(source, "", none, none, now)
}

/// Generates a new root with the builtin parameters, in memory (see [`persist_root`]).
pub fn generate_root(
    common_name: &str,
    org_name: &str,
    rsa_bits: u32,
    ttl_days: u32,
    now: SystemTime,
) -> Result<SigningCa, AuthorityError> {
    let size = match rsa_bits {
        2048 => rcgen::RsaKeySize::_2048,
        3072 => rcgen::RsaKeySize::_3072,
        _ => rcgen::RsaKeySize::_4096,
    };
    tracing::info!(bits = rsa_bits, "generating the next root key");
    let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
        .map_err(crypto("generate the root key"))?;
    let cert = root_params(common_name, org_name, ttl_days, now)
        .self_signed(&key)
        .map_err(crypto("sign the root certificate"))?;
    SigningCa::from_parts(cert.der().to_vec(), key, Path::new("(new root)"))
}

/// Writes a root to a provided source's files: the key (0600 from creation) first, then the
/// certificate, each atomically.
pub fn persist_root(ca: &SigningCa, to: &RootSource) -> Result<(), AuthorityError> {
    let RootSource::Provided {
        cert_file,
        key_file,
    } = to
    else {
        return Err(AuthorityError::UnknownMesh(
            "(a builtin source has no files)".into(),
        ));
    };
    write_private(key_file, &Zeroizing::new(ca.key().serialize_pem()))?;
    write_public(cert_file, &ca.pem())
}

/// The builtin root's parameters.
pub fn root_params(
    common_name: &str,
    org_name: &str,
    ttl_days: u32,
    now: SystemTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org_name);
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    // Backdated like every certificate the holder makes: a replica whose clock (or start) is a
    // little behind the one that generated a shared root still accepts it.
    let start = now - BACKDATE;
    p.not_before = start.into();
    p.not_after = (start + Duration::from_secs(u64::from(ttl_days) * 86400)).into();
    p
}

/// Whether an intermediate valid from `not_before` to `not_after` is due for renewal at `now`
/// (it has reached half of its life).
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    now >= not_before + life / 2
}

fn aki_of(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

fn ski_of(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

/// The URI SANs of `cert`, in order (none when it has no SAN).
pub fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Creates an intermediate for `td` signed by `root`.
fn create_intermediate(
    root: &SigningCa,
    mesh: &str,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<SigningCa, AuthorityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(crypto("generate an intermediate key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("meshcert intermediate {mesh}"));
    p.distinguished_name = dn;
    let uri = td
        .id_string()
        .try_into()
        .map_err(crypto("encode the trust domain"))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let start = (now - BACKDATE).max(root.not_before);
    p.not_before = start.into();
    p.not_after = (now + INTERMEDIATE_MAX_LIFETIME).min(root.not_after).into();
    let cert = p
        .signed_by(&key, root.issuer())
        .map_err(crypto("sign an intermediate"))?;
    let (_, parsed) =
        X509Certificate::from_der(cert.der()).map_err(|e| AuthorityError::BadFile {
            path: PathBuf::from(mesh),
            reason: e.to_string(),
        })?;
    let (not_before, not_after) = validity(&parsed);
    let issuer =
        Issuer::from_ca_cert_der(cert.der(), key).map_err(crypto("read the new intermediate"))?;
    Ok(SigningCa {
        der: cert.der().to_vec(),
        issuer,
        not_before,
        not_after,
    })
}

/// Which intermediate: the mesh's own (signs its workloads and nodes) or, under limited trust,
/// its gateway intermediate (signed by the shared root; signs gateway SVIDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Mesh,
    Gateway,
}

/// The shared root, under limited trust each mesh's own root, the per-mesh intermediates, and
/// signing.
#[derive(Debug)]
pub struct Authority {
    /// The shared root that signs.
    root: SigningCa,
    /// The fingerprint of the configured shared root (which a finished rotation may replace).
    configured: String,
    /// PREPARED: the next shared root, in the bundles, not signing.
    next: Option<SigningCa>,
    /// ACTIVE: the previous shared root, in the bundles, signing the API's server certificate.
    previous: Option<SigningCa>,
    /// Under limited trust, each mesh's own root that signs.
    mesh_roots: BTreeMap<String, SigningCa>,
    /// A mesh root's rotation, as `next` and `previous` are for the shared root.
    mesh_next: BTreeMap<String, SigningCa>,
    mesh_previous: BTreeMap<String, SigningCa>,
    /// The fingerprint of each mesh root the configuration names.
    mesh_configured: BTreeMap<String, String>,
    meshes: Vec<Mesh>,
    dir: PathBuf,
    intermediates: RwLock<BTreeMap<(Kind, String), Arc<SigningCa>>>,
}

impl Authority {
    /// Loads (or creates) the root and every mesh's intermediate: shared trust.
    pub fn open(
        source: &RootSource,
        common_name: &str,
        meshes: &[Mesh],
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        Self::open_with_roots(
            source,
            &BTreeMap::new(),
            common_name,
            meshes,
            state_dir,
            now,
        )
    }

    /// [`Self::open_with_plan`] without a rotation.
    pub fn open_with_roots(
        source: &RootSource,
        mesh_roots: &BTreeMap<String, RootSource>,
        common_name: &str,
        meshes: &[Mesh],
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let plan = crate::rotation::RootPlan::default();
        Self::open_with_plan(
            source,
            mesh_roots,
            common_name,
            meshes,
            state_dir,
            now,
            &plan,
        )
    }

    /// Loads (or creates) the shared root, the mesh roots (limited trust when `mesh_roots` is
    /// not empty; builtin ones live in `roots/<mesh>.pem|.key`), every mesh's intermediate and,
    /// under limited trust, every mesh's gateway intermediate (`intermediates/gateway/`).
    /// The shared root follows the rotation `plan` ([`crate::rotation`]).
    pub fn open_with_plan(
        source: &RootSource,
        mesh_roots: &BTreeMap<String, RootSource>,
        common_name: &str,
        meshes: &[Mesh],
        state_dir: &Path,
        now: SystemTime,
        plan: &crate::rotation::RootPlan,
    ) -> Result<Self, AuthorityError> {
        let configured = load_or_create_root(source, common_name, state_dir, now)?;
        let configured_fp = configured.fingerprint();
        let (root, next, previous) = follow_plan(configured, plan, now)?;
        let mut roots = BTreeMap::new();
        let (mut mesh_next, mut mesh_previous) = (BTreeMap::new(), BTreeMap::new());
        let mut mesh_configured = BTreeMap::new();
        if !mesh_roots.is_empty() {
            let dir = state_dir.join("roots");
            create_dir(&dir)?;
            for m in meshes {
                let Some(src) = mesh_roots.get(&m.name) else {
                    return Err(AuthorityError::UnknownMesh(m.name.clone()));
                };
                let ca = load_or_create_root_at(
                    src,
                    &format!("{common_name} mesh {}", m.name),
                    &dir.join(format!("{}.pem", m.name)),
                    &dir.join(format!("{}.key", m.name)),
                    now,
                )?;
                if ca.der == root.der {
                    return Err(AuthorityError::BadFile {
                        path: dir.join(format!("{}.pem", m.name)),
                        reason: "is the shared root; limited trust needs a root per mesh".into(),
                    });
                }
                mesh_configured.insert(m.name.clone(), ca.fingerprint());
                let own = plan.meshes.get(&m.name).cloned().unwrap_or_default();
                let (signing, next, previous) = follow_plan(ca, &own, now)?;
                roots.insert(m.name.clone(), signing);
                mesh_next.extend(next.map(|n| (m.name.clone(), n)));
                mesh_previous.extend(previous.map(|p| (m.name.clone(), p)));
            }
        }
        let dir = state_dir.join("intermediates");
        create_dir(&dir.join("gateway"))?;
        let this = Self {
            root,
            configured: configured_fp,
            next,
            previous,
            mesh_roots: roots,
            mesh_next,
            mesh_previous,
            mesh_configured,
            meshes: meshes.to_vec(),
            dir,
            intermediates: RwLock::new(BTreeMap::new()),
        };
        for (kind, m) in this.slots() {
            let ca = match this.load_intermediate(kind, m, now) {
                Some(ca) => ca,
                None => this.renew(kind, m, now)?,
            };
            this.set(kind, &m.name, ca);
        }
        Ok(this)
    }

    /// Whether each mesh has its own root.
    pub fn limited(&self) -> bool {
        !self.mesh_roots.is_empty()
    }

    fn slots(&self) -> Vec<(Kind, &Mesh)> {
        let mut out: Vec<(Kind, &Mesh)> = self.meshes.iter().map(|m| (Kind::Mesh, m)).collect();
        if self.limited() {
            out.extend(self.meshes.iter().map(|m| (Kind::Gateway, m)));
        }
        out
    }

    /// The root that signs a slot's intermediate.
    fn signer(&self, kind: Kind, mesh: &str) -> &SigningCa {
        match kind {
            Kind::Mesh => self.mesh_roots.get(mesh).unwrap_or(&self.root),
            Kind::Gateway => &self.root,
        }
    }

    fn paths(&self, kind: Kind, mesh: &str) -> (PathBuf, PathBuf) {
        let dir = match kind {
            Kind::Mesh => self.dir.clone(),
            Kind::Gateway => self.dir.join("gateway"),
        };
        (
            dir.join(format!("{mesh}.pem")),
            dir.join(format!("{mesh}.key")),
        )
    }

    fn set(&self, kind: Kind, mesh: &str, ca: Arc<SigningCa>) {
        let mut map = self
            .intermediates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert((kind, mesh.to_owned()), ca);
    }

    fn get(&self, kind: Kind, mesh: &str) -> Option<Arc<SigningCa>> {
        self.intermediates
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(kind, mesh.to_owned()))
            .cloned()
    }

    /// A persisted intermediate that is signed by its root, for the right trust domain,
    /// and not yet due for renewal.
    fn load_intermediate(&self, kind: Kind, m: &Mesh, now: SystemTime) -> Option<Arc<SigningCa>> {
        let (cert_path, key_path) = self.paths(kind, &m.name);
        let der = read_cert(&cert_path).ok()?;
        let key = read_key(&key_path).ok()?;
        let ca = SigningCa::from_parts(der, key, &cert_path).ok()?;
        let (_, cert) = X509Certificate::from_der(&ca.der).ok()?;
        let (_, root) = X509Certificate::from_der(&self.signer(kind, &m.name).der).ok()?;
        let ok = aki_of(&cert).is_some()
            && aki_of(&cert) == ski_of(&root)
            && uri_sans(&cert) == vec![m.trust_domain.id_string()]
            && !renewal_due(ca.not_before, ca.not_after, now);
        ok.then(|| Arc::new(ca))
    }

    /// Creates and persists a new intermediate for a slot.
    fn renew(
        &self,
        kind: Kind,
        m: &Mesh,
        now: SystemTime,
    ) -> Result<Arc<SigningCa>, AuthorityError> {
        let label = match kind {
            Kind::Mesh => m.name.clone(),
            Kind::Gateway => format!("{} gateway", m.name),
        };
        let ca = create_intermediate(self.signer(kind, &m.name), &label, &m.trust_domain, now)?;
        let (cert_path, key_path) = self.paths(kind, &m.name);
        write_private(&key_path, &Zeroizing::new(ca.key().serialize_pem()))?;
        write_public(&cert_path, &ca.pem())?;
        tracing::info!(mesh = %m.name, gateway = (kind == Kind::Gateway), not_after = %rfc3339(ca.not_after), "intermediate issued");
        Ok(Arc::new(ca))
    }

    /// Renews every intermediate past half of its life; returns the meshes renewed (gateway
    /// intermediates as `<mesh> (gateway)`).
    pub fn renew_due(&self, now: SystemTime) -> Result<Vec<String>, AuthorityError> {
        let mut renewed = Vec::new();
        for (kind, m) in self.slots() {
            let due = self
                .get(kind, &m.name)
                .is_none_or(|ca| renewal_due(ca.not_before, ca.not_after, now));
            if due {
                let ca = self.renew(kind, m, now)?;
                self.set(kind, &m.name, ca);
                renewed.push(match kind {
                    Kind::Mesh => m.name.clone(),
                    Kind::Gateway => format!("{} (gateway)", m.name),
                });
            }
        }
        Ok(renewed)
    }

    /// The virtual mesh's (shared) root: the one that signs.
    pub fn root(&self) -> &SigningCa {
        &self.root
    }

    /// PREPARED: the next shared root (in the bundles, not signing yet).
    pub fn next_root(&self) -> Option<&SigningCa> {
        self.next.as_ref()
    }

    /// ACTIVE: the previous shared root (still in the bundles).
    pub fn previous_root(&self) -> Option<&SigningCa> {
        self.previous.as_ref()
    }

    /// The fingerprint of the shared root the configuration names.
    pub fn configured_fingerprint(&self) -> &str {
        &self.configured
    }

    /// Every shared root in the bundles: the signing one first, then the next or previous.
    pub fn shared_roots(&self) -> Vec<&SigningCa> {
        std::iter::once(&self.root)
            .chain(self.next.as_ref())
            .chain(self.previous.as_ref())
            .collect()
    }

    /// The roots a mesh's SVIDs may chain to: under limited trust its own (the signing one
    /// first, then the next or previous one of its rotation), else every shared root in the
    /// bundles.
    pub fn trust_roots(&self, mesh: &str) -> Vec<&SigningCa> {
        match self.mesh_roots.get(mesh) {
            Some(r) => std::iter::once(r)
                .chain(self.mesh_next.get(mesh))
                .chain(self.mesh_previous.get(mesh))
                .collect(),
            None => self.shared_roots(),
        }
    }

    /// A mesh's own root under limited trust: the one that signs.
    pub fn mesh_root(&self, mesh: &str) -> Option<&SigningCa> {
        self.mesh_roots.get(mesh)
    }

    /// PREPARED: a mesh's next own root (in its bundle, not signing yet).
    pub fn mesh_next_root(&self, mesh: &str) -> Option<&SigningCa> {
        self.mesh_next.get(mesh)
    }

    /// ACTIVE: a mesh's previous own root (still in its bundle).
    pub fn mesh_previous_root(&self, mesh: &str) -> Option<&SigningCa> {
        self.mesh_previous.get(mesh)
    }

    /// The fingerprint of the mesh root the configuration names (limited trust).
    pub fn mesh_configured_fingerprint(&self, mesh: &str) -> Option<&str> {
        self.mesh_configured.get(mesh).map(String::as_str)
    }

    /// The root a mesh's SVIDs chain to: its own under limited trust, else the shared one.
    pub fn trust_root(&self, mesh: &str) -> &SigningCa {
        self.signer(Kind::Mesh, mesh)
    }

    /// The current intermediate of a mesh.
    pub fn intermediate(&self, mesh: &str) -> Option<Arc<SigningCa>> {
        self.get(Kind::Mesh, mesh)
    }

    /// The current gateway intermediate of a mesh (limited trust only).
    pub fn gateway_intermediate(&self, mesh: &str) -> Option<Arc<SigningCa>> {
        self.get(Kind::Gateway, mesh)
    }

    /// Checks that `chain` (leaf first, as the client presented it) is a node SVID of `mesh`:
    /// it verifies (rustls-webpki, client auth, at `now`) against that mesh's own root only
    /// (its own under limited trust, the shared root otherwise), through exactly one
    /// intermediate, which is one of the mesh's (its URI SAN is the mesh's trust domain). Under
    /// limited trust this keeps whoever holds another mesh's root from speaking for this mesh's
    /// nodes.
    pub fn verify_node_chain(
        &self,
        mesh: &Mesh,
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<(), String> {
        let leaf = chain.first().ok_or("no client certificate")?;
        let roots: Vec<CertificateDer<'_>> = self
            .trust_roots(&mesh.name)
            .into_iter()
            .map(|r| CertificateDer::from(r.der.as_slice()))
            .collect();
        let anchors = roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the mesh root: {e}"))?;
        let leaf = CertificateDer::from(leaf.as_slice());
        let end_entity = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let time = rustls::pki_types::UnixTime::since_unix_epoch(
            now.duration_since(UNIX_EPOCH).unwrap_or_default(),
        );
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| format!("{e:?}"))?;
        let issuers: Vec<_> = path.intermediate_certificates().collect();
        let [issuer] = issuers.as_slice() else {
            return Err(format!(
                "the chain has {} intermediates; a node SVID has exactly one, its mesh's",
                issuers.len()
            ));
        };
        let der = issuer.der();
        let own = X509Certificate::from_der(&der)
            .ok()
            .is_some_and(|(_, c)| uri_sans(&c) == vec![mesh.trust_domain.id_string()]);
        if !own {
            return Err(format!(
                "its intermediate is not one of mesh `{}`'s (URI SAN `{}`)",
                mesh.name,
                mesh.trust_domain.id_string()
            ));
        }
        Ok(())
    }

    /// Every root a node SVID may chain to: the shared root and every mesh root.
    pub fn client_roots(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = self.shared_roots().iter().map(|r| r.der.clone()).collect();
        out.extend(
            self.mesh_roots
                .values()
                .chain(self.mesh_next.values())
                .chain(self.mesh_previous.values())
                .map(|r| r.der.clone()),
        );
        out
    }

    /// The bundles at `version`: each trust domain's root (its own under limited trust, the
    /// shared root under shared trust) and, under limited trust, the shared root.
    pub fn bundles(&self, version: u64) -> Bundles {
        Bundles {
            version,
            trust_domains: self
                .meshes
                .iter()
                .map(|m| {
                    (
                        m.trust_domain.clone(),
                        self.trust_roots(&m.name)
                            .into_iter()
                            .map(|r| Der(r.der.clone()))
                            .collect(),
                    )
                })
                .collect(),
            shared_root: if self.limited() {
                self.shared_roots()
                    .into_iter()
                    .map(|r| Der(r.der.clone()))
                    .collect()
            } else {
                Vec::new()
            },
            rotation: None,
        }
    }

    /// SHA-256 over every bundle's content (not its version): it changes exactly when a bundle
    /// does.
    pub fn bundle_digest(&self) -> String {
        let b = self.bundles(0);
        let mut text = Vec::new();
        for (td, certs) in &b.trust_domains {
            text.extend_from_slice(td.to_string().as_bytes());
            text.push(0);
            for c in certs {
                text.extend_from_slice(fingerprint(&c.0).as_bytes());
                text.push(0);
            }
        }
        text.extend_from_slice(b"shared\0");
        for c in &b.shared_root {
            text.extend_from_slice(fingerprint(&c.0).as_bytes());
        }
        fingerprint(&text)
    }

    /// Signs a leaf SVID for `id` with the mesh's intermediate.
    pub fn sign_leaf(
        &self,
        mesh: &str,
        key: &CsrKey,
        id: &SpiffeId,
        ttl: Duration,
        max_ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        self.sign_with(Kind::Mesh, mesh, key, id, ttl, max_ttl, now)
    }

    /// Signs a gateway's second SVID for `id` with the mesh's gateway intermediate (chained to
    /// the shared root); limited trust only.
    pub fn sign_gateway_leaf(
        &self,
        mesh: &str,
        key: &CsrKey,
        id: &SpiffeId,
        ttl: Duration,
        max_ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        self.sign_with(Kind::Gateway, mesh, key, id, ttl, max_ttl, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_with(
        &self,
        kind: Kind,
        mesh: &str,
        key: &CsrKey,
        id: &SpiffeId,
        ttl: Duration,
        max_ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        let ca = self
            .get(kind, mesh)
            .ok_or_else(|| AuthorityError::UnknownMesh(mesh.to_owned()))?;
        let serial = random_serial();
        let rsa = key.alg == &rcgen::PKCS_RSA_SHA256;
        let params = leaf_params(id, rsa, &serial, now, ttl, max_ttl, ca.not_after)?;
        let not_after = (now + ttl.min(max_ttl)).min(ca.not_after);
        let cert = params
            .signed_by(key, ca.issuer())
            .map_err(crypto("sign a leaf"))?;
        Ok(Issued {
            leaf: cert.der().to_vec(),
            intermediate: ca.der.clone(),
            serial: hex(&serial),
            not_after,
        })
    }

    /// A fresh server certificate for the API (signed by the root) and its key (zeroised when
    /// dropped; hand rustls [`KeyPair::serialized_der`], a borrow, not a copy).
    pub fn server_identity(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(Vec<u8>, KeyPair), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crypto("generate the server key"))?;
        let mut sans: Vec<String> = names.to_vec();
        sans.push("127.0.0.1".into());
        sans.push("::1".into());
        let mut p = CertificateParams::new(sans).map_err(crypto("encode the server names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "meshcert-ca".into()),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        p.not_before = (now - BACKDATE).into();
        // While ACTIVE the previous root signs it: a node that missed the bundle with the next
        // root can still reach the holder and catch up.
        let signer = self.server_root();
        p.not_after = (now + SERVER_CERT_LIFETIME).min(signer.not_after).into();
        let cert = p
            .signed_by(&key, signer.issuer())
            .map_err(crypto("sign the server certificate"))?;
        Ok((cert.der().to_vec(), key))
    }

    /// The root that signs the API's server certificate: the previous root while ACTIVE, else
    /// the signing root.
    pub fn server_root(&self) -> &SigningCa {
        self.previous.as_ref().unwrap_or(&self.root)
    }

    /// The root key size in bits (0 when it is not RSA).
    pub fn root_key_bits(&self) -> usize {
        key_bits(&self.root)
    }

    /// The root's subject organisation.
    pub fn root_org(&self) -> String {
        org_of(&self.root)
    }

    /// The meshes this authority signs for.
    pub fn meshes(&self) -> &[Mesh] {
        &self.meshes
    }
}

/// A root's key size in bits (0 when it is not RSA).
pub fn key_bits(ca: &SigningCa) -> usize {
    X509Certificate::from_der(&ca.der)
        .ok()
        .and_then(|(_, c)| c.public_key().parsed().ok().map(|k| k.key_size()))
        .unwrap_or(0)
}

/// A root's subject organisation.
pub fn org_of(ca: &SigningCa) -> String {
    X509Certificate::from_der(&ca.der)
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_organization()
                .next()
                .and_then(|o| o.as_str().ok().map(str::to_owned))
        })
        .unwrap_or_default()
}

/// Applies a rotation `plan` to the configured root: the root that signs, the next one
/// (PREPARED) and the previous one (ACTIVE). A finished rotation's root replaces the configured one only while the
/// configuration names the root it replaced.
fn follow_plan(
    configured: SigningCa,
    plan: &crate::rotation::RootPlan,
    now: SystemTime,
) -> Result<(SigningCa, Option<SigningCa>, Option<SigningCa>), AuthorityError> {
    let base = match &plan.base {
        Some((replaced, files)) if *replaced == configured.fingerprint() => load_root(files, now)?,
        Some(_) => {
            tracing::warn!(
                "the configuration names another root than the one a finished rotation replaced: the configured root serves"
            );
            configured
        }
        None => configured,
    };
    let next = plan.next.as_ref().map(|f| load_root(f, now)).transpose()?;
    Ok(match next {
        Some(n) if plan.next_signs => (n, None, Some(base)),
        Some(n) => (base, Some(n), None),
        None => (base, None, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MeshType;

    fn mesh() -> Mesh {
        Mesh {
            name: "mesh-a".into(),
            trust_domain: TrustDomain::new("mesh-a.test").expect("valid"),
            mesh_type: MeshType::Generic,
        }
    }

    /// `mesh-a` (see [`mesh`]) and `mesh-b` (trust domain `mesh-b.test`).
    fn two_meshes() -> [Mesh; 2] {
        let mut b = mesh();
        b.name = "mesh-b".into();
        b.trust_domain = TrustDomain::new("mesh-b.test").expect("valid");
        [mesh(), b]
    }

    /// A builtin root of its own for each of `meshes` (limited trust).
    fn builtin_roots(meshes: &[Mesh]) -> BTreeMap<String, RootSource> {
        meshes.iter().map(|m| (m.name.clone(), builtin())).collect()
    }

    fn builtin() -> RootSource {
        RootSource::Builtin {
            ttl_days: 100,
            rsa_bits: 2048,
            org_name: "acme".into(),
        }
    }

    #[test]
    fn root_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let a = Authority::open(&builtin(), "Virtual", &[mesh()], dir.path(), now).expect("open");
        let (_, c) = X509Certificate::from_der(&a.root().der).expect("parse");
        assert_eq!(a.root_key_bits(), 2048);
        assert_eq!(a.root_org(), "acme");
        assert_eq!(
            c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
            100 * 86400
        );
        let bc = c.basic_constraints().expect("ok").expect("present");
        assert!(bc.critical && bc.value.ca);
        let ku = c.key_usage().expect("ok").expect("present");
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert!(ski_of(&c).is_some());
        let serial = c.raw_serial();
        assert!(serial.len() <= 20 && serial[0] & 0x80 == 0);
        let cn = c.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("text"), "Virtual");
        // key file 0600 from creation
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("root.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // intermediate
        let ica = a.intermediate("mesh-a").expect("intermediate");
        let (_, i) = X509Certificate::from_der(&ica.der).expect("parse");
        assert_eq!(uri_sans(&i), vec!["spiffe://mesh-a.test".to_owned()]);
        let bc = i.basic_constraints().expect("ok").expect("present");
        assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint == Some(0));
        assert_eq!(aki_of(&i), ski_of(&c));
        assert!(ica.not_after <= a.root().not_after);
        assert!(i.verify_signature(Some(c.public_key())).is_ok());

        // a restart reuses both
        let again =
            Authority::open(&builtin(), "Virtual", &[mesh()], dir.path(), now).expect("reopen");
        assert_eq!(again.root().der, a.root().der);
        assert_eq!(again.intermediate("mesh-a").expect("i").der, ica.der);
    }

    #[test]
    fn a_lost_root_key_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        Authority::open(&builtin(), "V", &[mesh()], dir.path(), now).expect("open");
        std::fs::write(dir.path().join("root.key"), "garbage").expect("write");
        let err =
            Authority::open(&builtin(), "V", &[mesh()], dir.path(), now).expect_err("corrupt");
        assert!(err.to_string().contains("root.key"), "{err}");
        std::fs::remove_file(dir.path().join("root.key")).expect("rm");
        let err =
            Authority::open(&builtin(), "V", &[mesh()], dir.path(), now).expect_err("missing");
        assert!(err.to_string().contains("root.key"), "{err}");
    }

    #[test]
    fn provided_roots_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let write = |name: &str, params: &CertificateParams, key: &KeyPair| {
            let cert = params.self_signed(key).expect("sign");
            let c = dir.path().join(format!("{name}.pem"));
            let k = dir.path().join(format!("{name}.key"));
            std::fs::write(&c, cert.pem()).expect("w");
            std::fs::write(&k, key.serialize_pem()).expect("w");
            RootSource::Provided {
                cert_file: c,
                key_file: k,
            }
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let good = root_params("r", "o", 10, now);
        let mut not_ca = good.clone();
        not_ca.is_ca = IsCa::ExplicitNoCa;
        let mut expired = good.clone();
        expired.not_before = (now - Duration::from_secs(100 * 86400)).into();
        expired.not_after = (now - Duration::from_secs(86400)).into();
        let mut future = good.clone();
        future.not_before = (now + Duration::from_secs(86400)).into();

        let cases: Vec<(RootSource, Option<&str>)> = vec![
            (write("good", &good, &key), None),
            (write("notca", &not_ca, &key), Some("not a CA")),
            (write("expired", &expired, &key), Some("expired")),
            (write("future", &future, &key), Some("not valid before")),
        ];
        for (source, want) in cases {
            let got = load_or_create_root(&source, "r", dir.path(), now);
            match want {
                None => assert!(got.is_ok(), "{got:?}"),
                Some(w) => {
                    let e = got.expect_err(w).to_string();
                    assert!(e.contains(w), "{e}");
                }
            }
        }
        // an RSA-1024 root (made with openssl: aws-lc-rs does not generate such keys)
        let c = dir.path().join("rsa1024.pem");
        let k = dir.path().join("rsa1024.key");
        let ok = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=weak",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .output()
            .expect("openssl runs")
            .status
            .success();
        assert!(ok, "openssl made the RSA-1024 root");
        // Checked at a time after openssl made it: its not-before is that second, which can be
        // later than `now` (taken at the start of the test) across a second boundary.
        let made = SystemTime::now();
        let source = RootSource::Provided {
            cert_file: c,
            key_file: k,
        };
        let e = load_or_create_root(&source, "r", dir.path(), made).expect_err("weak");
        assert!(e.to_string().contains("1024 bits"), "{e}");
        // a key that does not match
        let source = write("mismatch", &good, &key);
        if let RootSource::Provided { key_file, .. } = &source {
            std::fs::write(key_file, other.serialize_pem()).expect("w");
        }
        let e = load_or_create_root(&source, "r", dir.path(), now).expect_err("mismatch");
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn limited_trust_gives_each_mesh_its_root_and_a_gateway_intermediate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let meshes = two_meshes();
        let roots = builtin_roots(&meshes);
        let open = || {
            Authority::open_with_roots(&builtin(), &roots, "V", &meshes, dir.path(), now)
                .expect("open")
        };
        let a = open();
        assert!(a.limited());
        let ra = a.mesh_root("mesh-a").expect("root a");
        let rb = a.mesh_root("mesh-b").expect("root b");
        assert_ne!(ra.der, rb.der);
        assert_ne!(ra.der, a.root().der);
        let (_, ra_c) = X509Certificate::from_der(&ra.der).expect("parse");
        let (_, shared) = X509Certificate::from_der(&a.root().der).expect("parse");
        let ia = a.intermediate("mesh-a").expect("i");
        let (_, ia_c) = X509Certificate::from_der(&ia.der).expect("parse");
        assert!(
            ia_c.verify_signature(Some(ra_c.public_key())).is_ok(),
            "mesh root signs"
        );
        let ga = a.gateway_intermediate("mesh-a").expect("gateway i");
        let (_, ga_c) = X509Certificate::from_der(&ga.der).expect("parse");
        assert!(
            ga_c.verify_signature(Some(shared.public_key())).is_ok(),
            "shared root signs"
        );
        assert_eq!(uri_sans(&ga_c), vec!["spiffe://mesh-a.test".to_owned()]);
        let bundles = a.bundles(7);
        assert_eq!(bundles.version, 7);
        let td = TrustDomain::new("mesh-a.test").expect("valid");
        assert_eq!(bundles.trust_domains[&td], vec![Der(ra.der.clone())]);
        assert_eq!(bundles.shared_root, vec![Der(a.root().der.clone())]);
        assert_eq!(a.client_roots().len(), 3);
        // A restart reuses everything, so the bundle digest is stable.
        let again = open();
        assert_eq!(again.bundle_digest(), a.bundle_digest());
        assert_eq!(again.gateway_intermediate("mesh-a").expect("g").der, ga.der);
        // Shared trust over the same folder: different bundles, different digest.
        let shared_only =
            Authority::open(&builtin(), "V", &meshes, dir.path(), now).expect("shared");
        assert!(!shared_only.limited());
        assert!(shared_only.bundles(1).shared_root.is_empty());
        assert_ne!(shared_only.bundle_digest(), a.bundle_digest());
        assert!(shared_only.gateway_intermediate("mesh-a").is_none());
    }

    #[test]
    fn a_node_chain_must_end_at_its_own_mesh_root_through_its_own_intermediate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let meshes = two_meshes();
        let a = Authority::open(&builtin(), "V", &meshes, dir.path(), now).expect("open");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let ck = CsrKey {
            spki: key.subject_public_key_info(),
            raw: key.der_bytes().to_vec(),
            alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let id = SpiffeId::new("spiffe://mesh-a.test/meshcert/node/n1").expect("id");
        let ttl = Duration::from_secs(3600);
        let chain = |mesh: &str| {
            let i = a.sign_leaf(mesh, &ck, &id, ttl, ttl, now).expect("signed");
            vec![i.leaf, i.intermediate]
        };
        // Its own mesh's intermediate: accepted.
        assert_eq!(
            a.verify_node_chain(&meshes[0], &chain("mesh-a"), now),
            Ok(())
        );
        // Another mesh's intermediate under the same (shared) root: refused.
        let e = a
            .verify_node_chain(&meshes[0], &chain("mesh-b"), now)
            .expect_err("another mesh's intermediate");
        assert!(e.contains("not one of mesh `mesh-a`'s"), "{e}");
        // The leaf alone, or expired: refused.
        let own = chain("mesh-a");
        assert!(a.verify_node_chain(&meshes[0], &own[..1], now).is_err());
        let later = now + Duration::from_secs(7200);
        assert!(a.verify_node_chain(&meshes[0], &own, later).is_err());
        assert!(a.verify_node_chain(&meshes[0], &[], now).is_err());
    }

    #[test]
    fn a_mesh_root_rotation_changes_only_that_mesh_and_never_admits_another_mesh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let meshes = two_meshes();
        let roots = builtin_roots(&meshes);
        let open = |plan: &crate::rotation::RootPlan| {
            Authority::open_with_plan(&builtin(), &roots, "V", &meshes, dir.path(), now, plan)
                .expect("open")
        };
        let before = open(&crate::rotation::RootPlan::default());
        let next = generate_root("V mesh mesh-a", "acme", 2048, 100, now).expect("next");
        let files = crate::rotation::root_files(dir.path(), &next.fingerprint());
        create_dir(&dir.path().join(crate::rotation::FOLDER)).expect("folder");
        persist_root(&next, &files).expect("persist");
        let mut own = crate::rotation::RootPlan {
            next: Some(files),
            ..Default::default()
        };
        let fps = |a: &Authority, td: &str| -> Vec<String> {
            let td = TrustDomain::new(td).expect("td");
            a.bundles(1).trust_domains[&td]
                .iter()
                .map(|d| fingerprint(&d.0))
                .collect()
        };
        let old_a = before.mesh_root("mesh-a").expect("a").fingerprint();
        let old_b = fps(&before, "mesh-b.test");
        for next_signs in [false, true] {
            own.next_signs = next_signs;
            let plan = crate::rotation::RootPlan {
                meshes: [("mesh-a".to_owned(), own.clone())].into(),
                ..Default::default()
            };
            let a = open(&plan);
            let mut bundle_a = fps(&a, "mesh-a.test");
            bundle_a.sort();
            let mut both = vec![old_a.clone(), next.fingerprint()];
            both.sort();
            assert_eq!(bundle_a, both, "mesh-a trusts both (signs: {next_signs})");
            assert_eq!(fps(&a, "mesh-b.test"), old_b, "mesh-b untouched");
            assert_eq!(a.root().der, before.root().der, "the shared root untouched");
            let signing = a.mesh_root("mesh-a").expect("a").fingerprint();
            assert_eq!(signing == next.fingerprint(), next_signs);
            assert_eq!(
                a.mesh_configured_fingerprint("mesh-a"),
                Some(old_a.as_str())
            );
            // A node chain under mesh-a's intermediate: mesh-a's, never mesh-b's.
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let ck = CsrKey {
                spki: key.subject_public_key_info(),
                raw: key.der_bytes().to_vec(),
                alg: &rcgen::PKCS_ECDSA_P256_SHA256,
            };
            let ttl = Duration::from_secs(3600);
            for id in [
                "spiffe://mesh-a.test/meshcert/node/n",
                "spiffe://mesh-b.test/meshcert/node/n",
            ] {
                let id = SpiffeId::new(id).expect("id");
                let i = a
                    .sign_leaf("mesh-a", &ck, &id, ttl, ttl, now)
                    .expect("signed");
                let chain = vec![i.leaf, i.intermediate];
                assert!(
                    a.verify_node_chain(&meshes[1], &chain, now).is_err(),
                    "{id}"
                );
                assert_eq!(a.verify_node_chain(&meshes[0], &chain, now), Ok(()));
            }
        }
    }

    #[test]
    fn renewal_at_half_life() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t1 = t0 + Duration::from_secs(100);
        assert!(!renewal_due(t0, t1, t0 + Duration::from_secs(49)));
        assert!(renewal_due(t0, t1, t0 + Duration::from_secs(50)));
        assert!(renewal_due(t0, t1, t1 + Duration::from_secs(50)));
    }

    #[test]
    fn intermediates_renew_and_stay_under_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let a = Authority::open(&builtin(), "V", &[mesh()], dir.path(), now).expect("open");
        let first = a.intermediate("mesh-a").expect("i");
        assert!(a.renew_due(now).expect("renew").is_empty());
        let later = now + Duration::from_secs(16 * 86400);
        assert_eq!(
            a.renew_due(later).expect("renew"),
            vec!["mesh-a".to_owned()]
        );
        let second = a.intermediate("mesh-a").expect("i");
        assert_ne!(first.der, second.der);
        assert!(second.not_after <= a.root().not_after);
    }

    #[test]
    fn a_rotation_plan_puts_both_roots_in_the_bundle_and_switches_signing_at_activation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let old = Authority::open(&builtin(), "V", &[mesh()], dir.path(), now).expect("open");
        let next = generate_root("V", "acme", 2048, 100, now).expect("next root");
        let fp = next.fingerprint();
        let files = crate::rotation::root_files(dir.path(), &fp);
        create_dir(&dir.path().join(crate::rotation::FOLDER)).expect("folder");
        persist_root(&next, &files).expect("persist");
        let mut plan = crate::rotation::RootPlan {
            base: None,
            next: Some(files.clone()),
            next_signs: false,
            ..Default::default()
        };
        let td = mesh().trust_domain;
        let open = |plan: &crate::rotation::RootPlan| {
            Authority::open_with_plan(
                &builtin(),
                &BTreeMap::new(),
                "V",
                &[mesh()],
                dir.path(),
                now,
                plan,
            )
            .expect("open with the plan")
        };

        // PREPARED: both roots in the bundle; the old root signs.
        let prepared = open(&plan);
        let bundle: Vec<String> = prepared.bundles(1).trust_domains[&td]
            .iter()
            .map(|d| fingerprint(&d.0))
            .collect();
        assert_eq!(bundle, vec![old.root().fingerprint(), fp.clone()]);
        assert_eq!(prepared.root().fingerprint(), old.root().fingerprint());
        assert_ne!(
            prepared.bundle_digest(),
            old.bundle_digest(),
            "the bundle version grows"
        );

        // ACTIVE: the next root signs new intermediates; the server certificate stays under
        // the previous root.
        plan.next_signs = true;
        let active = open(&plan);
        assert_eq!(active.root().fingerprint(), fp);
        assert_eq!(active.server_root().fingerprint(), old.root().fingerprint());
        let int = active.intermediate("mesh-a").expect("intermediate");
        let (_, int_cert) = X509Certificate::from_der(&int.der).expect("parse");
        let (_, next_cert) = X509Certificate::from_der(&next.der).expect("parse");
        assert!(
            int_cert
                .verify_signature(Some(next_cert.public_key()))
                .is_ok()
        );
        assert_eq!(active.bundles(2).trust_domains[&td].len(), 2);

        // RETIRED: the next root alone, in place of the configured one.
        let retired = open(&crate::rotation::RootPlan {
            base: Some((old.root().fingerprint(), files)),
            next: None,
            next_signs: false,
            ..Default::default()
        });
        assert_eq!(retired.root().fingerprint(), fp);
        assert_eq!(retired.bundles(3).trust_domains[&td].len(), 1);
        assert_eq!(retired.configured_fingerprint(), old.root().fingerprint());
    }
}
