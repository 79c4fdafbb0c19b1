//! The CA holder's HTTPS API: paths, request and response bodies, and error codes.
//!
//! Bodies are JSON. Certificates and CSRs travel as base64 DER ([`Der`]). Every failure is an
//! [`ApiError`] `{code, message}` with the HTTP status of its [`ErrorCode`]. Private keys never
//! appear in any message.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::entry::Entry;
use crate::id::{SpiffeId, TrustDomain};
use crate::report::Enforcement;

/// `POST`: join token + node CSR → node SVID and bundles. No client certificate.
pub const PATH_ATTEST: &str = "/v1/attest";
/// `POST`: Kubernetes service-account token + node CSR → node SVID and bundles.
pub const PATH_ATTEST_KUBERNETES: &str = "/v1/attest/kubernetes";
/// `POST` over mTLS: node CSR → renewed node SVID.
pub const PATH_RENEW: &str = "/v1/node/renew";
/// `GET` over mTLS: the calling node's entries and the current bundles.
pub const PATH_SYNC: &str = "/v1/sync";
/// `POST` over mTLS: a batch of workload CSRs → one result each.
pub const PATH_SIGN: &str = "/v1/sign";
/// `POST` over mTLS: the node's certificate states and bundle version.
pub const PATH_REPORT: &str = "/v1/report";
/// `GET`: the bundles, for bootstrapping trust out of band (public data).
pub const PATH_BUNDLE: &str = "/v1/bundle";
/// `GET /v1/watch?version=N&wait=SECONDS` (node SVID): answers [`WatchResponse`] as soon as the
/// holder's change version differs from `N` (entries, bundles, enforcement, the rotation), or
/// after `wait` seconds (at most [`WATCH_MAX_WAIT_SECS`]) with the same version.
pub const PATH_WATCH: &str = "/v1/watch";
/// The longest a watch waits before answering.
pub const WATCH_MAX_WAIT_SECS: u64 = 55;

/// `GET /v1/watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchResponse {
    /// The holder's change version: a different one means "sync now".
    pub version: u64,
}

/// Largest request body the holder reads, in bytes.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most CSRs in one signing batch.
pub const MAX_BATCH: usize = 256;

/// The path of a node's SPIFFE ID: `spiffe://<trust domain>/meshcert/node/<name>`.
pub fn node_id(trust_domain: &TrustDomain, node: &str) -> Result<SpiffeId, crate::id::IdError> {
    SpiffeId::from_parts(trust_domain, &format!("/meshcert/node/{node}"))
}

/// The node name inside a node SPIFFE ID, if it is one.
pub fn node_name(id: &SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix("/meshcert/node/")
        .filter(|n| !n.contains('/'))
}

/// Whether `name` is a usable node name: a DNS-label-like string, as Kubernetes node names are.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
}

/// DER bytes (a certificate or a CSR) carried as base64 text in JSON.
#[derive(Clone, PartialEq, Eq)]
pub struct Der(pub Vec<u8>);

impl fmt::Debug for Der {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Der({} bytes)", self.0.len())
    }
}

impl AsRef<[u8]> for Der {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Der {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl Serialize for Der {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Der {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(DerVisitor)
    }
}

/// Decodes the base64 text where the deserializer holds it (borrowed from the input when it
/// has no escapes), without a copy of the text first: a signing answer carries hundreds.
struct DerVisitor;

impl serde::de::Visitor<'_> for DerVisitor {
    type Value = Der;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("base64 DER")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Der, E> {
        STANDARD.decode(text.as_bytes()).map(Der).map_err(E::custom)
    }
}

/// The trust bundles of a virtual mesh at one version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundles {
    /// Grows by one whenever any bundle changes; agents acknowledge it in their reports.
    pub version: u64,
    /// The CA certificates (roots) each trust domain's SVIDs chain to.
    pub trust_domains: BTreeMap<TrustDomain, Vec<Der>>,
    /// The virtual mesh's shared root, when it differs from the trust domains' roots (limited
    /// trust): gateways trust it and hold a second SVID chained to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_root: Vec<Der>,
    /// While a root rotation is ACTIVE: what every SVID must now chain to, and the window
    /// agents spread their re-issuance over (absent otherwise, and from older holders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationHint>,
}

/// `POST /v1/attest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttestRequest {
    /// The one-time join token from `meshcert-ca token create`.
    pub token: String,
    /// PKCS#10 CSR for the node key; its SAN is ignored, the ID comes from the token.
    pub csr: Der,
}

/// `POST /v1/attest/kubernetes`: the agent pod's projected service-account token instead of a
/// join token. The holder checks it with the named cluster's TokenReview API and names the node
/// after the Kubernetes node the token's pod runs on.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesAttestRequest {
    /// The cluster, as the holder's `holder.kubernetes[].cluster` names it.
    pub cluster: String,
    /// The projected service-account token (a JWT), as read from its file.
    pub token: String,
    /// PKCS#10 CSR for the node key; its SAN is ignored.
    pub csr: Der,
}

impl fmt::Debug for KubernetesAttestRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesAttestRequest")
            .field("cluster", &self.cluster)
            .field("token", &"<redacted>")
            .field("csr", &self.csr)
            .finish()
    }
}

/// A signed certificate chain, leaf first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Svid {
    /// The identity in the leaf's URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<Der>,
}

/// Answer to attest and renew.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSvidResponse {
    /// The node's name as the holder knows it.
    pub node: String,
    /// The mesh the node belongs to.
    pub mesh: String,
    /// The node SVID.
    pub svid: Svid,
    /// The bundles at the time of issue.
    pub bundles: Bundles,
}

/// `POST /v1/node/renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR for the node's (new) key.
    pub csr: Der,
}

/// `GET /v1/sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResponse {
    /// The calling node.
    pub node: String,
    /// Its mesh.
    pub mesh: String,
    /// Its mesh's trust domain.
    pub trust_domain: TrustDomain,
    /// The issuance mode in force for the mesh.
    pub enforcement: Enforcement,
    /// The entries assigned to the node.
    pub entries: Vec<Entry>,
    /// The current bundles.
    pub bundles: Bundles,
}

/// A root rotation's activation, as agents see it in the sync answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationHint {
    /// The roots that sign now (DER); an SVID that chains to none of them is re-issued.
    pub active_roots: Vec<Der>,
    /// When the next root started signing, Unix seconds.
    pub activated_at: u64,
    /// The window, in seconds, re-issuance is spread over from `activated_at`.
    pub window_secs: u64,
}

/// One CSR of a signing batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CsrRequest {
    /// The entry the SVID is for.
    pub entry_id: String,
    /// PKCS#10 CSR whose only URI SAN is the entry's SPIFFE ID.
    pub csr: Der,
    /// For an agent-local entry (DISABLED enforcement): the entry itself, since the holder does
    /// not store it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<Entry>,
}

/// `POST /v1/sign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    /// At most [`MAX_BATCH`] CSRs.
    pub csrs: Vec<CsrRequest>,
}

/// The result for one CSR of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResult {
    /// The entry the CSR was for.
    pub entry_id: String,
    /// Issued, or refused with a reason.
    #[serde(flatten)]
    pub outcome: SignOutcome,
}

/// Issued or refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignOutcome {
    /// The SVID was signed and recorded.
    Issued {
        /// The signed SVID.
        svid: Svid,
        /// Under limited trust, a gateway's second SVID chained to the shared root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway_svid: Option<Svid>,
    },
    /// The CSR was refused.
    Refused {
        /// Why.
        error: ApiError,
    },
}

/// `POST /v1/sign` answer: one result per CSR, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// One per CSR.
    pub results: Vec<SignResult>,
    /// The bundles the chains verify against.
    pub bundles: Bundles,
}

/// An API failure: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The stable, machine-readable code.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Stable error codes of the holder's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not the JSON this endpoint takes.
    BadRequest,
    /// The body is larger than [`MAX_BODY_BYTES`].
    BodyTooLarge,
    /// The batch holds more than [`MAX_BATCH`] CSRs.
    BatchTooLarge,
    /// The CSR is not valid DER or its signature does not verify.
    BadCsr,
    /// The CSR's URI SAN is not exactly the entry's SPIFFE ID.
    SanMismatch,
    /// The ID is outside the node's trust domain.
    OutsideTrustDomain,
    /// The CSR's key algorithm or size is not allowed.
    KeyNotAllowed,
    /// No entry has this id.
    UnknownEntry,
    /// The entry exists but is not assigned to the calling node.
    NotAssigned,
    /// Policy (enforcement mode) refuses an agent-local entry.
    PolicyDenied,
    /// An agent-local entry asks for a reserved ID: the bare trust domain or one under
    /// `/meshcert/` (node identities).
    ReservedId,
    /// An agent-local entry asks for an ID that a holder entry registers (to any node).
    IdRegistered,
    /// An agent-local entry's ID is outside the prefixes the holder allows for local entries.
    OutsideLocalPrefixes,
    /// A registration entry on the holder carries a hook: hooks are configured on the node.
    HookNotAllowed,
    /// The join token is unknown.
    InvalidToken,
    /// The join token has expired.
    TokenExpired,
    /// The join token was already used.
    TokenUsed,
    /// The join token is for another mesh or node.
    WrongMesh,
    /// The service-account token is not valid for the holder's audience.
    WrongAudience,
    /// The service-account token belongs to a service account the holder does not trust.
    UntrustedServiceAccount,
    /// The Kubernetes cluster named in the attestation is not configured on the holder.
    UnknownCluster,
    /// The pod of the service-account token is not found, or not bound to a node.
    PodNotFound,
    /// The call needs a node SVID as client certificate.
    Unauthenticated,
    /// The client certificate does not belong to a node the holder knows.
    UnknownNode,
    /// The node is banned.
    NodeBanned,
    /// No such endpoint.
    NotFound,
    /// The endpoint does not take this method.
    MethodNotAllowed,
    /// The holder failed; the message says no more than that.
    Internal,
    /// The holder cannot serve now; retry.
    Unavailable,
    /// A root rotation is already under way.
    RotationInProgress,
    /// The rotation's next root already signs: it can no longer be aborted.
    RotationActive,
    /// No root rotation is under way.
    NoRotation,
    /// The staged root is unusable (not a CA, expired, key mismatch, or the current root).
    BadRoot,
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest
            | Self::BadCsr
            | Self::KeyNotAllowed
            | Self::BatchTooLarge
            | Self::HookNotAllowed
            | Self::BadRoot => 400,
            Self::InvalidToken
            | Self::TokenExpired
            | Self::TokenUsed
            | Self::WrongAudience
            | Self::Unauthenticated => 401,
            Self::SanMismatch
            | Self::OutsideTrustDomain
            | Self::NotAssigned
            | Self::PolicyDenied
            | Self::ReservedId
            | Self::IdRegistered
            | Self::OutsideLocalPrefixes
            | Self::WrongMesh
            | Self::UntrustedServiceAccount
            | Self::UnknownCluster
            | Self::PodNotFound
            | Self::UnknownNode
            | Self::NodeBanned => 403,
            Self::UnknownEntry | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RotationInProgress | Self::RotationActive | Self::NoRotation => 409,
            Self::BodyTooLarge => 413,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    /// Whether this code refuses an agent-local entry by a policy rule, so that asking again
    /// is useless until the entry, the holder's entries or the mesh's enforcement change.
    pub fn refuses_local_entry(self) -> bool {
        matches!(
            self,
            Self::PolicyDenied
                | Self::OutsideTrustDomain
                | Self::ReservedId
                | Self::IdRegistered
                | Self::OutsideLocalPrefixes
        )
    }

    /// Whether the same request may succeed later without any change.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Internal | Self::Unavailable)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        let td = TrustDomain::new("mesh.example").expect("valid");
        let id = node_id(&td, "node-1").expect("valid");
        assert_eq!(id.to_string(), "spiffe://mesh.example/meshcert/node/node-1");
        assert_eq!(node_name(&id), Some("node-1"));
        let other = SpiffeId::new("spiffe://mesh.example/web").expect("valid");
        assert_eq!(node_name(&other), None);
        assert!(valid_node_name("ip-10-0-0-1.ec2.internal"));
        assert!(!valid_node_name("Node/1"));
    }

    #[test]
    fn sign_result_shape() {
        let r = SignResult {
            entry_id: "web".into(),
            outcome: SignOutcome::Refused {
                error: ApiError::new(ErrorCode::SanMismatch, "no"),
            },
        };
        let json = serde_json::to_value(&r).expect("ser");
        assert_eq!(json["status"], "refused");
        assert_eq!(json["error"]["code"], "san_mismatch");
        assert_eq!(ErrorCode::SanMismatch.to_string(), "san_mismatch");
    }

    #[test]
    fn local_entry_refusals_are_forbidden_and_final() {
        for code in [
            ErrorCode::PolicyDenied,
            ErrorCode::OutsideTrustDomain,
            ErrorCode::ReservedId,
            ErrorCode::IdRegistered,
            ErrorCode::OutsideLocalPrefixes,
        ] {
            assert!(code.refuses_local_entry(), "{code}");
            assert_eq!(code.http_status(), 403, "{code}");
            assert!(!code.is_retryable(), "{code}");
        }
        assert!(!ErrorCode::Internal.refuses_local_entry());
        assert_eq!(ErrorCode::HookNotAllowed.http_status(), 400);
        assert_eq!(ErrorCode::IdRegistered.to_string(), "id_registered");
        assert_eq!(
            ErrorCode::OutsideLocalPrefixes.to_string(),
            "outside_local_prefixes"
        );
    }

    #[test]
    fn der_is_base64() {
        let d = Der(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let json = serde_json::to_string(&d).expect("ser");
        assert_eq!(json, "\"MAMCAQE=\"");
        assert_eq!(serde_json::from_str::<Der>(&json).expect("de"), d);
        assert!(serde_json::from_str::<Der>("\"@@@\"").is_err());
    }
}
