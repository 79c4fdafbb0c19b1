//! The VirtualMesh status document the holder renders (`meshcert-ca status`, admin
//! `GET /v1/status`): `configStatus`, `certificateStatus`, `federationStatus` and
//! `accessControlEnforcementStatus`, shaped like the Kubernetes resource's status, each with a
//! state and messages; plus its table form for a person ([`table`]). The aggregations are pure
//! functions; [`build`] assembles the document from the holder's state.

use std::time::{Duration, SystemTime};

use meshcert_protocol::{Enforcement, IdentityReport, NodeReport};
use serde::{Deserialize, Serialize};

use crate::store::{NodeRecord, StoredReport};

mod build;
mod table;

pub use build::{ServerCert, StatusBuilder};

/// A node is stale when silent for more than this many heartbeats.
pub const STALE_HEARTBEATS: u32 = 3;

/// The state of one part of the status, as the Kubernetes resource has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Done and in force everywhere.
    Accepted,
    /// The configuration is invalid (the previous one keeps serving).
    Invalid,
    /// The holder failed to act on a valid configuration (the previous one keeps serving).
    ProcessingError,
    /// In force on the holder, not yet on every node.
    Pending,
}

impl State {
    /// The name as it appears in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "ACCEPTED",
            Self::Invalid => "INVALID",
            Self::ProcessingError => "PROCESSING_ERROR",
            Self::Pending => "PENDING",
        }
    }
}

/// The whole status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `spec.displayName`.
    pub display_name: String,
    /// The address the HTTPS API is bound to.
    pub listen_address: String,
    /// The address of the plaintext `/metrics` listener, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// The configuration's validation result.
    pub config_status: ConfigStatus,
    /// The signing process.
    pub certificate_status: CertificateStatus,
    /// Which bundle version each mesh's nodes hold.
    pub federation_status: FederationStatus,
    /// The issuance mode of each mesh and whether its nodes apply it.
    pub access_control_enforcement_status: EnforcementStatus,
}

/// `configStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// `ACCEPTED`, `INVALID` (validation failed) or `PROCESSING_ERROR` (valid, but the holder
    /// could not act on it); in both failure cases the last accepted configuration serves.
    pub state: State,
    /// Every problem, with its field path.
    pub messages: Vec<String>,
}

impl ConfigStatus {
    /// The status of a configuration that passed validation.
    pub fn accepted() -> Self {
        Self {
            state: State::Accepted,
            messages: Vec::new(),
        }
    }

    /// The status of a configuration that failed validation.
    pub fn invalid(messages: Vec<String>) -> Self {
        Self {
            state: State::Invalid,
            messages,
        }
    }
}

/// `certificateStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// `ACCEPTED` while every root and intermediate is valid, `PROCESSING_ERROR` otherwise.
    pub state: State,
    /// What is wrong, when something is.
    pub messages: Vec<String>,
    /// `SHARED` or `LIMITED`.
    pub trust: String,
    /// The virtual mesh's (shared) root.
    pub root: RootStatus,
    /// Under limited trust, each mesh's own root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_roots: Vec<MeshRootStatus>,
    /// One per mesh (and under limited trust one more per mesh, the gateway intermediate).
    pub intermediates: Vec<IntermediateStatus>,
    /// The HTTPS API's server certificate (renewed at half-life).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<ServerCertStatus>,
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

/// A mesh's own root (limited trust).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshRootStatus {
    /// The mesh.
    pub mesh: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint_sha256: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
}

/// The API's server certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerCertStatus {
    /// SHA-256 of the DER, hex.
    pub fingerprint_sha256: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
    /// When the holder renews it (half of its life), RFC 3339.
    pub renew_at: String,
}

/// A warning about the server certificate while less than a third of its life is left: its
/// renewal (due at half-life) keeps failing, or the root that signs it ends soon. Agents'
/// handshakes fail once it expires.
pub fn server_cert_warning(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> Option<String> {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let left = not_after.duration_since(now).unwrap_or_default();
    if left.is_zero() {
        return Some(format!(
            "the holder's server certificate expired at {}: agents cannot connect",
            crate::authority::rfc3339(not_after)
        ));
    }
    (left < life / 3).then(|| {
        format!(
            "the holder's server certificate expires at {} (in {}); it should have been renewed at half-life",
            crate::authority::rfc3339(not_after),
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        )
    })
}

/// `text` with every control character (and bidirectional-override character) escaped as
/// `\u{..}`: node-reported text must not move the terminal's cursor, change its colours or
/// forge lines of the table.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// One intermediate's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateStatus {
    /// The mesh.
    pub mesh: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// A gateway intermediate (signed by the shared root under limited trust).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
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
    /// Its Kubernetes cluster, for a node attested with a service-account token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
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
    /// The enforcement mode the node applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Its identities as last reported.
    pub identities: Vec<IdentityReport>,
    /// The identities (SPIFFE IDs) without a valid SVID now, as last reported: expired (an
    /// outage of the holder, or of the node) or never obtained. The node fell behind while
    /// this is not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub behind: Vec<String>,
}

/// `federationStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederationStatus {
    /// `ACCEPTED` when every node holds the current bundle version, else `PENDING`.
    pub state: State,
    /// One line per mesh whose nodes lag.
    pub messages: Vec<String>,
    /// `PERMISSIVE` (every mesh's bundle to every node) or `DISABLED` (own trust domain only).
    pub mode: String,
    /// The current bundle version.
    pub bundle_version: u64,
    /// One per mesh.
    pub meshes: Vec<MeshFederation>,
}

/// One mesh's federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshFederation {
    /// The mesh.
    pub mesh: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// The bundle version its nodes should hold.
    pub bundle_version: u64,
    /// Nodes that report holding it.
    pub acknowledged: usize,
    /// The mesh's nodes (banned ones excluded).
    pub nodes: usize,
    /// The nodes that do not (yet) report it.
    pub lagging: Vec<String>,
}

/// `accessControlEnforcementStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnforcementStatus {
    /// `ACCEPTED` when every node applies its mesh's mode, else `PENDING`.
    pub state: State,
    /// One line per mesh whose nodes lag.
    pub messages: Vec<String>,
    /// One per mesh.
    pub meshes: Vec<MeshEnforcement>,
}

/// One mesh's issuance mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshEnforcement {
    /// The mesh.
    pub mesh: String,
    /// `spec.enforceAccessControl` as configured.
    pub configured: Enforcement,
    /// The mode in force (`MESH_DEFAULT` resolved by mesh type).
    pub effective: Enforcement,
    /// Nodes that report applying it.
    pub applied: usize,
    /// The mesh's nodes (banned ones excluded).
    pub nodes: usize,
    /// The nodes that do not (yet) report it.
    pub lagging: Vec<String>,
}

/// What the aggregation needs to know of one mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshFacts {
    /// The mesh.
    pub mesh: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// `spec.enforceAccessControl`.
    pub configured: Enforcement,
    /// The effective mode.
    pub effective: Enforcement,
}

/// The non-banned nodes of a mesh with their latest report, by name; pure.
fn members<'a>(
    mesh: &str,
    nodes: &'a [NodeRecord],
    reports: &'a [StoredReport],
) -> Vec<(&'a str, Option<&'a NodeReport>)> {
    nodes
        .iter()
        .filter(|n| n.mesh == mesh && !n.banned)
        .map(|n| {
            let r = reports.iter().find(|r| r.node == n.name).map(|r| &r.report);
            (n.name.as_str(), r)
        })
        .collect()
}

/// Builds `federationStatus`: per mesh, how many nodes report holding `version`; pure.
pub fn federation_status(
    meshes: &[MeshFacts],
    version: u64,
    permissive: bool,
    nodes: &[NodeRecord],
    reports: &[StoredReport],
) -> FederationStatus {
    let mut messages = Vec::new();
    let meshes: Vec<MeshFederation> = meshes
        .iter()
        .map(|m| {
            let all = members(&m.mesh, nodes, reports);
            let lagging: Vec<String> = all
                .iter()
                .filter(|(_, r)| r.is_none_or(|r| r.bundle_version != version))
                .map(|(n, _)| (*n).to_owned())
                .collect();
            if !lagging.is_empty() {
                messages.push(format!(
                    "{}: bundle version {version} on {} of {} nodes; waiting for {}",
                    m.mesh,
                    all.len() - lagging.len(),
                    all.len(),
                    lagging.join(", ")
                ));
            }
            MeshFederation {
                mesh: m.mesh.clone(),
                trust_domain: m.trust_domain.clone(),
                bundle_version: version,
                acknowledged: all.len() - lagging.len(),
                nodes: all.len(),
                lagging,
            }
        })
        .collect();
    FederationStatus {
        state: if messages.is_empty() {
            State::Accepted
        } else {
            State::Pending
        },
        messages,
        mode: if permissive { "PERMISSIVE" } else { "DISABLED" }.into(),
        bundle_version: version,
        meshes,
    }
}

/// Builds `accessControlEnforcementStatus`: per mesh, how many nodes report applying the
/// effective mode; pure.
pub fn enforcement_status(
    meshes: &[MeshFacts],
    nodes: &[NodeRecord],
    reports: &[StoredReport],
) -> EnforcementStatus {
    let mut messages = Vec::new();
    let meshes: Vec<MeshEnforcement> = meshes
        .iter()
        .map(|m| {
            let all = members(&m.mesh, nodes, reports);
            let lagging: Vec<String> = all
                .iter()
                .filter(|(_, r)| r.and_then(|r| r.enforcement) != Some(m.effective))
                .map(|(n, _)| (*n).to_owned())
                .collect();
            if !lagging.is_empty() {
                messages.push(format!(
                    "{}: {} applied on {} of {} nodes; waiting for {}",
                    m.mesh,
                    mode_name(m.effective),
                    all.len() - lagging.len(),
                    all.len(),
                    lagging.join(", ")
                ));
            }
            MeshEnforcement {
                mesh: m.mesh.clone(),
                configured: m.configured,
                effective: m.effective,
                applied: all.len() - lagging.len(),
                nodes: all.len(),
                lagging,
            }
        })
        .collect();
    EnforcementStatus {
        state: if messages.is_empty() {
            State::Accepted
        } else {
            State::Pending
        },
        messages,
        meshes,
    }
}

/// The name of a mode as written in the configuration.
pub fn mode_name(e: Enforcement) -> &'static str {
    match e {
        Enforcement::MeshDefault => "MESH_DEFAULT",
        Enforcement::Enabled => "ENABLED",
        Enforcement::Disabled => "DISABLED",
    }
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
    let now_unix = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    nodes
        .iter()
        .map(|n| {
            let report = reports.iter().find(|r| r.node == n.name);
            let behind = report
                .filter(|_| !n.banned)
                .map(|r| {
                    r.report
                        .identities
                        .iter()
                        .filter(|i| i.not_after.is_none_or(|t| t <= now_unix))
                        .map(|i| i.spiffe_id.to_string())
                        .collect()
                })
                .unwrap_or_default();
            let last = report.map_or(n.first_seen, |r| r.received_at);
            NodeStatus {
                name: n.name.clone(),
                mesh: n.mesh.clone(),
                cluster: n.cluster.clone(),
                banned: n.banned,
                last_report: report.map(|r| crate::authority::rfc3339(at(r.received_at))),
                stale: is_stale(at(last), now, heartbeat),
                bundle_version: report.map(|r| r.report.bundle_version),
                enforcement: report.and_then(|r| r.report.enforcement),
                identities: report
                    .map(|r| r.report.identities.to_vec())
                    .unwrap_or_default(),
                behind,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_text_cannot_drive_the_terminal() {
        assert_eq!(printable("plain error: 42"), "plain error: 42");
        assert_eq!(
            printable("a\nnode-x  OK\x1b[2J\r\u{202e}b"),
            "a\\u{a}node-x  OK\\u{1b}[2J\\u{d}\\u{202e}b"
        );
    }

    #[test]
    fn the_server_certificate_is_warned_about_with_a_third_of_its_life_left() {
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let end = t0 + Duration::from_secs(90 * 86400);
        assert_eq!(
            server_cert_warning(t0, end, t0 + Duration::from_secs(59 * 86400)),
            None
        );
        let w = server_cert_warning(t0, end, t0 + Duration::from_secs(61 * 86400)).expect("warned");
        assert!(w.contains("should have been renewed"), "{w}");
        let w = server_cert_warning(t0, end, end).expect("expired");
        assert!(w.contains("expired"), "{w}");
    }

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
                cluster: None,
            },
            NodeRecord {
                name: "b".into(),
                mesh: "m".into(),
                spiffe_id: "spiffe://m/meshcert/node/b".into(),
                first_seen: 1000,
                banned: false,
                cluster: None,
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

    #[test]
    fn nodes_whose_reported_svids_expired_fell_behind() {
        let identity = |path: &str, not_after: Option<u64>| IdentityReport {
            entry_id: path.into(),
            spiffe_id: meshcert_protocol::SpiffeId::new(&format!("spiffe://m.test/{path}"))
                .expect("id"),
            state: meshcert_protocol::CertState::Issued,
            serial: None,
            not_after,
            next_rotation: None,
            last_error: None,
            attempts: 0,
        };
        let report = |node: &str, identities: Vec<IdentityReport>| StoredReport {
            node: node.into(),
            report: NodeReport {
                bundle_version: 1,
                identities: identities.into(),
                ..NodeReport::default()
            },
            received_at: 1000,
        };
        let nodes = vec![
            node("a", "m", false),
            node("b", "m", false),
            node("c", "m", true),
        ];
        let reports = vec![
            report(
                "a",
                vec![identity("web", Some(1200)), identity("db", Some(1100))],
            ),
            report("b", vec![identity("web", Some(2000))]),
            report("c", vec![identity("web", Some(1100))]),
        ];
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1150);
        let s = node_statuses(&nodes, &reports, now, Duration::from_secs(3600));
        assert_eq!(s[0].behind, ["spiffe://m.test/db"]);
        assert!(s[1].behind.is_empty());
        assert!(s[2].behind.is_empty(), "a banned node is not waited for");
        let json = serde_json::to_value(&s[0]).expect("json");
        assert_eq!(json["behind"][0], "spiffe://m.test/db");
        assert!(
            serde_json::to_value(&s[1])
                .expect("json")
                .get("behind")
                .is_none()
        );
    }

    fn node(name: &str, mesh: &str, banned: bool) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            mesh: mesh.into(),
            spiffe_id: format!("spiffe://{mesh}.test/meshcert/node/{name}"),
            first_seen: 0,
            banned,
            cluster: None,
        }
    }

    fn report(name: &str, version: u64, enforcement: Option<Enforcement>) -> StoredReport {
        StoredReport {
            node: name.into(),
            report: NodeReport {
                bundle_version: version,
                enforcement,
                identities: Vec::new().into(),
                node_svid: None,
            },
            received_at: 0,
        }
    }

    fn facts(mesh: &str, effective: Enforcement) -> MeshFacts {
        MeshFacts {
            mesh: mesh.into(),
            trust_domain: format!("{mesh}.test"),
            configured: Enforcement::MeshDefault,
            effective,
        }
    }

    #[test]
    fn federation_counts_the_nodes_holding_the_current_version() {
        let meshes = [
            facts("a", Enforcement::Enabled),
            facts("b", Enforcement::Disabled),
        ];
        let nodes = [
            node("a1", "a", false),
            node("a2", "a", false),
            node("a3", "a", false),
            node("banned", "a", true),
            node("b1", "b", false),
        ];
        // (case, reports, expected (acknowledged, nodes, lagging) for mesh a, then the state)
        type Case<'a> = (
            &'a str,
            Vec<StoredReport>,
            (usize, usize, Vec<&'a str>),
            State,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "nobody reported",
                vec![],
                (0, 3, vec!["a1", "a2", "a3"]),
                State::Pending,
            ),
            (
                "one current, one old, one silent; banned ignored",
                vec![
                    report("a1", 2, None),
                    report("a2", 1, None),
                    report("banned", 1, None),
                ],
                (1, 3, vec!["a2", "a3"]),
                State::Pending,
            ),
            (
                "everyone current",
                vec![
                    report("a1", 2, None),
                    report("a2", 2, None),
                    report("a3", 2, None),
                    report("b1", 2, None),
                ],
                (3, 3, vec![]),
                State::Accepted,
            ),
        ];
        for (name, reports, (ack, total, lag), state) in cases {
            let f = federation_status(&meshes, 2, true, &nodes, &reports);
            let a = &f.meshes[0];
            assert_eq!((a.acknowledged, a.nodes), (ack, total), "{name}");
            assert_eq!(a.lagging, lag, "{name}");
            assert_eq!(f.state, state, "{name}");
            assert_eq!(f.mode, "PERMISSIVE");
            assert_eq!(
                f.messages.is_empty(),
                state == State::Accepted,
                "{name}: {:?}",
                f.messages
            );
        }
        let empty = federation_status(&meshes, 1, false, &[], &[]);
        assert_eq!(
            empty.state,
            State::Accepted,
            "no nodes: nothing to wait for"
        );
        assert_eq!(empty.mode, "DISABLED");
    }

    #[test]
    fn enforcement_counts_the_nodes_applying_the_effective_mode() {
        let meshes = [facts("a", Enforcement::Disabled)];
        let nodes = [
            node("a1", "a", false),
            node("a2", "a", false),
            node("a3", "a", false),
        ];
        let reports = [
            report("a1", 1, Some(Enforcement::Disabled)),
            report("a2", 1, Some(Enforcement::Enabled)),
            report("a3", 1, None),
        ];
        let e = enforcement_status(&meshes, &nodes, &reports);
        assert_eq!(e.meshes[0].applied, 1);
        assert_eq!(e.meshes[0].nodes, 3);
        assert_eq!(e.meshes[0].lagging, vec!["a2", "a3"]);
        assert_eq!(e.state, State::Pending);
        assert!(
            e.messages[0].contains("DISABLED applied on 1 of 3"),
            "{:?}",
            e.messages
        );
        let reports = [
            report("a1", 1, Some(Enforcement::Disabled)),
            report("a2", 1, Some(Enforcement::Disabled)),
            report("a3", 1, Some(Enforcement::Disabled)),
        ];
        let e = enforcement_status(&meshes, &nodes, &reports);
        assert_eq!(e.state, State::Accepted);
        assert_eq!(e.meshes[0].applied, 3);
    }
}
