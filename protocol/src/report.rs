//! What agents report upward: per-identity certificate states and the bundle version they hold;
//! and the issuance modes those states are produced under.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::SpiffeId;

/// The life of one identity's certificate on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertState {
    /// Known, no request sent yet.
    Pending,
    /// A CSR is on its way to the holder.
    Requested,
    /// A valid SVID is installed and served.
    Issued,
    /// The last attempt failed; a valid older SVID may still be served (see `not_after`).
    Failed,
}

impl CertState {
    /// The name as it appears in reports and status tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Requested => "REQUESTED",
            Self::Issued => "ISSUED",
            Self::Failed => "FAILED",
        }
    }
}

/// The issuance policy (`enforceAccessControl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Enforcement {
    /// Decided by mesh type: istio → DISABLED, others → ENABLED.
    #[default]
    MeshDefault,
    /// Deny by default: only entries the holder assigned.
    Enabled,
    /// Agents may also obtain SVIDs for their own local entries, inside their trust domain.
    Disabled,
}

/// One identity's state on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityReport {
    /// The entry.
    pub entry_id: Arc<str>,
    /// Its identity.
    pub spiffe_id: SpiffeId,
    /// Where it stands.
    pub state: CertState,
    /// Serial of the SVID being served, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Arc<str>>,
    /// Expiry of the SVID being served, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// When the agent will next rotate it, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<u64>,
    /// The last failure, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Arc<str>>,
    /// Attempts since the last success.
    #[serde(default)]
    pub attempts: u32,
}

/// `POST /v1/report`: the whole state of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The bundle version the agent holds and serves.
    pub bundle_version: u64,
    /// The enforcement mode the agent applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Every identity the agent manages (shared with the agent's own status).
    pub identities: Arc<[IdentityReport]>,
    /// The node SVID the agent authenticates with (absent from agents that predate it): a
    /// root rotation retires the previous root only once no node SVID chains to it either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_svid: Option<NodeSvidReport>,
}

/// The node SVID as reported upward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSvidReport {
    /// Serial, lowercase hex.
    pub serial: Arc<str>,
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// Expiry, Unix seconds.
    pub not_after: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip() {
        let r = NodeReport {
            bundle_version: 3,
            enforcement: Some(Enforcement::Enabled),
            identities: vec![IdentityReport {
                entry_id: "web".into(),
                spiffe_id: SpiffeId::new("spiffe://a.org/web").expect("valid"),
                state: CertState::Issued,
                serial: Some("0a1b".into()),
                not_after: Some(1_800_000_000),
                next_rotation: Some(1_799_998_200),
                last_error: None,
                attempts: 0,
            }]
            .into(),
            node_svid: Some(NodeSvidReport {
                serial: "0c".into(),
                not_before: 1_799_990_000,
                not_after: 1_800_000_000,
            }),
        };
        let json = serde_json::to_value(&r).expect("ser");
        assert_eq!(json["identities"][0]["state"], "ISSUED");
        assert_eq!(json["enforcement"], "ENABLED");
        assert_eq!(json["nodeSvid"]["serial"], "0c");
        let back: NodeReport = serde_json::from_value(json).expect("de");
        assert_eq!(back, r);
    }

    #[test]
    fn a_report_without_the_node_svid_still_reads() {
        let old = serde_json::json!({"bundleVersion": 2, "identities": []});
        let r: NodeReport = serde_json::from_value(old).expect("an older agent's report");
        assert_eq!(r.node_svid, None);
        let json = serde_json::to_value(&r).expect("ser");
        assert!(json.get("nodeSvid").is_none(), "{json}");
    }
}
