//! Which SVIDs a caller receives: an entry matches a caller when every one of its selectors
//! matches (an entry without selectors matches nobody); the caller receives the SVIDs of every
//! matching entry, in the snapshot's entry order, so its default comes first.
//!
//! Pure: the caller is described by a [`PeerInfo`] read elsewhere ([`super::peer`]).

use std::sync::Arc;
use std::time::SystemTime;

use meshcert_protocol::Selector;

use super::peer::PeerInfo;
use crate::cache::{InstalledSvid, Snapshot};
use crate::kubelet::PodFacts;

/// Whether one selector matches the caller. `k8s:` selectors match only a caller whose pod
/// was attested.
pub fn selector_matches(selector: &Selector, peer: &PeerInfo) -> bool {
    match selector {
        Selector::Uid(uid) => peer.uid == *uid,
        Selector::Gid(gid) => peer.gid == *gid || peer.groups.contains(gid),
        Selector::User(name) => peer.user.as_deref() == Some(name.as_str()),
        Selector::Group(name) => peer.group_names.iter().any(|g| g == name),
        Selector::Path(path) => peer.exe.as_deref() == Some(path.as_path()),
        k8s => peer.pod.as_deref().is_some_and(|pod| pod_matches(k8s, pod)),
    }
}

/// Whether a `k8s:` selector matches the caller's pod (a `unix:` one never does here).
fn pod_matches(selector: &Selector, pod: &PodFacts) -> bool {
    match selector {
        Selector::K8sNamespace(ns) => pod.namespace == *ns,
        Selector::K8sServiceAccount(sa) => pod.service_account == *sa,
        Selector::K8sPodName(name) => pod.pod_name == *name,
        Selector::K8sPodUid(uid) => pod.pod_uid == *uid,
        Selector::K8sPodLabel(key, value) => pod.labels.get(key) == Some(value),
        Selector::K8sContainerName(name) => pod.container_name.as_ref() == Some(name),
        Selector::K8sContainerImage(image) => pod.container_image.as_ref() == Some(image),
        Selector::K8sNodeName(node) => pod.node_name == *node,
        _ => false,
    }
}

/// Whether an entry with these selectors matches the caller: all must match, and there must
/// be at least one.
pub fn entry_matches(selectors: &[Selector], peer: &PeerInfo) -> bool {
    !selectors.is_empty() && selectors.iter().all(|s| selector_matches(s, peer))
}

/// The SVIDs the caller receives at `now`: unexpired, matching, default first.
pub fn svids_for<'a>(
    snapshot: &'a Snapshot,
    peer: &PeerInfo,
    now: SystemTime,
) -> Vec<&'a Arc<InstalledSvid>> {
    snapshot
        .valid_svids(now)
        .filter(|svid| entry_matches(&svid.entry.selectors, peer))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use meshcert_protocol::{Entry, SpiffeId};
    use zeroize::Zeroizing;

    use super::*;

    fn peer() -> PeerInfo {
        PeerInfo {
            pid: 42,
            uid: 1000,
            gid: 100,
            groups: vec![100, 27, 998],
            user: Some("web".into()),
            group_names: vec!["users".into(), "sudo".into(), "docker".into()],
            exe: Some(PathBuf::from("/usr/bin/nginx")),
            ..PeerInfo::default()
        }
    }

    fn sel(s: &str) -> Selector {
        s.parse().expect("test selectors are valid")
    }

    #[test]
    fn selector_table() {
        let bare = PeerInfo {
            uid: 1000,
            gid: 100,
            ..PeerInfo::default()
        };
        let cases: &[(&str, &PeerInfo, bool)] = &[
            ("unix:uid:1000", &peer(), true),
            ("unix:uid:0", &peer(), false),
            ("unix:gid:100", &peer(), true),
            ("unix:gid:998", &peer(), true), // supplementary
            ("unix:gid:5", &peer(), false),
            ("unix:user:web", &peer(), true),
            ("unix:user:root", &peer(), false),
            ("unix:user:web", &bare, false), // no name known
            ("unix:group:users", &peer(), true),
            ("unix:group:docker", &peer(), true), // supplementary
            ("unix:group:wheel", &peer(), false),
            ("unix:path:/usr/bin/nginx", &peer(), true),
            ("unix:path:/usr/bin/nginx2", &peer(), false),
            ("unix:path:/usr/bin", &peer(), false), // no prefix match
            ("unix:path:/usr/bin/nginx", &bare, false), // exe unknown: fails closed
            ("k8s:ns:default", &peer(), false),
            ("k8s:sa:web", &peer(), false),
        ];
        for (selector, who, want) in cases {
            assert_eq!(
                selector_matches(&sel(selector), who),
                *want,
                "{selector} against {who:?}"
            );
        }
    }

    #[test]
    fn k8s_selectors_match_the_attested_pod_only() {
        let pod = crate::kubelet::PodFacts {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod_name: "web-0".into(),
            pod_uid: "u1".into(),
            node_name: "worker-1".into(),
            labels: [("app.kubernetes.io/name".to_owned(), "web".to_owned())].into(),
            container_name: Some("app".into()),
            container_image: Some("ghcr.io/example/web:1.0".into()),
        };
        let in_pod = PeerInfo {
            pod: Some(Arc::new(pod.clone())),
            ..peer()
        };
        let no_container = PeerInfo {
            pod: Some(Arc::new(crate::kubelet::PodFacts {
                container_name: None,
                container_image: None,
                ..pod
            })),
            ..peer()
        };
        let cases: &[(&str, &PeerInfo, bool)] = &[
            ("k8s:ns:shop", &in_pod, true),
            ("k8s:ns:default", &in_pod, false),
            ("k8s:sa:web", &in_pod, true),
            ("k8s:sa:db", &in_pod, false),
            ("k8s:pod-name:web-0", &in_pod, true),
            ("k8s:pod-uid:u1", &in_pod, true),
            ("k8s:pod-uid:u2", &in_pod, false),
            ("k8s:pod-label:app.kubernetes.io/name:web", &in_pod, true),
            ("k8s:pod-label:app.kubernetes.io/name:db", &in_pod, false),
            ("k8s:pod-label:tier:web", &in_pod, false),
            ("k8s:container-name:app", &in_pod, true),
            ("k8s:container-name:app", &no_container, false),
            ("k8s:container-image:ghcr.io/example/web:1.0", &in_pod, true),
            ("k8s:node-name:worker-1", &in_pod, true),
            ("k8s:node-name:worker-2", &in_pod, false),
            ("k8s:ns:shop", &no_container, true),
            ("unix:uid:1000", &in_pod, true),
        ];
        for (selector, who, want) in cases {
            assert_eq!(selector_matches(&sel(selector), who), *want, "{selector}");
        }
    }

    #[test]
    fn entry_table() {
        let cases: &[(&[&str], bool)] = &[
            (&["unix:uid:1000"], true),
            (&["unix:uid:1000", "unix:gid:27"], true),
            (&["unix:uid:1000", "unix:gid:5"], false), // all must match
            (&["unix:uid:1000", "k8s:ns:default"], false),
            (&[], false), // no selectors: nobody
        ];
        for (selectors, want) in cases {
            let selectors: Vec<Selector> = selectors.iter().map(|s| sel(s)).collect();
            assert_eq!(entry_matches(&selectors, &peer()), *want, "{selectors:?}");
        }
    }

    fn installed(id: &str, selectors: &[&str], not_after: SystemTime) -> Arc<InstalledSvid> {
        let spiffe_id = SpiffeId::new(id).expect("valid test id");
        Arc::new(InstalledSvid {
            entry: Arc::new(Entry {
                id: id.rsplit('/').next().unwrap_or_default().to_owned(),
                spiffe_id: spiffe_id.clone(),
                nodes: vec![],
                mesh: None,
                selectors: selectors.iter().map(|s| sel(s)).collect(),
                ttl: Duration::from_secs(3600),
                dir: "d".into(),
                owner: None,
                hook: None,
                gateway: false,
            }),
            spiffe_id,
            leaf: vec![1],
            intermediates: Vec::new().into(),
            key_pkcs8: Arc::new(Zeroizing::new(vec![2])),
            not_after,
            hint: String::new(),
        })
    }

    #[test]
    fn a_caller_gets_every_matching_unexpired_svid_in_entry_order() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = now + Duration::from_secs(60);
        let snapshot = Snapshot {
            svids: vec![
                installed("spiffe://example.org/other", &["unix:uid:0"], later),
                installed("spiffe://example.org/web", &["unix:uid:1000"], later),
                installed("spiffe://example.org/none", &[], later),
                installed("spiffe://example.org/old", &["unix:uid:1000"], now),
                installed("spiffe://example.org/admin", &["unix:group:sudo"], later),
            ],
            ..Snapshot::default()
        };
        let got: Vec<String> = svids_for(&snapshot, &peer(), now)
            .iter()
            .map(|s| s.spiffe_id.to_string())
            .collect();
        assert_eq!(
            got,
            ["spiffe://example.org/web", "spiffe://example.org/admin"]
        );
    }
}
