//! An installed SVID as the rotation core holds it (key, what the check read from the leaf)
//! and as the cache serves it (an [`InstalledSvid`] shared with every snapshot).

use std::sync::Arc;

use meshcert_protocol::Entry;

use crate::cache::{InstalledSvid, Intermediates};
use crate::keys::PrivateKey;
use crate::svid::LeafInfo;

/// The hint of a gateway's second SVID in the Workload API.
pub const GATEWAY_HINT: &str = "gateway";

/// A chain that passed [`crate::svid::check`], with what the check read from its leaf.
pub type CheckedChain = (Vec<Vec<u8>>, LeafInfo);

/// An installed SVID. Its chain is held once, in `served` (shared with the snapshots).
#[derive(Clone)]
pub struct Installed {
    /// Its private key.
    pub key: PrivateKey,
    /// What the check read from the leaf.
    pub info: LeafInfo,
    /// What the Workload API serves.
    pub served: Arc<InstalledSvid>,
    /// A gateway's second SVID (same key, chained to the shared root), under limited trust.
    pub gateway: Option<Arc<InstalledSvid>>,
}

impl std::fmt::Debug for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed")
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .field("gateway", &self.gateway.is_some())
            .finish_non_exhaustive()
    }
}

/// The leaf, and the intermediates after it as the shared copy.
fn split_chain(intermediates: &Intermediates, chain: Vec<Vec<u8>>) -> (Vec<u8>, Arc<[Vec<u8>]>) {
    let mut certs = chain.into_iter();
    let leaf = certs.next().unwrap_or_default();
    (leaf, intermediates.share(certs.collect()))
}

impl Installed {
    /// An SVID for `entry` whose chain (and gateway chain) passed their checks.
    pub fn new(
        intermediates: &Intermediates,
        entry: &Arc<Entry>,
        key: PrivateKey,
        (chain, info): CheckedChain,
        gateway: Option<CheckedChain>,
    ) -> Self {
        let key_pkcs8 = key.shared_pkcs8();
        let (leaf, shared) = split_chain(intermediates, chain);
        let served = Arc::new(InstalledSvid {
            entry: entry.clone(),
            spiffe_id: info.spiffe_id.clone(),
            leaf,
            intermediates: shared,
            key_pkcs8: key_pkcs8.clone(),
            not_after: info.not_after,
            hint: entry.id.clone(),
        });
        let gateway = gateway.map(|(chain, ginfo)| {
            let (leaf, shared) = split_chain(intermediates, chain);
            Arc::new(InstalledSvid {
                entry: entry.clone(),
                spiffe_id: ginfo.spiffe_id.clone(),
                leaf,
                intermediates: shared,
                key_pkcs8,
                not_after: ginfo.not_after,
                hint: GATEWAY_HINT.into(),
            })
        });
        Self {
            key,
            info,
            served,
            gateway,
        }
    }

    /// The same SVID served under a changed `entry` (selectors, folder or owner changed).
    pub fn under(&self, entry: &Arc<Entry>) -> Self {
        let rewrap = |s: &Arc<InstalledSvid>| {
            Arc::new(InstalledSvid {
                entry: entry.clone(),
                ..(**s).clone()
            })
        };
        Self {
            key: self.key.clone(),
            info: self.info.clone(),
            served: rewrap(&self.served),
            gateway: self.gateway.as_ref().map(rewrap),
        }
    }
}
