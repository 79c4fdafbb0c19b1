//! JWT-SVIDs on the node: tokens the holder signs (its keys never leave it), cached per
//! (identity, audience set) and signed again once half of their life has passed, the JWKS of
//! every trust domain the node verifies, polled from the holder, and the validation of a token
//! against them.
//!
//! The holder is reached through the [`JwtHolder`] seam (the HTTPS issuer in the daemon, a
//! fake in tests).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshcert_protocol::jwt::{
    JwtBundles, JwtSignRequest, JwtSignResponse, MAX_AUDIENCE_BYTES, MAX_AUDIENCES,
    PATH_JWT_BUNDLES, PATH_JWT_SIGN,
};
use meshcert_protocol::{Entry, SpiffeId};
use tokio::sync::watch;

use crate::issuer::{HttpsIssuer, Issuer, IssuerError};
use crate::metrics::TimedIssuer;

/// Tokens cached at most (identity × audience set); the oldest go first beyond it.
const MAX_CACHED: usize = 4096;
/// How soon a failed JWKS poll is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// A boxed future of a holder call.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, IssuerError>> + Send + 'a>>;

/// The holder's JWT-SVID calls.
pub trait JwtHolder: Send + Sync + 'static {
    /// `POST /v1/jwt/sign`.
    fn sign_jwt(&self, request: JwtSignRequest) -> Call<'_, JwtSignResponse>;
    /// `GET /v1/jwt/bundles`.
    fn jwt_bundles(&self) -> Call<'_, JwtBundles>;
}

impl JwtHolder for HttpsIssuer {
    fn sign_jwt(&self, request: JwtSignRequest) -> Call<'_, JwtSignResponse> {
        Box::pin(async move {
            self.call_as_node(Method::POST, PATH_JWT_SIGN, Some(&request))
                .await
        })
    }

    fn jwt_bundles(&self) -> Call<'_, JwtBundles> {
        Box::pin(self.call_as_node::<(), _>(Method::GET, PATH_JWT_BUNDLES, None))
    }
}

impl<I: JwtHolder + Issuer> JwtHolder for TimedIssuer<I> {
    fn sign_jwt(&self, request: JwtSignRequest) -> Call<'_, JwtSignResponse> {
        self.inner().sign_jwt(request)
    }

    fn jwt_bundles(&self) -> Call<'_, JwtBundles> {
        self.inner().jwt_bundles()
    }
}

/// Whether a token issued at `issued` and expiring at `expires` (Unix seconds) is to be
/// signed again at `now`: from half of its life on.
pub fn due(issued: u64, expires: u64, now: u64) -> bool {
    now >= issued + expires.saturating_sub(issued) / 2
}

/// The tokens and JWKS of the node, shared by every Workload API call.
pub struct Tokens {
    holder: Arc<dyn JwtHolder>,
    ttl: Duration,
    cache: Mutex<HashMap<(SpiffeId, BTreeSet<String>), JwtSignResponse>>,
    jwks: watch::Sender<Arc<JwtBundles>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    /// Tokens from `holder`, asked for with lifetime `ttl` (the holder clamps it).
    pub fn new(holder: Arc<dyn JwtHolder>, ttl: Duration) -> Self {
        Self {
            holder,
            ttl,
            cache: Mutex::new(HashMap::new()),
            jwks: watch::channel(Arc::new(JwtBundles::default())).0,
        }
    }

    /// A token for `entry`'s identity and `audience`: the cached one while it is younger than
    /// half of its life, else a new one from the holder.
    pub async fn token(
        &self,
        entry: &Entry,
        audience: &[String],
        now: SystemTime,
    ) -> Result<JwtSignResponse, IssuerError> {
        let key = (
            entry.spiffe_id.clone(),
            audience.iter().cloned().collect::<BTreeSet<_>>(),
        );
        if let Some(cached) = self.cached(&key, unix(now)) {
            return Ok(cached);
        }
        // What runs on the node stays on the node: the hook is not sent.
        let mut sent = entry.clone();
        sent.hook = None;
        let signed = self
            .holder
            .sign_jwt(JwtSignRequest {
                entry: sent,
                audience: key.1.iter().cloned().collect(),
                ttl_seconds: self.ttl.as_secs(),
            })
            .await?;
        if !self.knows_kid(&signed) {
            // A key this node has not seen yet: its JWKS is fetched now, not at the next poll.
            let _ = self.refresh_bundles().await;
        }
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            let now = unix(now);
            cache.retain(|_, t| t.expires_at > now);
            if cache.len() >= MAX_CACHED
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, t)| t.issued_at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, signed.clone());
        Ok(signed)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(SpiffeId, BTreeSet<String>), JwtSignResponse>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, key: &(SpiffeId, BTreeSet<String>), now: u64) -> Option<JwtSignResponse> {
        self.lock()
            .get(key)
            .filter(|t| !due(t.issued_at, t.expires_at, now))
            .cloned()
    }

    fn knows_kid(&self, signed: &JwtSignResponse) -> bool {
        let kid = jsonwebtoken::decode_header(&signed.token)
            .ok()
            .and_then(|h| h.kid);
        let jwks = self.jwks.borrow();
        let set = jwks
            .trust_domains
            .get(signed.spiffe_id.trust_domain())
            .and_then(|text| serde_json::from_str::<JwkSet>(text).ok());
        matches!((kid, set), (Some(kid), Some(set)) if set.find(&kid).is_some())
    }

    /// The JWKS per trust domain, now and on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<JwtBundles>> {
        self.jwks.subscribe()
    }

    /// The JWKS per trust domain now.
    pub fn bundles(&self) -> Arc<JwtBundles> {
        self.jwks.borrow().clone()
    }

    /// Fetches the JWKS from the holder and publishes them if they changed.
    pub async fn refresh_bundles(&self) -> Result<(), IssuerError> {
        let fresh = self.holder.jwt_bundles().await?;
        self.jwks.send_if_modified(|current| {
            let changed = **current != fresh;
            if changed {
                *current = Arc::new(fresh);
            }
            changed
        });
        Ok(())
    }

    /// Polls the JWKS every `interval` until `stop` turns true; a failure waits
    /// [`retry_after`].
    pub async fn poll_bundles(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let wait = match self.refresh_bundles().await {
                Ok(()) => interval,
                Err(e) => {
                    tracing::debug!(error = %e, "JWT bundles not fetched");
                    retry_after(&e, interval)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// How long a failed JWKS poll waits. Before the node joined ([`IssuerError::NoIdentity`]) it
/// is tried again soon: the JWKS can come right after the join. Any other failure (the holder
/// down, refusing, or slow) waits the whole `interval`, whether a JWKS was fetched before or
/// not: the JWKS held stay valid, a token signed with an unseen key fetches it at once, and
/// probing a down holder is the rotator's job, not this poll's.
fn retry_after(error: &IssuerError, interval: Duration) -> Duration {
    if matches!(error, IssuerError::NoIdentity) {
        RETRY.min(interval)
    } else {
        interval
    }
}

/// Why a JWT-SVID does not validate (the message names the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRefusal {
    /// Not a compact JWS with a readable header.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The header's algorithm is not one JWT-SVIDs may use.
    #[error("algorithm {0} is not allowed for JWT-SVIDs")]
    Algorithm(String),
    /// The header names no key.
    #[error("the token has no key id (kid)")]
    NoKeyId,
    /// `sub` is missing or not a SPIFFE ID.
    #[error("the token's subject is not a SPIFFE ID: {0}")]
    Subject(String),
    /// No JWKS for the subject's trust domain.
    #[error("no JWT bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    /// The key is not in the subject's trust domain's JWKS.
    #[error("key {kid} is not an authority of trust domain {trust_domain}")]
    UnknownKey {
        /// The header's `kid`.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// Signature, expiry or audience failed.
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// The audience asked for is not among the token's.
    #[error("the token is not for audience {0}")]
    Audience(String),
}

/// The algorithms of the JWT-SVID standard.
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// Validates `token` for `audience` against `bundles`: an allowed algorithm, a `kid` found in
/// the JWKS of the subject's trust domain, the signature, `exp` not passed, `aud` holding
/// `audience`. The subject and every claim, on success.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &JwtBundles,
) -> Result<(SpiffeId, serde_json::Value), JwtRefusal> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtRefusal::Malformed(e.to_string()))?;
    if !ALLOWED.contains(&header.alg) {
        return Err(JwtRefusal::Algorithm(format!("{:?}", header.alg)));
    }
    let kid = header.kid.ok_or(JwtRefusal::NoKeyId)?;
    // Only to find the subject's trust domain and so its keys; `decode` below verifies.
    let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| JwtRefusal::Malformed(e.to_string()))?;
    let sub = claims["sub"].as_str().unwrap_or_default();
    let id = SpiffeId::new(sub).map_err(|e| JwtRefusal::Subject(format!("`{sub}`: {e}")))?;
    let td = id.trust_domain();
    let jwks: JwkSet = bundles
        .trust_domains
        .get(td)
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| JwtRefusal::UnknownTrustDomain(td.to_string()))?;
    let unknown = || JwtRefusal::UnknownKey {
        kid: kid.clone(),
        trust_domain: td.to_string(),
    };
    let jwk = jwks.find(&kid).ok_or_else(unknown)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| unknown())?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    validation.set_audience(&[audience]);
    match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
        Ok(data) => Ok((id, data.claims)),
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidAudience) => {
            Err(JwtRefusal::Audience(audience.to_owned()))
        }
        Err(e) => Err(JwtRefusal::Invalid(e.to_string())),
    }
}

/// Checks a requested audience list: 1 to [`MAX_AUDIENCES`] values of 1 to
/// [`MAX_AUDIENCE_BYTES`] bytes. The message names the rule.
pub fn check_audience(audience: &[String]) -> Result<(), String> {
    if audience.is_empty() {
        return Err("audience must be specified".into());
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(format!("at most {MAX_AUDIENCES} audiences"));
    }
    if audience
        .iter()
        .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES)
    {
        return Err(format!(
            "every audience is 1 to {MAX_AUDIENCE_BYTES} bytes long"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
    use jsonwebtoken::{EncodingKey, Header};
    use meshcert_protocol::TrustDomain;

    /// A holder down before the first JWKS fetch is not probed every few seconds: only a node
    /// that has not joined yet is asked again soon.
    #[test]
    fn a_failed_poll_waits_the_interval_unless_the_node_has_not_joined() {
        let interval = Duration::from_secs(30);
        assert_eq!(retry_after(&IssuerError::NoIdentity, interval), RETRY);
        assert_eq!(
            retry_after(&IssuerError::NoIdentity, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        for down in [
            IssuerError::Http("connection reset".into()),
            IssuerError::Decode("truncated".into()),
            IssuerError::Setup("no key".into()),
        ] {
            assert_eq!(retry_after(&down, interval), interval, "{down}");
        }
    }

    /// A P-256 key (PKCS#8 PEM), its JWKS under `kid`.
    fn key(kid: &str) -> (EncodingKey, JwkSet) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let der = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("key");
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
        let enc = EncodingKey::from_ec_pem(pem.as_bytes()).expect("pem");
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        jwk.common.public_key_use = Some(PublicKeyUse::Other("jwt-svid".into()));
        (enc, JwkSet { keys: vec![jwk] })
    }

    fn token(enc: &EncodingKey, kid: &str, sub: &str, aud: &[&str], exp: u64) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({"sub": sub, "aud": aud, "exp": exp, "iat": exp - 300});
        jsonwebtoken::encode(&header, &claims, enc).expect("signed")
    }

    fn bundles(sets: &[(&str, &JwkSet)]) -> JwtBundles {
        JwtBundles {
            trust_domains: sets
                .iter()
                .map(|(td, set)| {
                    (
                        TrustDomain::new(td).expect("td"),
                        serde_json::to_string(set).expect("json"),
                    )
                })
                .collect(),
        }
    }

    fn later() -> u64 {
        unix(SystemTime::now()) + 300
    }

    #[test]
    fn a_valid_token_gives_its_subject_and_claims() {
        let (enc, set) = key("k1");
        let t = token(
            &enc,
            "k1",
            "spiffe://example.org/web",
            &["db", "x"],
            later(),
        );
        let (id, claims) = validate(&t, "db", &bundles(&[("example.org", &set)])).expect("ok");
        assert_eq!(id.to_string(), "spiffe://example.org/web");
        assert_eq!(claims["aud"][1], "x");
    }

    #[test]
    fn wrong_audience_expiry_signature_and_trust_domain_are_refused() {
        let (enc, set) = key("k1");
        let (other_enc, other_set) = key("k2");
        let b = bundles(&[("example.org", &set), ("other.org", &other_set)]);
        let sub = "spiffe://example.org/web";
        let t = token(&enc, "k1", sub, &["db"], later());
        assert_eq!(
            validate(&t, "web", &b),
            Err(JwtRefusal::Audience("web".into()))
        );
        let expired = token(&enc, "k1", sub, &["db"], unix(SystemTime::now()) - 1);
        assert!(matches!(
            validate(&expired, "db", &b),
            Err(JwtRefusal::Invalid(_))
        ));
        // A flipped signature byte.
        let mut tampered = t.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert!(matches!(
            validate(&tampered, "db", &b),
            Err(JwtRefusal::Invalid(_))
        ));
        // Signed by another trust domain's key for a subject of example.org.
        let foreign = token(&other_enc, "k2", sub, &["db"], later());
        assert!(matches!(
            validate(&foreign, "db", &b),
            Err(JwtRefusal::UnknownKey { .. })
        ));
        // Another trust domain's key under example.org's kid: the signature fails.
        let forged = token(&other_enc, "k1", sub, &["db"], later());
        assert!(matches!(
            validate(&forged, "db", &b),
            Err(JwtRefusal::Invalid(_))
        ));
        let unknown_td = token(&enc, "k1", "spiffe://nowhere.org/web", &["db"], later());
        assert!(matches!(
            validate(&unknown_td, "db", &b),
            Err(JwtRefusal::UnknownTrustDomain(_))
        ));
    }

    #[test]
    fn tokens_without_kid_or_with_hmac_are_refused() {
        let (enc, set) = key("k1");
        let b = bundles(&[("example.org", &set)]);
        let claims =
            serde_json::json!({"sub": "spiffe://example.org/web", "aud": ["db"], "exp": later()});
        let no_kid =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &enc).expect("signed");
        assert_eq!(validate(&no_kid, "db", &b), Err(JwtRefusal::NoKeyId));
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let hmac = jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef").expect("k"),
        )
        .expect("s");
        assert!(matches!(
            validate(&hmac, "db", &b),
            Err(JwtRefusal::Algorithm(_))
        ));
        assert!(matches!(
            validate("garbage", "db", &b),
            Err(JwtRefusal::Malformed(_))
        ));
    }

    #[test]
    fn tokens_are_signed_again_from_half_of_their_life() {
        assert!(!due(1000, 1300, 1149));
        assert!(due(1000, 1300, 1150));
        assert!(due(1000, 1000, 1000));
    }

    #[test]
    fn audiences_are_checked() {
        assert!(check_audience(&[]).is_err());
        assert!(check_audience(&[String::new()]).is_err());
        assert!(check_audience(&["a".to_owned()]).is_ok());
    }

    /// A holder that signs with one key and counts its calls.
    struct FakeHolder {
        enc: EncodingKey,
        set: JwkSet,
        signed: std::sync::atomic::AtomicUsize,
    }

    impl JwtHolder for FakeHolder {
        fn sign_jwt(&self, request: JwtSignRequest) -> Call<'_, JwtSignResponse> {
            Box::pin(async move {
                self.signed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let iat = unix(SystemTime::now());
                let aud: Vec<&str> = request.audience.iter().map(String::as_str).collect();
                let id = request.entry.spiffe_id.clone();
                Ok(JwtSignResponse {
                    token: token(&self.enc, "k1", &id.to_string(), &aud, iat + 300),
                    spiffe_id: id,
                    issued_at: iat,
                    expires_at: iat + 300,
                })
            })
        }

        fn jwt_bundles(&self) -> Call<'_, JwtBundles> {
            let b = bundles(&[("example.org", &self.set)]);
            Box::pin(async move { Ok(b) })
        }
    }

    #[tokio::test]
    async fn tokens_are_cached_per_identity_and_audience_set() {
        let (enc, set) = key("k1");
        let holder = Arc::new(FakeHolder {
            enc,
            set,
            signed: 0.into(),
        });
        let tokens = Tokens::new(holder.clone(), Duration::from_secs(300));
        let entry: Entry = serde_json::from_value(serde_json::json!({
            "id": "web", "spiffeId": "spiffe://example.org/web", "selectors": ["unix:uid:1"],
            "dir": "web"
        }))
        .expect("entry");
        let now = SystemTime::now();
        let ab = ["a".to_owned(), "b".to_owned()];
        let ba = ["b".to_owned(), "a".to_owned()];
        let first = tokens.token(&entry, &ab, now).await.expect("signed");
        // The JWKS was fetched for the new key.
        let (id, _) = validate(&first.token, "a", &tokens.bundles()).expect("valid");
        assert_eq!(id, entry.spiffe_id);
        let same = tokens.token(&entry, &ba, now).await.expect("cached");
        assert_eq!(same.token, first.token);
        let signed = || holder.signed.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(signed(), 1);
        tokens
            .token(&entry, &["a".to_owned()], now)
            .await
            .expect("other audience set");
        assert_eq!(signed(), 2);
        // At half-life the token is signed again.
        tokens
            .token(&entry, &ab, now + Duration::from_secs(150))
            .await
            .expect("renewed");
        assert_eq!(signed(), 3);
    }
}
