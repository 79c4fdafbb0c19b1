//! Which entries the node should hold: pure functions of the holder's entries and the
//! config's local ones, and how that set differs from what is managed now.

use std::collections::BTreeSet;
use std::sync::Arc;

use meshcert_protocol::{Entry, TrustDomain};

/// One entry the node should hold, and whether it is agent-local (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The entry.
    pub entry: Arc<Entry>,
    /// Agent-local: asked for with the entry itself, signed only under DISABLED.
    pub local: bool,
}

/// Why an entry of the inputs is not in the desired set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// A local entry has the id of a holder entry: the holder's wins.
    ShadowedLocal(String),
    /// Another entry already uses this folder: the first one keeps it.
    DirTaken {
        /// The entry left out.
        entry_id: String,
        /// The folder.
        dir: String,
    },
    /// The entry's folder name is not a valid folder name.
    BadDir(String),
}

/// The desired set, in order: the holder's entries, then the local ones whose id the holder
/// does not use; of two entries with one folder the first keeps it. Returns what was left out
/// too, for the logs.
pub fn desired(holder: &[Arc<Entry>], local: &[Entry]) -> (Vec<Wanted>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut all: Vec<Wanted> = holder
        .iter()
        .map(|e| Wanted {
            entry: e.clone(),
            local: false,
        })
        .collect();
    let known: BTreeSet<&str> = holder.iter().map(|e| e.id.as_str()).collect();
    for e in local {
        if known.contains(e.id.as_str()) {
            skipped.push(Skipped::ShadowedLocal(e.id.clone()));
        } else {
            all.push(Wanted {
                entry: Arc::new(e.clone()),
                local: true,
            });
        }
    }
    let mut dirs = BTreeSet::new();
    all.retain(|w| {
        if !dirs.insert(w.entry.dir.clone()) {
            skipped.push(Skipped::DirTaken {
                entry_id: w.entry.id.clone(),
                dir: w.entry.dir.clone(),
            });
            return false;
        }
        if !meshcert_protocol::entry::valid_dir(&w.entry.dir) {
            skipped.push(Skipped::BadDir(w.entry.id.clone()));
            return false;
        }
        true
    });
    (all, skipped)
}

/// The managed ids that are not wanted any more, in order.
pub fn removed<'a>(managed: impl Iterator<Item = &'a String>, wanted: &[Wanted]) -> Vec<String> {
    let keep: BTreeSet<&str> = wanted.iter().map(|w| w.entry.id.as_str()).collect();
    managed
        .filter(|id| !keep.contains(id.as_str()))
        .cloned()
        .collect()
}

/// Whether a local entry may be served under the holder's enforcement: only under DISABLED,
/// and only inside the node's trust domain (the holder refuses it otherwise anyway).
pub fn local_may_serve(
    entry: &Entry,
    trust_domain: &TrustDomain,
    enforcement: meshcert_protocol::Enforcement,
) -> bool {
    enforcement == meshcert_protocol::Enforcement::Disabled
        && trust_domain.contains(&entry.spiffe_id)
}

/// What changed between the managed entry `old` and the wanted `new` (same id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// Anything at all (a refused local entry may be asked again).
    pub any: bool,
    /// Its SPIFFE ID: a new SVID, the old one is dropped.
    pub spiffe_id: bool,
    /// Its folder: the old folder goes.
    pub dir: bool,
    /// Its owner: the old owner could read the key, so a new key is due now.
    pub owner: bool,
}

/// How `new` differs from `old`.
pub fn change(old: &Entry, new: &Entry) -> Change {
    Change {
        any: old != new,
        spiffe_id: old.spiffe_id != new.spiffe_id,
        dir: old.dir != new.dir,
        owner: old.owner != new.owner,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, dir: &str) -> Entry {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "spiffeId": format!("spiffe://mesh-a.test/{id}"),
            "nodes": ["n1"],
            "dir": dir,
        }))
        .expect("entry")
    }

    #[test]
    fn the_holder_wins_ids_and_the_first_entry_keeps_a_folder() {
        let holder = vec![
            Arc::new(entry("web", "web")),
            Arc::new(entry("db", "shared")),
        ];
        let local = vec![
            entry("web", "mine"),
            entry("tool", "shared"),
            entry("cli", "cli"),
        ];
        let (wanted, skipped) = desired(&holder, &local);
        let ids: Vec<(&str, bool)> = wanted
            .iter()
            .map(|w| (w.entry.id.as_str(), w.local))
            .collect();
        assert_eq!(ids, [("web", false), ("db", false), ("cli", true)]);
        assert_eq!(
            skipped,
            [
                Skipped::ShadowedLocal("web".into()),
                Skipped::DirTaken {
                    entry_id: "tool".into(),
                    dir: "shared".into()
                }
            ]
        );
        let managed = ["web".to_owned(), "gone".to_owned()];
        assert_eq!(removed(managed.iter(), &wanted), ["gone"]);
    }

    #[test]
    fn local_entries_are_served_only_under_disabled_inside_the_trust_domain() {
        use meshcert_protocol::Enforcement::{Disabled, Enabled, MeshDefault};
        let td = TrustDomain::new("mesh-a.test").expect("td");
        let other = TrustDomain::new("mesh-b.test").expect("td");
        let e = entry("tool", "tool");
        for (domain, mode, want) in [
            (&td, Disabled, true),
            (&td, Enabled, false),
            (&td, MeshDefault, false),
            (&other, Disabled, false),
        ] {
            assert_eq!(local_may_serve(&e, domain, mode), want, "{domain} {mode:?}");
        }
    }
}
