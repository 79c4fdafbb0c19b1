//! The tables of `node list`, `entry list` and `issuances` (the status table is
//! [`meshcert_ca::status::Status::table`], beside its document).

use std::fmt::Write as _;

use meshcert_ca::store::{Issuance, NodeRecord};
use meshcert_protocol::Entry;

/// `node list`.
pub fn nodes(nodes: &[NodeRecord]) -> String {
    let mut t = format!(
        "{:<24} {:<12} {:<12} {:<8} SPIFFE ID\n",
        "NAME", "MESH", "CLUSTER", "BANNED"
    );
    for n in nodes {
        let _ = writeln!(
            t,
            "{:<24} {:<12} {:<12} {:<8} {}",
            n.name,
            n.mesh,
            n.cluster.as_deref().unwrap_or("-"),
            n.banned,
            n.spiffe_id
        );
    }
    t
}

/// `entry list`.
pub fn entries(entries: &[Entry]) -> String {
    let mut t = format!(
        "{:<18} {:<40} {:<24} {:<12} TTL\n",
        "ID", "SPIFFE ID", "ASSIGNED TO", "DIR"
    );
    for e in entries {
        let to = e
            .mesh
            .as_ref()
            .map(|m| format!("mesh {m}"))
            .unwrap_or_else(|| e.nodes.join(","));
        let _ = writeln!(
            t,
            "{:<18} {:<40} {:<24} {:<12} {}",
            e.id,
            e.spiffe_id.to_string(),
            to,
            e.dir,
            humantime::format_duration(e.ttl)
        );
    }
    t
}

/// `issuances`.
pub fn issuances(list: &[Issuance]) -> String {
    let mut t = format!(
        "{:<34} {:<20} {:<12} SPIFFE ID\n",
        "SERIAL", "NOT AFTER", "NODE"
    );
    for i in list {
        let _ = writeln!(
            t,
            "{:<34} {:<20} {:<12} {}",
            i.serial, i.not_after, i.node, i.spiffe_id
        );
    }
    t
}
