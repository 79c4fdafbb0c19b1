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

/// Whether one selector matches the caller. Kubernetes selectors never match a Unix caller.
pub fn selector_matches(selector: &Selector, peer: &PeerInfo) -> bool {
    match selector {
        Selector::Uid(uid) => peer.uid == *uid,
        Selector::Gid(gid) => peer.gid == *gid || peer.groups.contains(gid),
        Selector::User(name) => peer.user.as_deref() == Some(name.as_str()),
        Selector::Group(name) => peer.group_names.iter().any(|g| g == name),
        Selector::Path(path) => peer.exe.as_deref() == Some(path.as_path()),
        Selector::K8sNamespace(_) | Selector::K8sServiceAccount(_) => false,
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
