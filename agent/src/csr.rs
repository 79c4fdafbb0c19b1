//! PKCS#10 certificate signing requests: the only thing that leaves the node for a key.

use meshcert_protocol::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, SanType};

use crate::keys::{KeyError, PrivateKey};

/// Why a CSR could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The key could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The SPIFFE ID is not a valid URI SAN (it always is once parsed; kept for safety).
    #[error("cannot put {id} into a CSR: {source}")]
    San {
        /// The identity.
        id: String,
        /// The error.
        #[source]
        source: rcgen::Error,
    },
    /// Signing the request failed.
    #[error("cannot sign the CSR: {0}")]
    Sign(#[source] rcgen::Error),
}

/// A DER CSR signed by `key`, whose only URI SAN is `id` (none when `id` is `None`, as for a
/// join, where the holder takes the ID from the token).
pub fn build(key: &PrivateKey, id: Option<&SpiffeId>) -> Result<Vec<u8>, CsrError> {
    let pair = key.key_pair()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        let uri = id.to_string().try_into().map_err(|source| CsrError::San {
            id: id.to_string(),
            source,
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr = params.serialize_request(&pair).map_err(CsrError::Sign)?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyAlgorithm;
    use rcgen::PublicKeyData;

    #[test]
    fn csr_carries_exactly_the_id_and_verifies() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
        let der = build(&key, Some(&id)).expect("csr");
        let params = rcgen::CertificateSigningRequestParams::from_der(&der.clone().into())
            .expect("signature verifies");
        let sans = params.params.subject_alt_names;
        assert_eq!(sans.len(), 1);
        match &sans[0] {
            SanType::URI(uri) => assert_eq!(uri.as_str(), id.to_string()),
            other => panic!("unexpected SAN {other:?}"),
        }
        assert_eq!(
            params.public_key.der_bytes(),
            key.public_key_raw().expect("pub").as_slice()
        );
    }

    #[test]
    fn node_csr_has_no_san() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let der = build(&key, None).expect("csr");
        let params =
            rcgen::CertificateSigningRequestParams::from_der(&der.into()).expect("verifies");
        assert!(params.params.subject_alt_names.is_empty());
    }
}
