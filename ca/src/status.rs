//! The VirtualMesh status document the holder renders (`meshcert-ca status`, admin
//! `GET /v1/status`): `configStatus` and `certificateStatus`, shaped like the Kubernetes
//! resource's status, plus its table form for a person.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use meshcert_protocol::IdentityReport;
use serde::{Deserialize, Serialize};

use crate::store::{NodeRecord, StoredReport};

/// A node is stale when silent for more than this many heartbeats.
pub const STALE_HEARTBEATS: u32 = 3;

/// The whole status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `spec.displayName`.
    pub display_name: String,
    /// The address the HTTPS API is bound to.
    pub listen_address: String,
    /// The configuration's validation result.
    pub config_status: ConfigStatus,
    /// The signing process.
    pub certificate_status: CertificateStatus,
}

/// `configStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// `ACCEPTED` or `INVALID`.
    pub state: String,
    /// Every problem, with its field path.
    pub messages: Vec<String>,
}

impl ConfigStatus {
    /// The status of a configuration that passed validation.
    pub fn accepted() -> Self {
        Self {
            state: "ACCEPTED".into(),
            messages: Vec::new(),
        }
    }

    /// The status of a configuration that failed validation.
    pub fn invalid(messages: Vec<String>) -> Self {
        Self {
            state: "INVALID".into(),
            messages,
        }
    }
}

/// `certificateStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// `ISSUING` while the root and intermediates are valid.
    pub state: String,
    /// The root.
    pub root: RootStatus,
    /// One per mesh.
    pub intermediates: Vec<IntermediateStatus>,
    /// Certificates signed so far (node and workload SVIDs).
    pub svids_issued: u64,
    /// Every node.
    pub nodes: Vec<NodeStatus>,
}

/// The root's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootStatus {
    /// SHA-256 of the DER, hex.
    pub fingerprint_sha256: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
    /// Key size in bits.
    pub key_bits: usize,
    /// Subject organisation.
    pub org: String,
}

/// One intermediate's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateStatus {
    /// The mesh.
    pub mesh: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint_sha256: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
}

/// One node's facts and its reported identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Its mesh.
    pub mesh: String,
    /// Banned nodes can no longer call the holder.
    pub banned: bool,
    /// Last report, RFC 3339 (absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<String>,
    /// Silent for more than three heartbeats.
    pub stale: bool,
    /// The bundle version the node holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_version: Option<u64>,
    /// Its identities as last reported.
    pub identities: Vec<IdentityReport>,
}

/// Whether a node last heard from at `last` (or first seen then) is stale at `now`.
pub fn is_stale(last: SystemTime, now: SystemTime, heartbeat: Duration) -> bool {
    now.duration_since(last).unwrap_or_default() > heartbeat * STALE_HEARTBEATS
}

/// Builds the node part of the status from the datastore's records; pure.
pub fn node_statuses(
    nodes: &[NodeRecord],
    reports: &[StoredReport],
    now: SystemTime,
    heartbeat: Duration,
) -> Vec<NodeStatus> {
    let at = |s: u64| std::time::UNIX_EPOCH + Duration::from_secs(s);
    nodes
        .iter()
        .map(|n| {
            let report = reports.iter().find(|r| r.node == n.name);
            let last = report.map_or(n.first_seen, |r| r.received_at);
            NodeStatus {
                name: n.name.clone(),
                mesh: n.mesh.clone(),
                banned: n.banned,
                last_report: report.map(|r| crate::authority::rfc3339(at(r.received_at))),
                stale: is_stale(at(last), now, heartbeat),
                bundle_version: report.map(|r| r.report.bundle_version),
                identities: report
                    .map(|r| r.report.identities.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

impl Status {
    /// The table a person reads: the holder, then one line per node and per identity.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.certificate_status;
        let _ = writeln!(
            out,
            "{}  config {}  listening on {}  {} SVIDs issued",
            self.display_name, self.config_status.state, self.listen_address, c.svids_issued
        );
        for m in &self.config_status.messages {
            let _ = writeln!(out, "  ! {m}");
        }
        let _ = writeln!(
            out,
            "root  {} bits  O={}  expires {}  sha256 {}",
            c.root.key_bits, c.root.org, c.root.not_after, c.root.fingerprint_sha256
        );
        for i in &c.intermediates {
            let _ = writeln!(
                out,
                "intermediate  {}  {}  expires {}",
                i.mesh, i.trust_domain, i.not_after
            );
        }
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:<9} {:<8} {:<22} LAST REPORT",
            "NODE / IDENTITY", "MESH", "STATE", "BUNDLE", "NOT AFTER"
        );
        for n in &c.nodes {
            let state = if n.banned {
                "BANNED"
            } else if n.stale {
                "STALE"
            } else {
                "OK"
            };
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:<9} {:<8} {:<22} {}",
                n.name,
                n.mesh,
                state,
                n.bundle_version.map_or("-".into(), |v| v.to_string()),
                "",
                n.last_report.as_deref().unwrap_or("never")
            );
            for i in &n.identities {
                let not_after = i.not_after.map_or("-".into(), |s| {
                    crate::authority::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s))
                });
                let _ = writeln!(
                    out,
                    "  {:<22} {:<12} {:<9} {:<8} {:<22} {}",
                    i.spiffe_id.to_string(),
                    "",
                    i.state.as_str(),
                    "",
                    not_after,
                    i.last_error.as_deref().unwrap_or("")
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcert_protocol::NodeReport;

    #[test]
    fn silent_nodes_are_stale_after_three_heartbeats() {
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1000);
        let hb = Duration::from_secs(10);
        let nodes = vec![
            NodeRecord {
                name: "a".into(),
                mesh: "m".into(),
                spiffe_id: "spiffe://m/meshcert/node/a".into(),
                first_seen: 1000,
                banned: false,
            },
            NodeRecord {
                name: "b".into(),
                mesh: "m".into(),
                spiffe_id: "spiffe://m/meshcert/node/b".into(),
                first_seen: 1000,
                banned: false,
            },
        ];
        let reports = vec![StoredReport {
            node: "b".into(),
            report: NodeReport {
                bundle_version: 1,
                ..NodeReport::default()
            },
            received_at: 1025,
        }];
        let s = node_statuses(&nodes, &reports, t0 + Duration::from_secs(31), hb);
        assert!(s[0].stale, "a: silent 31 s > 30 s");
        assert!(!s[1].stale, "b: reported 6 s ago");
        assert_eq!(s[1].bundle_version, Some(1));
        assert!(s[0].last_report.is_none());
        let s = node_statuses(&nodes, &reports, t0 + Duration::from_secs(30), hb);
        assert!(!s[0].stale, "exactly three heartbeats is not yet stale");
    }
}
