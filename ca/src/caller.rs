//! A client certificate chain, and what the holder found out about it.
//!
//! Every call must name its node and prove that the chain verifies to that node's own mesh
//! root ([`Authority::verify_node_chain`](crate::authority::Authority::verify_node_chain): a
//! signature check per certificate, the largest part of a small call's CPU). The node's
//! identity is read from the leaf once per connection ([`ClientChain`]). A successful
//! verification is remembered across connections ([`VerifiedChains`], one per serving
//! snapshot, so a reload or a rotation starts empty and verifies again), keyed by the SHA-256
//! of the chain's DER and the mesh it was verified for, until the first certificate of the
//! chain expires; the number remembered is bounded. What can change between two calls, the
//! node's record (banned, its mesh, its SPIFFE ID), is still read for every call.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshcert_protocol::SpiffeId;
use meshcert_protocol::api::node_name;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::holder::Serving;

/// How many verified chains a snapshot remembers at most (about 100 bytes each: 6.5 MB at
/// most). A fleet has about two live node SVIDs per node (the current one and, for a while
/// after a renewal, the previous one on connections still open).
pub const VERIFIED_CHAINS_KEPT: usize = 65_536;

/// Who the leaf of a chain says it is.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The leaf's (first) URI SAN.
    pub id: SpiffeId,
    /// The node name that ID carries.
    pub node: String,
    /// When the first certificate of the chain expires: no verification outlives it.
    pub until: SystemTime,
}

/// The SHA-256 of a chain: every certificate's length (8 bytes, big-endian) then its DER.
pub type ChainDigest = [u8; 32];

/// A verification that succeeded.
#[derive(Debug)]
struct Verified {
    /// The mesh it was verified for.
    mesh: String,
    /// The chain's first expiry.
    until: SystemTime,
}

/// The chains verified with one serving snapshot, whichever connection presented them.
#[derive(Debug, Default)]
pub struct VerifiedChains {
    chains: Mutex<HashMap<ChainDigest, Verified>>,
}

impl VerifiedChains {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChainDigest, Verified>> {
        self.chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the chain with `digest` was verified for `mesh` and is still valid at `now`.
    pub fn contains(&self, digest: &ChainDigest, mesh: &str, now: SystemTime) -> bool {
        self.lock()
            .get(digest)
            .is_some_and(|v| v.mesh == mesh && now < v.until)
    }

    /// Remembers that the chain with `digest` verified for `mesh`, until `until`. When full,
    /// the expired ones are dropped first, and if none were, all of them (each then verifies
    /// once more): the size stays bounded whatever clients present.
    pub fn remember(&self, digest: ChainDigest, mesh: &str, until: SystemTime, now: SystemTime) {
        let mut chains = self.lock();
        if chains.len() >= VERIFIED_CHAINS_KEPT && !chains.contains_key(&digest) {
            chains.retain(|_, v| now < v.until);
            if chains.len() >= VERIFIED_CHAINS_KEPT {
                chains.clear();
            }
        }
        chains.insert(
            digest,
            Verified {
                mesh: mesh.to_owned(),
                until,
            },
        );
    }

    /// How many chains are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's client chain (leaf first, DER) with its identity and digest, read once.
#[derive(Debug, Default)]
pub struct ClientChain {
    der: Vec<Vec<u8>>,
    identity: OnceLock<Option<NodeIdentity>>,
    digest: OnceLock<ChainDigest>,
}

impl ClientChain {
    /// The chain a client presented.
    pub fn new(der: Vec<Vec<u8>>) -> Self {
        Self {
            der,
            ..Self::default()
        }
    }

    /// The certificates, leaf first.
    pub fn der(&self) -> &[Vec<u8>] {
        &self.der
    }

    /// The node the leaf names (None: not a node SVID, or a certificate does not parse), read
    /// once.
    pub fn identity(&self) -> Option<&NodeIdentity> {
        self.identity
            .get_or_init(|| identity_of(&self.der))
            .as_ref()
    }

    /// The chain's digest, computed once.
    pub fn digest(&self) -> &ChainDigest {
        self.digest.get_or_init(|| digest_of(&self.der))
    }

    /// Whether this chain was verified for `mesh` with this very `serving` snapshot (by any
    /// connection) and is still within every certificate's validity at `now`.
    pub fn verified_for(&self, serving: &Serving, mesh: &str, now: SystemTime) -> bool {
        let Some(identity) = self.identity() else {
            return false;
        };
        now < identity.until && serving.verified_chains.contains(self.digest(), mesh, now)
    }

    /// Remembers that the chain verified for `mesh` with `serving`.
    pub fn remember_verified(&self, serving: &Serving, mesh: &str, now: SystemTime) {
        if let Some(identity) = self.identity() {
            serving
                .verified_chains
                .remember(*self.digest(), mesh, identity.until, now);
        }
    }
}

fn digest_of(der: &[Vec<u8>]) -> ChainDigest {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for cert in der {
        context.update(&u64::try_from(cert.len()).unwrap_or(u64::MAX).to_be_bytes());
        context.update(cert);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// The leaf's node identity and the chain's earliest expiry.
fn identity_of(der: &[Vec<u8>]) -> Option<NodeIdentity> {
    let (_, leaf) = X509Certificate::from_der(der.first()?).ok()?;
    let uri = crate::authority::uri_sans(&leaf).into_iter().next()?;
    let id = SpiffeId::new(&uri).ok()?;
    let node = node_name(&id)?.to_owned();
    let mut until = not_after(&leaf);
    for cert in &der[1..] {
        let (_, parsed) = X509Certificate::from_der(cert).ok()?;
        until = until.min(not_after(&parsed));
    }
    Some(NodeIdentity { id, node, until })
}

fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use meshcert_protocol::api::{AttestRequest, Der, ErrorCode};
    use rcgen::{CertificateParams, KeyPair};

    use super::{ClientChain, VERIFIED_CHAINS_KEPT, VerifiedChains};
    use crate::holder::Holder;
    use crate::testing::VIRTUAL_MESH;

    /// A holder with node `n1` joined: the node's chain, leaf first.
    fn joined(dir: &std::path::Path, now: SystemTime) -> (Holder, Vec<Vec<u8>>) {
        let text = VIRTUAL_MESH.replace("STATE", &dir.display().to_string());
        let holder = Holder::open(crate::config::parse(&text).expect("valid"), now).expect("open");
        let token = holder
            .create_token("n1", "mesh-a", Duration::from_secs(600), now)
            .expect("token");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .der()
            .to_vec();
        let answer = holder
            .attest(
                &AttestRequest {
                    token,
                    csr: Der(csr),
                },
                now,
            )
            .expect("attest");
        let chain = answer.svid.chain.into_iter().map(|d| d.0).collect();
        (holder, chain)
    }

    #[test]
    fn a_verified_chain_is_remembered_across_connections_within_its_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let (holder, der) = joined(dir.path(), now);
        let first = ClientChain::new(der.clone());
        let identity = first.identity().expect("a node SVID");
        assert_eq!(identity.node, "n1");
        let until = identity.until;

        let serving = holder.serving();
        assert!(!first.verified_for(&serving, "mesh-a", now));
        let caller = holder.caller(Some(&first), now).expect("known node");
        assert_eq!(caller.node, "n1");
        // Another connection presenting the same chain finds it verified.
        let second = ClientChain::new(der.clone());
        assert!(second.verified_for(&serving, "mesh-a", now));
        assert!(
            !second.verified_for(&serving, "mesh-b", now),
            "another mesh"
        );
        assert!(!second.verified_for(&serving, "mesh-a", until), "expired");
        assert_eq!(serving.verified_chains.len(), 1);

        // A reload makes a new snapshot: the chain is verified again with it.
        let text = VIRTUAL_MESH.replace("STATE", &dir.path().display().to_string());
        holder.reload(Ok(crate::config::parse(&text).expect("valid")), now);
        let reloaded = holder.serving();
        assert!(!second.verified_for(&reloaded, "mesh-a", now));
        holder.caller(Some(&second), now).expect("still known");
        assert!(ClientChain::new(der.clone()).verified_for(&reloaded, "mesh-a", now));

        // So does a root rotation step.
        crate::rotation::rotate(&holder, &crate::rotation::Scope::Shared, None, "test", now)
            .expect("rotate");
        let rotated = holder.serving();
        assert!(!std::ptr::eq(rotated.as_ref(), reloaded.as_ref()));
        assert!(!second.verified_for(&rotated, "mesh-a", now));

        // A ban is read for every call, whatever was remembered.
        holder.store.ban_node("n1").expect("ban");
        let refused = holder.caller(Some(&second), now).expect_err("banned");
        assert_eq!(refused.code, ErrorCode::NodeBanned);
    }

    #[test]
    fn a_chain_from_another_authority_is_refused_and_not_remembered() {
        let (ours, theirs) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let now = SystemTime::now();
        let (holder, _) = joined(ours.path(), now);
        // Another holder (its own root) issues a node SVID for the same node name and mesh.
        let (_, forged) = joined(theirs.path(), now);
        let chain = ClientChain::new(forged.clone());
        let refused = holder.caller(Some(&chain), now).expect_err("not our root");
        assert_eq!(refused.code, ErrorCode::Unauthenticated);
        let serving = holder.serving();
        assert!(serving.verified_chains.is_empty());
        let again = holder
            .caller(Some(&ClientChain::new(forged)), now)
            .expect_err("still not our root");
        assert_eq!(again.code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn the_verified_chains_stay_bounded() {
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        let digest = |i: usize| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_be_bytes());
            d
        };
        // Full of chains, one of them expired: the expired one makes room.
        chains.remember(digest(0), "mesh-a", now + Duration::from_secs(1), now);
        for i in 1..VERIFIED_CHAINS_KEPT {
            chains.remember(digest(i), "mesh-a", now + Duration::from_secs(3600), now);
        }
        assert_eq!(chains.len(), VERIFIED_CHAINS_KEPT);
        let later = now + Duration::from_secs(2);
        chains.remember(
            digest(VERIFIED_CHAINS_KEPT),
            "mesh-a",
            later + Duration::from_secs(60),
            later,
        );
        assert_eq!(chains.len(), VERIFIED_CHAINS_KEPT);
        assert!(!chains.contains(&digest(0), "mesh-a", now));
        assert!(chains.contains(&digest(1), "mesh-a", later));
        // Full of live chains: it starts again rather than growing.
        chains.remember(
            digest(VERIFIED_CHAINS_KEPT + 1),
            "mesh-a",
            later + Duration::from_secs(60),
            later,
        );
        assert!(chains.len() <= VERIFIED_CHAINS_KEPT);
        assert!(chains.contains(&digest(VERIFIED_CHAINS_KEPT + 1), "mesh-a", later));
    }

    #[test]
    fn a_chain_that_names_no_node_has_no_identity() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let chain = ClientChain::new(vec![cert.der().to_vec()]);
        assert!(chain.identity().is_none());
        assert!(
            ClientChain::new(vec![b"not DER".to_vec()])
                .identity()
                .is_none()
        );
    }
}
