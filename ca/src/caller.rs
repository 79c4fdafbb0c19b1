//! One API connection's client certificate chain, and what the holder found out about it.
//!
//! The chain of a TLS connection cannot change while it is open, yet every call on it must name
//! its node and prove that the chain verifies to that node's own mesh root
//! ([`Authority::verify_node_chain`](crate::authority::Authority::verify_node_chain): a
//! signature check per certificate, the largest part of a small call's CPU). So the node's
//! identity is read from the leaf once per connection, and a successful verification is
//! remembered for the serving snapshot it was made with (a reload or a rotation makes a new
//! one, which verifies again) until the first certificate of the chain expires. What can change
//! between two calls, the node's record (banned, its mesh), is still read for every call.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshcert_protocol::SpiffeId;
use meshcert_protocol::api::node_name;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::holder::Serving;

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

/// A verification that succeeded.
#[derive(Debug)]
struct Verified {
    /// The serving snapshot it was made with (weak: a replaced snapshot is not kept alive, and
    /// its allocation is, so its address is never taken by a newer one).
    serving: Weak<Serving>,
    /// The mesh it was verified for.
    mesh: String,
}

/// A connection's client chain (leaf first, DER) with its identity and verification remembered.
#[derive(Debug, Default)]
pub struct ClientChain {
    der: Vec<Vec<u8>>,
    identity: OnceLock<Option<NodeIdentity>>,
    verified: Mutex<Option<Verified>>,
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

    /// Whether the chain was verified for `mesh` with this very `serving` snapshot and is still
    /// within every certificate's validity at `now`.
    pub fn verified_for(&self, serving: &Arc<Serving>, mesh: &str, now: SystemTime) -> bool {
        let Some(identity) = self.identity() else {
            return false;
        };
        if now >= identity.until {
            return false;
        }
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        verified.as_ref().is_some_and(|v| {
            v.mesh == mesh && std::ptr::eq(v.serving.as_ptr(), Arc::as_ptr(serving))
        })
    }

    /// Remembers that the chain verified for `mesh` with `serving`.
    pub fn remember_verified(&self, serving: &Arc<Serving>, mesh: &str) {
        *self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Verified {
            serving: Arc::downgrade(serving),
            mesh: mesh.to_owned(),
        });
    }
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

    use super::ClientChain;
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
    fn a_connection_verifies_once_per_snapshot_and_still_sees_a_ban() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let (holder, der) = joined(dir.path(), now);
        let chain = ClientChain::new(der);
        let identity = chain.identity().expect("a node SVID");
        assert_eq!(identity.node, "n1");
        let until = identity.until;

        let serving = holder.serving();
        assert!(!chain.verified_for(&serving, "mesh-a", now));
        let caller = holder.caller(Some(&chain), now).expect("known node");
        assert_eq!(caller.node, "n1");
        assert!(chain.verified_for(&serving, "mesh-a", now));
        assert!(!chain.verified_for(&serving, "mesh-b", now), "another mesh");
        assert!(!chain.verified_for(&serving, "mesh-a", until), "expired");

        // A reload makes a new snapshot: the chain is verified again with it.
        let text = VIRTUAL_MESH.replace("STATE", &dir.path().display().to_string());
        holder.reload(Ok(crate::config::parse(&text).expect("valid")), now);
        let reloaded = holder.serving();
        assert!(!chain.verified_for(&reloaded, "mesh-a", now));
        holder.caller(Some(&chain), now).expect("still known");
        assert!(chain.verified_for(&reloaded, "mesh-a", now));

        // A ban is read for every call, whatever the connection remembers.
        holder.store.ban_node("n1").expect("ban");
        let refused = holder.caller(Some(&chain), now).expect_err("banned");
        assert_eq!(refused.code, ErrorCode::NodeBanned);
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
