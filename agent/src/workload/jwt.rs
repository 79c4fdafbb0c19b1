//! The JWT half of the Workload API: `FetchJWTSVID` (one token per identity of the caller,
//! or the one it names), the JWKS messages of `FetchJWTBundles`, and `ValidateJWTSVID`.
//!
//! Refusals follow the SPIFFE Workload API: `InvalidArgument` for a missing audience or token
//! and for a token that does not validate, `PermissionDenied` when the caller holds no
//! matching identity, `Unavailable` while the holder cannot sign.

use std::collections::HashMap;
use std::time::SystemTime;

use meshcert_protocol::SpiffeId;
use meshcert_protocol::jwt::JwtBundles;
use tonic::Status;

use super::peer::PeerInfo;
use super::proto::google::protobuf::{ListValue, Struct, Value, value::Kind};
use super::proto::{
    JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse,
};
use super::selection;
use super::service::NO_IDENTITY;
use crate::cache::Snapshot;
use crate::jwt::{Tokens, check_audience, validate};

/// `FetchJWTSVID`: a token for each distinct identity the caller holds (default first), or
/// for the one it names.
pub async fn fetch_svids(
    tokens: &Tokens,
    snapshot: &Snapshot,
    peer: &PeerInfo,
    request: JwtsvidRequest,
    now: SystemTime,
) -> Result<JwtsvidResponse, Status> {
    check_audience(&request.audience).map_err(Status::invalid_argument)?;
    let wanted = match request.spiffe_id.as_str() {
        "" => None,
        text => Some(SpiffeId::new(text).map_err(|e| {
            Status::invalid_argument(format!("spiffe_id `{text}` is not a SPIFFE ID: {e}"))
        })?),
    };
    // One token per distinct identity (a gateway's second SVID has the same ID).
    let mut seen = std::collections::HashSet::new();
    let chosen: Vec<_> = selection::svids_for(snapshot, peer, now)
        .into_iter()
        .filter(|svid| wanted.as_ref().is_none_or(|w| *w == svid.spiffe_id))
        .filter(|svid| seen.insert(svid.spiffe_id.clone()))
        .collect();
    if chosen.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    let mut svids = Vec::with_capacity(chosen.len());
    for svid in chosen {
        let signed = tokens
            .token(&svid.entry, &request.audience, now)
            .await
            .map_err(|e| {
                tracing::info!(spiffe_id = %svid.spiffe_id, error = %e, "JWT-SVID not signed");
                if e.is_retryable() {
                    Status::unavailable("the CA holder cannot sign JWT-SVIDs now; retry")
                } else {
                    Status::permission_denied(format!(
                        "the CA holder refused a JWT-SVID for {}: {e}",
                        svid.spiffe_id
                    ))
                }
            })?;
        svids.push(Jwtsvid {
            spiffe_id: svid.spiffe_id.to_string(),
            svid: signed.token,
            hint: svid.hint.clone(),
        });
    }
    Ok(JwtsvidResponse { svids })
}

/// The `FetchJWTBundles` message: each trust domain's JWKS keyed by its SPIFFE ID string.
pub fn bundles_response(bundles: &JwtBundles) -> JwtBundlesResponse {
    JwtBundlesResponse {
        bundles: bundles
            .trust_domains
            .iter()
            .map(|(td, jwks)| (td.id_string(), jwks.clone().into_bytes()))
            .collect(),
    }
}

/// `ValidateJWTSVID` against the node's JWKS (every trust domain it receives).
pub fn validate_svid(
    tokens: &Tokens,
    request: &ValidateJwtsvidRequest,
) -> Result<ValidateJwtsvidResponse, Status> {
    if request.audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if request.svid.is_empty() {
        return Err(Status::invalid_argument("svid must be specified"));
    }
    let (id, claims) = validate(&request.svid, &request.audience, &tokens.bundles())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let claims = match to_value(claims).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    };
    Ok(ValidateJwtsvidResponse {
        spiffe_id: id.to_string(),
        claims: Some(claims),
    })
}

/// JSON as a `google.protobuf.Value`.
fn to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, to_value(v)))
                .collect::<HashMap<_, _>>(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_become_a_protobuf_struct() {
        let json =
            serde_json::json!({"sub": "spiffe://a.org/w", "aud": ["x"], "exp": 5, "n": null});
        let Some(Kind::StructValue(s)) = to_value(json).kind else {
            panic!("not a struct");
        };
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://a.org/w".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(aud)) = &s.fields["aud"].kind else {
            panic!("not a list");
        };
        assert_eq!(aud.values.len(), 1);
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
    }

    /// A holder that is never reachable.
    struct Down;

    impl crate::jwt::JwtHolder for Down {
        fn sign_jwt(
            &self,
            _: meshcert_protocol::jwt::JwtSignRequest,
        ) -> crate::jwt::Call<'_, meshcert_protocol::jwt::JwtSignResponse> {
            Box::pin(async { Err(crate::issuer::IssuerError::NoIdentity) })
        }

        fn jwt_bundles(&self) -> crate::jwt::Call<'_, JwtBundles> {
            Box::pin(async { Err(crate::issuer::IssuerError::NoIdentity) })
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_into_the_jwt_calls_is_refused_with_a_clear_code(
            audience in proptest::collection::vec(".{0,600}", 0..20),
            spiffe_id in ".{0,80}",
            token in ".{0,300}",
        ) {
            let tokens = Tokens::new(std::sync::Arc::new(Down), std::time::Duration::from_secs(300));
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let request = JwtsvidRequest { audience: audience.clone(), spiffe_id };
            let status = rt
                .block_on(fetch_svids(&tokens, &Snapshot::default(), &PeerInfo::default(), request, SystemTime::now()))
                .expect_err("nothing to sign");
            proptest::prop_assert!(matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
            ), "{status:?}");
            proptest::prop_assert!(!status.message().is_empty());
            let request = ValidateJwtsvidRequest {
                audience: audience.first().cloned().unwrap_or_default(),
                svid: token,
            };
            let status = validate_svid(&tokens, &request).expect_err("garbage never validates");
            proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            proptest::prop_assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn bundles_are_keyed_by_the_trust_domain_id() {
        let mut b = JwtBundles::default();
        b.trust_domains.insert(
            meshcert_protocol::TrustDomain::new("example.org").expect("td"),
            "{\"keys\":[]}".into(),
        );
        let r = bundles_response(&b);
        assert_eq!(r.bundles["spiffe://example.org"], b"{\"keys\":[]}");
    }
}
