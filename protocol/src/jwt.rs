//! The holder's JWT-SVID endpoints: a token signed for an identity the calling node holds, and
//! the public keys (a JWKS per trust domain) every token verifies against.
//!
//! The signing keys never leave the holder; only tokens and public keys travel.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::entry::Entry;
use crate::id::{SpiffeId, TrustDomain};

/// `POST` over mTLS: an entry and an audience → a JWT-SVID for the entry's SPIFFE ID.
pub const PATH_JWT_SIGN: &str = "/v1/jwt/sign";
/// `GET` over mTLS: the JWKS of every trust domain the calling node may verify.
pub const PATH_JWT_BUNDLES: &str = "/v1/jwt/bundles";
/// Most audiences in one token.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// The lifetime agents ask for unless configured otherwise (the holder clamps it).
pub const DEFAULT_JWT_TTL_SECONDS: u64 = 300;

/// `POST /v1/jwt/sign`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtSignRequest {
    /// The entry whose SPIFFE ID the token asserts, as the agent holds it. The holder's own
    /// entry with this id wins (it must be assigned to the node); without one, this is an
    /// agent-local entry, decided by the mesh's enforcement exactly as for X.509-SVIDs.
    pub entry: Entry,
    /// The token's `aud` claim: at least one, at most [`MAX_AUDIENCES`].
    pub audience: Vec<String>,
    /// The lifetime asked for; the holder clamps it to its policy.
    pub ttl_seconds: u64,
}

/// The answer to [`JwtSignRequest`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtSignResponse {
    /// The token's subject.
    pub spiffe_id: SpiffeId,
    /// The compact JWS.
    pub token: String,
    /// When it was issued (`iat`), Unix seconds.
    pub issued_at: u64,
    /// When it expires (`exp`), Unix seconds.
    pub expires_at: u64,
}

impl fmt::Debug for JwtSignResponse {
    // A token is a bearer credential: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSignResponse")
            .field("spiffe_id", &self.spiffe_id)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/jwt/bundles`: each trust domain's JWKS (RFC 7517 JSON text, keys with `kid`,
/// `alg` and `use: jwt-svid`), current and retired keys whose tokens may still be valid.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtBundles {
    /// JWKS JSON per trust domain.
    pub trust_domains: BTreeMap<TrustDomain, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sign_response_never_prints_its_token() {
        let r = JwtSignResponse {
            spiffe_id: SpiffeId::new("spiffe://example.org/web").expect("valid"),
            token: "eyJsecret".into(),
            issued_at: 1,
            expires_at: 2,
        };
        assert!(!format!("{r:?}").contains("eyJsecret"));
    }

    #[test]
    fn a_sign_request_refuses_unknown_fields() {
        let json = r#"{"audience":["a"],"ttlSeconds":300,"extra":1}"#;
        assert!(serde_json::from_str::<JwtSignRequest>(json).is_err());
    }
}
