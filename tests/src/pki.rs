//! Keys and CSRs made at test time, the way a node would make them.

use meshcert_protocol::api::Der;
use rcgen::{CertificateParams, KeyPair, SanType};

/// A fresh ECDSA P-256 key, the agent's default.
pub fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key generation")
}

/// A PKCS#10 CSR for `key` whose URI SANs are `uris` (none for a node CSR).
pub fn csr(key: &KeyPair, uris: &[&str]) -> Der {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ia5 string")))
        .collect();
    Der(p.serialize_request(key).expect("csr").der().to_vec())
}
