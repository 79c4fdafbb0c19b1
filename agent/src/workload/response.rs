//! The Workload API messages built from a [`Snapshot`]: DER encodings as the SPIFFE standard
//! wants them (chains and bundles as concatenated raw DER, keys as PKCS#8 DER), bundle maps
//! keyed by `spiffe://<trust domain>`.
//!
//! Pure: the caller's SVIDs are chosen by [`super::selection`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::proto::{X509BundlesResponse, X509svid, X509svidResponse};
use crate::cache::{InstalledSvid, Snapshot};

/// The longest hint the standard allows, in bytes.
const MAX_HINT: usize = 1024;

/// The `FetchX509SVID` message for a caller entitled to `svids` (default first).
pub fn x509_svid_response(snapshot: &Snapshot, svids: &[&Arc<InstalledSvid>]) -> X509svidResponse {
    let mut hints = BTreeSet::new();
    let svids = svids
        .iter()
        .map(|svid| {
            // Hints must be unique within a response and short: a later duplicate is dropped.
            let hint = if svid.hint.len() <= MAX_HINT && hints.insert(svid.hint.as_str()) {
                svid.hint.clone()
            } else {
                String::new()
            };
            X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: svid.chain_der(),
                x509_svid_key: svid.key_pkcs8.to_vec(),
                bundle: bundle_for(snapshot, svid),
                hint,
            }
        })
        .collect();
    X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: federated(snapshot),
    }
}

/// The `FetchX509Bundles` message: the node's own bundle and, when federation is on, every
/// other trust domain's.
pub fn x509_bundles_response(snapshot: &Snapshot) -> X509BundlesResponse {
    let mut bundles = federated(snapshot);
    if let Some(td) = &snapshot.trust_domain {
        bundles.insert(td.id_string(), snapshot.own_bundle());
    }
    X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    }
}

/// The bundle an SVID is verified with: its own trust domain's CA certificates, plus the shared
/// root for gateways (limited trust).
fn bundle_for(snapshot: &Snapshot, svid: &InstalledSvid) -> Vec<u8> {
    let mut bundle = snapshot
        .bundles
        .get(svid.spiffe_id.trust_domain())
        .map(|certs| certs.concat())
        .unwrap_or_else(|| snapshot.own_bundle());
    if svid.entry.gateway {
        for root in &snapshot.shared_root {
            bundle.extend_from_slice(root);
        }
    }
    bundle
}

fn federated(snapshot: &Snapshot) -> HashMap<String, Vec<u8>> {
    snapshot
        .federated_bundles()
        .map(|(td, certs)| (td.id_string(), certs.concat()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use meshcert_protocol::{Entry, SpiffeId, TrustDomain};
    use zeroize::Zeroizing;

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).expect("valid test trust domain")
    }

    fn svid(id: &str, hint: &str) -> Arc<InstalledSvid> {
        let spiffe_id = SpiffeId::new(id).expect("valid test id");
        Arc::new(InstalledSvid {
            entry: Arc::new(Entry {
                id: "e".into(),
                spiffe_id: spiffe_id.clone(),
                nodes: vec![],
                mesh: None,
                selectors: vec![],
                ttl: Duration::from_secs(60),
                dir: "d".into(),
                owner: None,
                hook: None,
                gateway: false,
            }),
            spiffe_id,
            leaf: vec![0xa1],
            intermediates: vec![vec![0xa2]].into(),
            key_pkcs8: Arc::new(Zeroizing::new(vec![0xbb])),
            not_after: SystemTime::UNIX_EPOCH,
            hint: hint.into(),
        })
    }

    fn snapshot(federate: bool) -> Snapshot {
        Snapshot {
            trust_domain: Some(td("a.org")),
            bundles: BTreeMap::from([
                (td("a.org"), vec![vec![1], vec![2]]),
                (td("b.org"), vec![vec![3]]),
            ]),
            federate,
            ..Snapshot::default()
        }
    }

    #[test]
    fn svid_message_concatenates_der_and_keys_bundles_by_id() {
        let (one, two) = (
            svid("spiffe://a.org/web", "web"),
            svid("spiffe://a.org/two", "web"),
        );
        let msg = x509_svid_response(&snapshot(true), &[&one, &two]);
        assert_eq!(msg.svids.len(), 2);
        assert_eq!(msg.svids[0].spiffe_id, "spiffe://a.org/web");
        assert_eq!(msg.svids[0].x509_svid, vec![0xa1, 0xa2]);
        assert_eq!(msg.svids[0].x509_svid_key, vec![0xbb]);
        assert_eq!(msg.svids[0].bundle, vec![1, 2]);
        assert_eq!(msg.svids[0].hint, "web");
        assert_eq!(msg.svids[1].hint, "", "duplicate hints are dropped");
        assert_eq!(
            msg.federated_bundles,
            HashMap::from([("spiffe://b.org".to_owned(), vec![3])])
        );
        let msg = x509_svid_response(&snapshot(false), &[&one]);
        assert!(msg.federated_bundles.is_empty());
    }

    #[test]
    fn bundles_message_holds_own_and_federated_domains() {
        let msg = x509_bundles_response(&snapshot(true));
        assert_eq!(
            msg.bundles,
            HashMap::from([
                ("spiffe://a.org".to_owned(), vec![1, 2]),
                ("spiffe://b.org".to_owned(), vec![3]),
            ])
        );
        let msg = x509_bundles_response(&snapshot(false));
        assert_eq!(msg.bundles.len(), 1);
    }
}
