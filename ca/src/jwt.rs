//! JWT-SVIDs: one signing key per trust domain, held here and never sent anywhere, the tokens
//! it signs for the identities a node holds, and the public keys (JWKS) that verify them.
//!
//! # Key life (pure: [`plan`])
//!
//! - The **active** key is the newest whose `activatesAt` has passed; it signs every token.
//! - A quarter into the active key's life the **next** key is made and published in the JWKS;
//!   it starts signing at half of the active key's life (so every agent has synced it long
//!   before the first token it signs is presented), or a quarter of a life after it was made
//!   if the holder was down meanwhile.
//! - A key replaced by a newer one is **retired**: its public key stays in the JWKS until
//!   every token it signed has expired (its replacement's activation plus the longest token
//!   lifetime the holder signs, `holder.svidMaxTtl`), then the key is deleted.
//!
//! Where keys live ([`vault`]): on one holder (SQLite), `<stateDir>/jwt/<trust domain>.json`
//! (mode 0600, replaced atomically); across replicas (PostgreSQL), one datastore document per
//! trust domain sealed with `holder.keyEncryptionKeyFile`, written with compare-and-swap, so
//! every replica signs with the same active key and serves the same JWKS. New keys take
//! `holder.jwtAlgorithm` (ES256 by default, RS256 selectable); a key keeps its algorithm.

mod vault;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshcert_protocol::api::{ApiError, ErrorCode};
use meshcert_protocol::jwt::{
    JwtBundles, JwtSignRequest, JwtSignResponse, MAX_AUDIENCE_BYTES, MAX_AUDIENCES,
};
use meshcert_protocol::{Enforcement, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::authority::unix;
use crate::holder::Holder;
use crate::policy::{Caller, LocalRules, check_local_entry};
use crate::sealed::{Kek, SealError};
use crate::store::{Store, StoreError};
use vault::{ATTEMPTS, Read, Vault};

/// How long one signing key is meant to sign: rotated at half of it.
pub const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a replica trusts its copy of shared keys before reading the document again. The
/// key-life rule is deterministic, so a replica whose copy lacks a key another replica added
/// finds out at once when it tries to add that key itself (the compare-and-swap fails); the
/// refresh bounds what no rule predicts, such as keys another replica merged from its files.
const SHARED_REFRESH: Duration = Duration::from_secs(5);

/// The algorithm of new JWT-SVID signing keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    #[default]
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA-2048 keys.
    Rs256,
}

impl std::str::FromStr for JwtAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ES256" => Ok(Self::Es256),
            "RS256" => Ok(Self::Rs256),
            other => Err(format!("`{other}` is not supported; use ES256 or RS256")),
        }
    }
}

impl JwtAlgorithm {
    fn jose(self) -> Algorithm {
        match self {
            Self::Es256 => Algorithm::ES256,
            Self::Rs256 => Algorithm::RS256,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        }
    }
}

/// Why a JWT key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The key file could not be read or written.
    #[error("JWT key file {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not what this holder writes.
    #[error("JWT key file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key could not be generated.
    #[error("cannot generate a JWT signing key")]
    Generate,
    /// The JOSE library refused a key or a token.
    #[error("JOSE: {0}")]
    Jose(#[from] jsonwebtoken::errors::Error),
    /// The datastore holding the shared keys failed.
    #[error("the shared JWT signing keys: {0}")]
    Store(#[from] StoreError),
    /// The shared keys cannot be sealed or unsealed (the key-encryption key is missing,
    /// unreadable or not the one that sealed them).
    #[error("the shared JWT signing keys: {0}")]
    Sealed(#[from] SealError),
    /// Other replicas kept changing the shared keys while this one tried to.
    #[error("the shared JWT signing keys of `{trust_domain}` kept changing; retry")]
    Contended {
        /// The trust domain.
        trust_domain: String,
    },
}

impl JwtError {
    /// Whether the same call may succeed when tried again (the datastore was unavailable, or
    /// another replica was writing the keys at the same moment).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) | Self::Sealed(SealError::Store(e)) => e.is_retryable(),
            Self::Contended { .. } => true,
            _ => false,
        }
    }
}

/// One signing key as stored (the private key as base64 PKCS#8), wiped when dropped.
#[derive(Clone, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    kid: String,
    alg: String,
    activates_at: u64,
    pkcs8: String,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("activates_at", &self.activates_at)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    fn algorithm(&self) -> JwtAlgorithm {
        self.alg.parse().unwrap_or_default()
    }

    fn encoding_key(&self) -> Result<EncodingKey, JwtError> {
        let der = Zeroizing::new(
            STANDARD
                .decode(self.pkcs8.as_bytes())
                .map_err(|_| JwtError::Generate)?,
        );
        let pem = Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec())));
        Ok(match self.algorithm() {
            JwtAlgorithm::Es256 => EncodingKey::from_ec_pem(pem.as_bytes())?,
            JwtAlgorithm::Rs256 => EncodingKey::from_rsa_pem(pem.as_bytes())?,
        })
    }

    /// The public JWK: `kid`, `alg`, `use: jwt-svid`.
    fn public_jwk(&self) -> Result<Jwk, JwtError> {
        let mut jwk = Jwk::from_encoding_key(&self.encoding_key()?, self.algorithm().jose())?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Other("jwt-svid".into()));
        Ok(jwk)
    }
}

/// A new key of `algorithm` activating at `activates_at`; its `kid` is its RFC 7638 thumbprint.
fn generate(algorithm: JwtAlgorithm, activates_at: u64) -> Result<StoredKey, JwtError> {
    let der = Zeroizing::new(match algorithm {
        JwtAlgorithm::Es256 => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .map_err(|_| JwtError::Generate)?
            .as_ref()
            .to_vec()
        }
        JwtAlgorithm::Rs256 => {
            use aws_lc_rs::encoding::AsDer as _;
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|_| JwtError::Generate)?;
            let der = pair.as_der().map_err(|_| JwtError::Generate)?;
            der.as_ref().to_vec()
        }
    });
    let mut key = StoredKey {
        kid: String::new(),
        alg: algorithm.name().to_owned(),
        activates_at,
        pkcs8: STANDARD.encode(&*der),
    };
    key.kid = key.public_jwk()?.thumbprint(ThumbprintHash::SHA256)?;
    Ok(key)
}

/// What [`plan`] decides for one trust domain's keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Make a key that activates at this time (Unix seconds).
    pub create: Option<u64>,
    /// Indexes of keys to delete (retired, every token they signed expired).
    pub drop: Vec<usize>,
}

/// The rotation rule (see the module doc) over keys' activation times (sorted, oldest
/// first), at `now`, for keys living `lifetime` and tokens living at most `max_ttl` (seconds).
pub fn plan(activations: &[u64], now: u64, lifetime: u64, max_ttl: u64) -> Plan {
    let Some(active) = activations.iter().rposition(|&a| a <= now) else {
        // No key signs yet (first start, or only a prepared one): one that signs at once.
        return Plan {
            create: activations.is_empty().then_some(now),
            drop: Vec::new(),
        };
    };
    let activated = activations[active];
    let create = (active + 1 == activations.len() && now >= activated + lifetime / 4)
        .then(|| (activated + lifetime / 2).max(now + lifetime / 4));
    // Key i retired when key i + 1 activated.
    let drop = (0..active)
        .filter(|&i| now >= activations[i + 1].saturating_add(max_ttl))
        .collect();
    Plan { create, drop }
}

/// One trust domain's keys as last read or written.
#[derive(Debug)]
struct Cached {
    keys: Vec<StoredKey>,
    revision: u64,
    read_at: Instant,
}

/// The JWT signing keys of every trust domain.
#[derive(Debug)]
pub struct JwtKeys {
    vault: Vault,
    lifetime: Duration,
    sets: Mutex<BTreeMap<TrustDomain, Cached>>,
}

impl JwtKeys {
    /// Keys kept in `<state_dir>/jwt/` (one holder), living `lifetime`.
    pub fn new(state_dir: &Path, lifetime: Duration) -> Self {
        Self::with_vault(
            Vault::Files {
                dir: state_dir.join("jwt"),
            },
            lifetime,
        )
    }

    /// Keys shared by the replicas of `store`, sealed with `kek`, living `lifetime`; keys this
    /// holder kept in `<state_dir>/jwt/` are merged into them first (once: the files go).
    pub fn shared(
        state_dir: &Path,
        store: Arc<dyn Store>,
        kek: Kek,
        lifetime: Duration,
    ) -> Result<Self, JwtError> {
        let vault = Vault::Sealed { store, kek };
        vault.migrate(&state_dir.join("jwt"))?;
        Ok(Self::with_vault(vault, lifetime))
    }

    /// The keys of a holder with `settings`: shared (sealed with `holder.keyEncryptionKeyFile`)
    /// when the datastore is PostgreSQL, in the state folder on SQLite.
    pub fn open(
        settings: &crate::config::HolderSettings,
        store: &Arc<dyn Store>,
    ) -> Result<Self, JwtError> {
        if !matches!(settings.datastore, crate::config::Datastore::Postgres(_)) {
            return Ok(Self::new(&settings.state_dir, KEY_LIFETIME));
        }
        let kek = Kek::load(
            settings
                .key_encryption_key_file
                .as_deref()
                .ok_or(SealError::NoKey)?,
        )?;
        Self::shared(&settings.state_dir, Arc::clone(store), kek, KEY_LIFETIME)
    }

    fn with_vault(vault: Vault, lifetime: Duration) -> Self {
        Self {
            vault,
            lifetime,
            sets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Runs `f` over `td`'s keys brought up to date at `now` (created, rotated, dropped,
    /// saved). Shared keys change only through a compare-and-swap over the revision read: a
    /// replica that loses reads the winner's keys and decides again, so a next key is created
    /// once whichever replicas race.
    fn with_keys<T>(
        &self,
        td: &TrustDomain,
        algorithm: JwtAlgorithm,
        now: u64,
        max_ttl: u64,
        f: impl FnOnce(&[StoredKey]) -> Result<T, JwtError>,
    ) -> Result<T, JwtError> {
        let mut sets = self
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..ATTEMPTS {
            let stale = sets
                .get(td)
                .is_none_or(|c| self.vault.is_shared() && c.read_at.elapsed() >= SHARED_REFRESH);
            if stale {
                let Read { keys, revision } = self.vault.read(td)?;
                let read_at = Instant::now();
                sets.insert(
                    td.clone(),
                    Cached {
                        keys,
                        revision,
                        read_at,
                    },
                );
            }
            let cached = sets.get_mut(td).expect("inserted above when absent");
            let Some(next) = self.next_keys(td, &cached.keys, algorithm, now, max_ttl)? else {
                return f(&cached.keys);
            };
            if let Some(revision) = self.vault.write(td, cached.revision, &next)? {
                *cached = Cached {
                    keys: next,
                    revision,
                    read_at: Instant::now(),
                };
                return f(&cached.keys);
            }
            // Another replica changed the keys first: read theirs and decide again.
            tracing::debug!(trust_domain = %td, "JWT signing keys changed by another replica");
            sets.remove(td);
        }
        Err(JwtError::Contended {
            trust_domain: td.to_string(),
        })
    }

    /// `keys` after [`plan`] at `now`, or `None` when nothing changes.
    fn next_keys(
        &self,
        td: &TrustDomain,
        keys: &[StoredKey],
        algorithm: JwtAlgorithm,
        now: u64,
        max_ttl: u64,
    ) -> Result<Option<Vec<StoredKey>>, JwtError> {
        let activations: Vec<u64> = keys.iter().map(|k| k.activates_at).collect();
        let plan = plan(&activations, now, self.lifetime.as_secs(), max_ttl);
        if plan.create.is_none() && plan.drop.is_empty() {
            return Ok(None);
        }
        let mut next: Vec<StoredKey> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !plan.drop.contains(i))
            .map(|(_, k)| k.clone())
            .collect();
        if let Some(at) = plan.create {
            let key = generate(algorithm, at)?;
            tracing::info!(trust_domain = %td, kid = %key.kid, activates_at = at, "JWT signing key created");
            next.push(key);
        }
        Ok(Some(next))
    }

    /// Signs a JWT-SVID for `id` (its trust domain's active key).
    pub fn sign(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        algorithm: JwtAlgorithm,
        now: SystemTime,
        max_ttl: Duration,
    ) -> Result<JwtSignResponse, JwtError> {
        let iat = unix(now);
        let exp = iat + ttl.as_secs().max(1);
        self.with_keys(
            id.trust_domain(),
            algorithm,
            iat,
            max_ttl.as_secs(),
            |keys| {
                let key = keys
                    .iter()
                    .rev()
                    .find(|k| k.activates_at <= iat)
                    .ok_or(JwtError::Generate)?;
                let mut header = Header::new(key.algorithm().jose());
                header.kid = Some(key.kid.clone());
                header.typ = Some("JWT".into());
                let claims = serde_json::json!({
                    "sub": id.to_string(),
                    "aud": audience,
                    "exp": exp,
                    "iat": iat,
                });
                let token = jsonwebtoken::encode(&header, &claims, &key.encoding_key()?)?;
                Ok(JwtSignResponse {
                    spiffe_id: id.clone(),
                    token,
                    issued_at: iat,
                    expires_at: exp,
                })
            },
        )
    }

    /// `td`'s JWKS as JSON text: every key not yet dropped (prepared, active, retired).
    pub fn jwks(
        &self,
        td: &TrustDomain,
        algorithm: JwtAlgorithm,
        now: SystemTime,
        max_ttl: Duration,
    ) -> Result<String, JwtError> {
        self.with_keys(td, algorithm, unix(now), max_ttl.as_secs(), |keys| {
            let set = JwkSet {
                keys: keys
                    .iter()
                    .map(StoredKey::public_jwk)
                    .collect::<Result<_, _>>()?,
            };
            serde_json::to_string(&set).map_err(|e| JwtError::Damaged {
                path: PathBuf::new(),
                reason: e.to_string(),
            })
        })
    }
}

/// Checks the audience of a request: 1 to [`MAX_AUDIENCES`] non-empty values.
fn check_audience(audience: &[String]) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    if audience.is_empty() {
        return Err(bad("a JWT-SVID needs at least one audience".into()));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(bad(format!("at most {MAX_AUDIENCES} audiences")));
    }
    if audience
        .iter()
        .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES)
    {
        return Err(bad(format!(
            "every audience is 1 to {MAX_AUDIENCE_BYTES} bytes"
        )));
    }
    Ok(())
}

/// `POST /v1/jwt/sign`: the node must hold the entry exactly as for an X.509-SVID (the
/// holder's entry with that id, assigned to it; without one, an agent-local entry its mesh's
/// enforcement allows); the lifetime is clamped to the entry's TTL and `holder.svidMaxTtl`.
pub fn sign(
    holder: &Holder,
    caller: &Caller,
    req: &JwtSignRequest,
    now: SystemTime,
) -> Result<JwtSignResponse, ApiError> {
    check_audience(&req.audience)?;
    let serving = holder.serving();
    let id = &req.entry.id;
    let stored = serving.entries.get(id).map_err(|e| internal(&e))?;
    let entry = match stored {
        Some(entry) if entry.is_assigned_to(&caller.node, &caller.mesh) => entry,
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::NotAssigned,
                format!("entry `{id}` is not assigned to node `{}`", caller.node),
            ));
        }
        None => {
            let enforcement = serving
                .config
                .mesh(&caller.mesh)
                .map(|m| serving.config.effective_enforcement(m))
                .unwrap_or(Enforcement::Enabled);
            let registered = enforcement == Enforcement::Disabled
                && serving
                    .entries
                    .registers(&req.entry.spiffe_id)
                    .map_err(|e| internal(&e))?;
            let rules = LocalRules {
                enforcement,
                prefixes: &serving.config.holder.local_entry_prefixes,
                registered,
            };
            check_local_entry(caller, id, &req.entry, &rules)?;
            req.entry.clone()
        }
    };
    if !caller.trust_domain.contains(&entry.spiffe_id) {
        return Err(ApiError::new(
            ErrorCode::OutsideTrustDomain,
            format!(
                "`{}` is outside the node's trust domain `{}`",
                entry.spiffe_id, caller.trust_domain
            ),
        ));
    }
    let max_ttl = serving.config.holder.svid_max_ttl;
    let ttl = Duration::from_secs(req.ttl_seconds.max(1))
        .min(entry.ttl)
        .min(max_ttl);
    let algorithm = serving.config.holder.jwt_algorithm;
    let signed = holder
        .jwt
        .sign(
            &entry.spiffe_id,
            &req.audience,
            ttl,
            algorithm,
            now,
            max_ttl,
        )
        .map_err(|e| keys_failed(&e))?;
    tracing::info!(node = %caller.node, spiffe_id = %entry.spiffe_id, expires_at = signed.expires_at, "JWT-SVID signed");
    Ok(signed)
}

/// `GET /v1/jwt/bundles`: the JWKS of every trust domain whose X.509 bundle the node receives
/// (its own; every mesh's under PERMISSIVE federation).
pub fn bundles(holder: &Holder, caller: &Caller, now: SystemTime) -> Result<JwtBundles, ApiError> {
    let serving = holder.serving();
    let max_ttl = serving.config.holder.svid_max_ttl;
    let algorithm = serving.config.holder.jwt_algorithm;
    let mut out = JwtBundles::default();
    for td in serving.bundles_for(&caller.mesh).trust_domains.keys() {
        let jwks = holder
            .jwt
            .jwks(td, algorithm, now, max_ttl)
            .map_err(|e| keys_failed(&e))?;
        out.trust_domains.insert(td.clone(), jwks);
    }
    Ok(out)
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "JWT-SVID operation failed");
    ApiError::new(ErrorCode::Internal, "the holder failed; see its log")
}

/// A key failure: retryable ones (the shared keys' datastore) answer `UNAVAILABLE`.
fn keys_failed(e: &JwtError) -> ApiError {
    if e.is_retryable() {
        tracing::warn!(error = %e, "JWT-SVID operation failed; the caller may retry");
        return ApiError::new(
            ErrorCode::Unavailable,
            "the holder's shared JWT signing keys are unavailable; retry",
        );
    }
    internal(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;
    const HOUR: u64 = 3600;

    #[test]
    fn the_first_key_signs_at_once_and_the_next_is_published_a_quarter_in() {
        assert_eq!(plan(&[], 1000, DAY, HOUR).create, Some(1000));
        // Young active key: nothing to do.
        assert_eq!(
            plan(&[1000], 1000 + DAY / 4 - 1, DAY, HOUR),
            Plan::default()
        );
        // A quarter in: the next key, activating at half of the active key's life.
        let p = plan(&[1000], 1000 + DAY / 4, DAY, HOUR);
        assert_eq!(p.create, Some(1000 + DAY / 2));
        // Prepared and waiting: nothing more.
        assert_eq!(
            plan(&[1000, 1000 + DAY / 2], 1000 + DAY / 3, DAY, HOUR),
            Plan::default()
        );
    }

    #[test]
    fn a_holder_back_after_a_long_stop_publishes_before_it_signs_with_a_new_key() {
        let p = plan(&[1000], 1000 + 3 * DAY, DAY, HOUR);
        assert_eq!(p.create, Some(1000 + 3 * DAY + DAY / 4));
    }

    #[test]
    fn a_retired_key_stays_until_its_last_token_expired() {
        let keys = [1000, 1000 + DAY / 2];
        let retired = 1000 + DAY / 2;
        assert!(plan(&keys, retired + HOUR - 1, DAY, HOUR).drop.is_empty());
        assert_eq!(plan(&keys, retired + HOUR, DAY, HOUR).drop, [0]);
    }

    #[test]
    fn keys_rotate_and_old_tokens_verify_until_their_keys_leave_the_jwks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = JwtKeys::new(dir.path(), Duration::from_secs(DAY));
        let id = SpiffeId::new("spiffe://example.org/web").expect("valid");
        let td = id.trust_domain().clone();
        // Now: the JOSE library checks `exp` against the real clock.
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let max = Duration::from_secs(HOUR);
        let aud = ["db".to_owned()];
        let ttl = Duration::from_secs(300);
        let es = JwtAlgorithm::Es256;
        let first = keys.sign(&id, &aud, ttl, es, t0, max).expect("signed");
        let kid = |t: &str| jsonwebtoken::decode_header(t).expect("header").kid;
        let jwks_kids = |t: SystemTime| -> Vec<String> {
            let set: JwkSet =
                serde_json::from_str(&keys.jwks(&td, es, t, max).expect("jwks")).expect("json");
            set.keys
                .iter()
                .filter_map(|k| k.common.key_id.clone())
                .collect()
        };
        assert_eq!(jwks_kids(t0), [kid(&first.token).expect("kid")]);
        // A quarter in, the next key is published but does not sign yet.
        assert_eq!(jwks_kids(at(DAY / 4)).len(), 2);
        let before = keys.sign(&id, &aud, ttl, es, at(DAY / 4), max).expect("s");
        assert_eq!(kid(&before.token), kid(&first.token));
        // At half-life the new key signs; the old one stays for the old tokens.
        let after = keys.sign(&id, &aud, ttl, es, at(DAY / 2), max).expect("s");
        assert_ne!(kid(&after.token), kid(&first.token));
        assert_eq!(jwks_kids(at(DAY / 2 + HOUR - 1)).len(), 2);
        // ... and the first token still verifies against the JWKS of that moment.
        let set: JwkSet = serde_json::from_str(
            &keys
                .jwks(&td, es, at(DAY / 2 + HOUR - 1), max)
                .expect("jwks"),
        )
        .expect("json");
        let jwk = set.find(&kid(&first.token).expect("kid")).expect("kept");
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["db"]);
        jsonwebtoken::decode::<serde_json::Value>(
            &first.token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"),
            &validation,
        )
        .expect("the old token verifies");
        // Once every token of the old key has expired, it leaves the JWKS (and the disk).
        assert_eq!(
            jwks_kids(at(DAY / 2 + HOUR)),
            [kid(&after.token).expect("kid")]
        );
        let stored = std::fs::read_to_string(dir.path().join("jwt/example.org.json")).expect("f");
        assert!(!stored.contains(&kid(&first.token).expect("kid")));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("jwt/example.org.json"))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // A restarted holder signs with the same key.
        let again = JwtKeys::new(dir.path(), Duration::from_secs(DAY));
        let t = again
            .sign(&id, &aud, ttl, es, at(DAY / 2 + HOUR), max)
            .expect("s");
        assert_eq!(kid(&t.token), kid(&after.token));
    }

    #[test]
    fn rs256_keys_sign_tokens_their_jwk_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = JwtKeys::new(dir.path(), KEY_LIFETIME);
        let id = SpiffeId::new("spiffe://example.org/web").expect("valid");
        let now = SystemTime::now();
        let max = Duration::from_secs(HOUR);
        let rs = JwtAlgorithm::Rs256;
        let signed = keys
            .sign(&id, &["db".into()], Duration::from_secs(60), rs, now, max)
            .expect("signed");
        let set: JwkSet =
            serde_json::from_str(&keys.jwks(id.trust_domain(), rs, now, max).expect("jwks"))
                .expect("json");
        let header = jsonwebtoken::decode_header(&signed.token).expect("header");
        assert_eq!(header.alg, Algorithm::RS256);
        let jwk = set.find(&header.kid.expect("kid")).expect("published");
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_audience(&["db"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &signed.token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key"),
            &validation,
        )
        .expect("verifies");
        assert_eq!(data.claims["sub"], "spiffe://example.org/web");
        assert!(!format!("{:?}", keys.sets).contains("pkcs8"));
    }

    /// A replica's keys on `store`, in its own state folder.
    fn replica(store: &Arc<dyn Store>, dir: &Path) -> JwtKeys {
        let kek = Kek::from_bytes(&[9; 32]).expect("key");
        JwtKeys::shared(dir, Arc::clone(store), kek, Duration::from_secs(DAY)).expect("shared")
    }

    fn kids(keys: &JwtKeys, td: &TrustDomain, at: SystemTime) -> Vec<String> {
        let jwks = keys
            .jwks(td, JwtAlgorithm::Es256, at, Duration::from_secs(HOUR))
            .expect("jwks");
        let set: JwkSet = serde_json::from_str(&jwks).expect("json");
        set.keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect()
    }

    /// Verifies `token` (audience `db`) with the JWKS `keys` serve at `at`, as a relying party.
    fn verify_with(keys: &JwtKeys, token: &str, at: SystemTime) -> Result<(), String> {
        let jwks = keys
            .jwks(
                &TrustDomain::new("example.org").expect("td"),
                JwtAlgorithm::Es256,
                at,
                Duration::from_secs(HOUR),
            )
            .map_err(|e| e.to_string())?;
        let set: JwkSet = serde_json::from_str(&jwks).map_err(|e| e.to_string())?;
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| e.to_string())?
            .kid
            .ok_or("no kid")?;
        let jwk = set.find(&kid).ok_or("kid not in the JWKS")?;
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["db"]);
        jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?,
            &validation,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn replicas_sign_with_one_key_and_serve_one_jwks(store: &Arc<dyn Store>) {
        let id = SpiffeId::new("spiffe://example.org/web").expect("valid");
        let td = id.trust_domain().clone();
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (aud, ttl, max) = (
            ["db".to_owned()],
            Duration::from_secs(300),
            Duration::from_secs(HOUR),
        );
        let es = JwtAlgorithm::Es256;
        let dirs: Vec<tempfile::TempDir> =
            (0..4).map(|_| tempfile::tempdir().expect("tmp")).collect();
        let replicas: Vec<JwtKeys> = dirs.iter().map(|d| replica(store, d.path())).collect();
        // Four replicas sign their first token at the same instant: one key is created.
        let tokens: Vec<String> = std::thread::scope(|s| {
            let signing: Vec<_> = replicas
                .iter()
                .map(|r| s.spawn(|| r.sign(&id, &aud, ttl, es, t0, max).expect("signed").token))
                .collect();
            signing
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect()
        });
        let kid = |t: &str| {
            jsonwebtoken::decode_header(t)
                .expect("header")
                .kid
                .expect("kid")
        };
        assert!(
            tokens.iter().all(|t| kid(t) == kid(&tokens[0])),
            "one active key"
        );
        let (a, b) = (&replicas[0], &replicas[1]);
        // A token signed through A verifies with the JWKS B serves, and the other way round.
        verify_with(b, &tokens[0], t0).expect("A's token, B's JWKS");
        verify_with(a, &tokens[1], t0).expect("B's token, A's JWKS");
        // A quarter in, B prepares the next key; A, deciding the same, reads B's instead.
        let prepared = kids(b, &td, at(DAY / 4));
        assert_eq!(prepared.len(), 2);
        assert_eq!(kids(a, &td, at(DAY / 4)), prepared, "the same JWKS from A");
        assert_eq!(kids(&replicas[2], &td, at(DAY / 4)), prepared);
        // At half-life every replica signs with the next key.
        let next: Vec<String> = replicas
            .iter()
            .map(|r| {
                kid(&r
                    .sign(&id, &aud, ttl, es, at(DAY / 2), max)
                    .expect("s")
                    .token)
            })
            .collect();
        assert!(next.iter().all(|k| *k == prepared[1]), "{next:?}");
        // Retired keys leave every replica's JWKS together.
        assert_eq!(kids(a, &td, at(DAY / 2 + HOUR)), [prepared[1].clone()]);
        assert_eq!(kids(b, &td, at(DAY / 2 + HOUR)), [prepared[1].clone()]);
        // The document is sealed: no private key, no field name of the key set in clear.
        let (_, sealed) = store
            .load_document("jwt-keys/example.org")
            .expect("load")
            .expect("stored");
        let private = {
            let sets = a.sets.lock().expect("lock");
            sets[&td].keys[0].pkcs8.clone()
        };
        let contains = |needle: &[u8]| sealed.windows(needle.len()).any(|w| w == needle);
        assert!(
            !contains(private.as_bytes())
                && !contains(b"pkcs8")
                && !contains(prepared[1].as_bytes())
        );
        // No key file on any replica.
        assert!(
            dirs.iter()
                .all(|d| !d.path().join("jwt/example.org.json").exists())
        );
        // A replica with another key-encryption key cannot read them.
        let other = tempfile::tempdir().expect("tmp");
        let wrong = JwtKeys::shared(
            other.path(),
            Arc::clone(store),
            Kek::from_bytes(&[1; 32]).expect("key"),
            KEY_LIFETIME,
        )
        .expect("no files to migrate");
        let err = wrong
            .sign(&id, &aud, ttl, es, t0, max)
            .expect_err("wrong key");
        assert!(
            matches!(err, JwtError::Sealed(SealError::Unseal { .. })),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    fn keys_kept_in_files_move_into_the_document_once(store: &Arc<dyn Store>) {
        let id = SpiffeId::new("spiffe://example.org/web").expect("valid");
        let td = id.trust_domain().clone();
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (aud, ttl, max) = (
            ["db".to_owned()],
            Duration::from_secs(300),
            Duration::from_secs(HOUR),
        );
        let es = JwtAlgorithm::Es256;
        // Two holders that each kept their keys in files (before sharing a datastore).
        let (da, db) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let in_files = |d: &tempfile::TempDir, t| {
            JwtKeys::new(d.path(), Duration::from_secs(DAY))
                .sign(&id, &aud, ttl, es, t, max)
                .expect("signed")
                .token
        };
        let (ta, tb) = (in_files(&da, t0), in_files(&db, at(10)));
        let (a, b) = (replica(store, da.path()), replica(store, db.path()));
        for d in [&da, &db] {
            assert!(
                !d.path().join("jwt/example.org.json").exists(),
                "file moved"
            );
        }
        // Both keys are published by both replicas: every token issued before verifies.
        let kid = |t: &str| {
            jsonwebtoken::decode_header(t)
                .expect("header")
                .kid
                .expect("kid")
        };
        for r in [&a, &b] {
            let mut published = kids(r, &td, at(20));
            published.sort();
            let mut expected = vec![kid(&ta), kid(&tb)];
            expected.sort();
            assert_eq!(published, expected);
            verify_with(r, &ta, at(20)).expect("A's old token");
            verify_with(r, &tb, at(20)).expect("B's old token");
        }
        // The newest key signs, on both; migrating again changes nothing.
        let revision = store
            .load_document("jwt-keys/example.org")
            .expect("load")
            .map(|d| d.0);
        let again = replica(store, da.path());
        assert_eq!(
            store
                .load_document("jwt-keys/example.org")
                .expect("load")
                .map(|d| d.0),
            revision
        );
        for r in [&a, &b, &again] {
            let t = r.sign(&id, &aud, ttl, es, at(20), max).expect("signed");
            assert_eq!(kid(&t.token), kid(&tb));
        }
    }

    #[test]
    fn replicas_share_jwt_keys_on_sqlite() {
        let f = crate::store::suite::sqlite();
        replicas_sign_with_one_key_and_serve_one_jwks(&f.store);
        let f = crate::store::suite::sqlite();
        keys_kept_in_files_move_into_the_document_once(&f.store);
    }

    #[test]
    fn replicas_share_jwt_keys_on_postgres() {
        let f = crate::store::suite::postgres();
        replicas_sign_with_one_key_and_serve_one_jwks(&f.store);
        let f = crate::store::suite::postgres();
        keys_kept_in_files_move_into_the_document_once(&f.store);
    }

    const CONFIG: &str = r#"
apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: vm
spec:
  meshes:
    - name: mesh-a
      trustDomain: mesh-a.test
    - name: mesh-b
      trustDomain: mesh-b.test
  certificateAuthority:
    builtin:
      rsaKeySizeBytes: 2048
  shared: {}
  enforceAccessControl: ENABLED
holder:
  listen: 127.0.0.1:0
  stateDir: STATE
  svidMaxTtl: 2m
entries:
  - id: web
    spiffeId: spiffe://mesh-a.test/web
    nodes: [node-1]
    selectors: ["unix:uid:1000"]
    dir: web
  - id: db
    spiffeId: spiffe://mesh-a.test/db
    nodes: [node-2]
    selectors: ["unix:uid:1000"]
    dir: db
"#;

    #[test]
    fn a_node_gets_tokens_only_for_its_entries_clamped_by_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = CONFIG.replace("STATE", &dir.path().display().to_string());
        let config = crate::config::parse(&text).expect("valid");
        let now = SystemTime::now();
        let holder = Holder::open(config, now).expect("open");
        let caller = Caller {
            node: "node-1".into(),
            mesh: "mesh-a".into(),
            trust_domain: TrustDomain::new("mesh-a.test").expect("td"),
        };
        let entry = |id: &str| {
            let serving = holder.serving();
            serving.entries.get(id).expect("read").expect("declared")
        };
        let ask = |entry, audience: &[&str]| JwtSignRequest {
            entry,
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            ttl_seconds: 3600,
        };
        let signed = sign(&holder, &caller, &ask(entry("web"), &["db"]), now).expect("signed");
        assert_eq!(signed.spiffe_id.to_string(), "spiffe://mesh-a.test/web");
        // Clamped to holder.svidMaxTtl (2 minutes).
        assert_eq!(signed.expires_at - signed.issued_at, 120);
        let code = |r: Result<JwtSignResponse, ApiError>| r.expect_err("refused").code;
        assert_eq!(
            code(sign(&holder, &caller, &ask(entry("db"), &["x"]), now)),
            ErrorCode::NotAssigned
        );
        assert_eq!(
            code(sign(&holder, &caller, &ask(entry("web"), &[]), now)),
            ErrorCode::BadRequest
        );
        // An entry the holder does not know is agent-local: refused under ENABLED.
        let mut local = entry("web");
        local.id = "mine".into();
        assert_eq!(
            code(sign(&holder, &caller, &ask(local, &["x"]), now)),
            ErrorCode::PolicyDenied
        );
        // Under DISABLED, the local-entry rules of X.509-SVIDs hold for tokens too: never an ID
        // a holder entry registers (to any node), only inside the node's own namespace.
        let dir_disabled = tempfile::tempdir().expect("tempdir");
        let text = CONFIG
            .replace("STATE", &dir_disabled.path().display().to_string())
            .replace(
                "enforceAccessControl: ENABLED",
                "enforceAccessControl: DISABLED",
            );
        let open = Holder::open(crate::config::parse(&text).expect("valid"), now).expect("open");
        let local = |path: &str| {
            let mut e = entry("web");
            e.id = "mine".into();
            e.spiffe_id = SpiffeId::new(&format!("spiffe://mesh-a.test{path}")).expect("id");
            e
        };
        assert_eq!(
            code(sign(&open, &caller, &ask(local("/db"), &["x"]), now)),
            ErrorCode::IdRegistered
        );
        assert_eq!(
            code(sign(&open, &caller, &ask(local("/debug"), &["x"]), now)),
            ErrorCode::OutsideLocalPrefixes
        );
        let own = sign(
            &open,
            &caller,
            &ask(local("/node/node-1/debug"), &["x"]),
            now,
        )
        .expect("inside the node's namespace");
        assert_eq!(
            own.spiffe_id.to_string(),
            "spiffe://mesh-a.test/node/node-1/debug"
        );

        // The JWKS: the node's own trust domain only (no PERMISSIVE federation).
        let b = bundles(&holder, &caller, now).expect("bundles");
        let tds: Vec<String> = b.trust_domains.keys().map(ToString::to_string).collect();
        assert_eq!(tds, ["mesh-a.test"]);

        // Under PERMISSIVE federation, every mesh's JWKS.
        let dir = tempfile::tempdir().expect("tempdir");
        let text = CONFIG
            .replace("STATE", &dir.path().display().to_string())
            .replace(
                "  shared: {}\n",
                "  shared: {}\n  federation:\n    mode: PERMISSIVE\n",
            );
        let holder = Holder::open(crate::config::parse(&text).expect("valid"), now).expect("open");
        let b = bundles(&holder, &caller, now).expect("bundles");
        let tds: Vec<String> = b.trust_domains.keys().map(ToString::to_string).collect();
        assert_eq!(tds, ["mesh-a.test", "mesh-b.test"]);
    }

    #[test]
    fn audiences_are_checked() {
        assert!(check_audience(&[]).is_err());
        assert!(check_audience(&[String::new()]).is_err());
        assert!(check_audience(&vec!["a".to_owned(); MAX_AUDIENCES + 1]).is_err());
        assert!(check_audience(&["a".to_owned(), "b".to_owned()]).is_ok());
    }

    #[test]
    fn algorithms_parse() {
        assert_eq!("ES256".parse(), Ok(JwtAlgorithm::Es256));
        assert_eq!("RS256".parse(), Ok(JwtAlgorithm::Rs256));
        assert!("HS256".parse::<JwtAlgorithm>().is_err());
    }
}
