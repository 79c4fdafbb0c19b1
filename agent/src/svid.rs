//! Checks an issued SVID before it is installed or served: the chain verifies against the
//! bundle, the leaf carries exactly the expected SPIFFE ID, and the key matches the leaf.
//! Also the PEM encoding of certificate chains.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshcert_protocol::SpiffeId;
use rustls::pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::keys::{KeyError, PrivateKey};

/// Why an SVID is refused.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The chain is empty.
    #[error("the chain holds no certificate")]
    Empty,
    /// A certificate is not valid DER X.509.
    #[error("certificate {index} of the chain does not parse: {message}")]
    Parse {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// What the parser said.
        message: String,
    },
    /// The leaf does not carry exactly one URI SAN that is a SPIFFE ID.
    #[error("the leaf does not carry exactly one SPIFFE ID URI SAN")]
    NoSpiffeId,
    /// The leaf's SPIFFE ID is not the expected one.
    #[error("the leaf is for {found}, expected {expected}")]
    WrongId {
        /// The ID in the leaf.
        found: String,
        /// The entry's ID.
        expected: String,
    },
    /// No root to verify against.
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(String),
    /// The chain does not verify against the bundle.
    #[error("the chain does not verify against the bundle: {0}")]
    Verify(String),
    /// The private key does not belong to the leaf.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The leaf's notBefore is further ahead of this node's clock than the tolerated skew.
    #[error(
        "the SVID becomes valid {ahead:?} after this node's clock, more than the tolerated clockSkew of {skew:?}: check the clocks of this node and of the CA holder"
    )]
    AheadOfClock {
        /// How far ahead.
        ahead: Duration,
        /// The tolerance (`clockSkew`).
        skew: Duration,
    },
    /// The key could not be read.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What the agent needs to know about a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// Its identity.
    pub spiffe_id: SpiffeId,
    /// Serial number, lowercase hex (shared with the statuses that show it).
    pub serial: Arc<str>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The raw public key (SubjectPublicKeyInfo bit string).
    pub public_key: Vec<u8>,
}

fn unix(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

/// Reads the identity, serial, validity and public key of a leaf.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse {
        index: 0,
        message: e.to_string(),
    })?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidError::NoSpiffeId);
    };
    let spiffe_id = SpiffeId::new(uri).map_err(|_| SvidError::NoSpiffeId)?;
    let mut serial = String::with_capacity(2 * cert.raw_serial().len());
    for b in cert.raw_serial().iter().skip_while(|b| **b == 0) {
        // Writing into a String cannot fail.
        let _ = write!(serial, "{b:02x}");
    }
    Ok(LeafInfo {
        spiffe_id,
        serial: if serial.is_empty() {
            "00".into()
        } else {
            serial.into()
        },
        not_before: unix(cert.validity().not_before.timestamp()),
        not_after: unix(cert.validity().not_after.timestamp()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// Checks `chain` (leaf first) and `key` for `expected` against `roots` at `now`.
pub fn check(
    chain: &[Vec<u8>],
    key: &PrivateKey,
    roots: &[Vec<u8>],
    expected: &SpiffeId,
    now: SystemTime,
) -> Result<LeafInfo, SvidError> {
    let leaf = chain.first().ok_or(SvidError::Empty)?;
    for (index, der) in chain.iter().enumerate().skip(1) {
        X509Certificate::from_der(der).map_err(|e| SvidError::Parse {
            index,
            message: e.to_string(),
        })?;
    }
    let info = leaf_info(leaf)?;
    if &info.spiffe_id != expected {
        return Err(SvidError::WrongId {
            found: info.spiffe_id.to_string(),
            expected: expected.to_string(),
        });
    }
    verify_chain(chain, roots, now)?;
    if key.public_key_raw()? != info.public_key {
        return Err(SvidError::KeyMismatch);
    }
    Ok(info)
}

/// [`check`], tolerating a leaf whose notBefore is at most `skew` ahead of `now` (this node's
/// clock behind the holder's): such a chain is verified at its notBefore. A notBefore further
/// ahead is [`SvidError::AheadOfClock`].
pub fn check_with_skew(
    chain: &[Vec<u8>],
    key: &PrivateKey,
    roots: &[Vec<u8>],
    expected: &SpiffeId,
    now: SystemTime,
    skew: Duration,
) -> Result<LeafInfo, SvidError> {
    let leaf = chain.first().ok_or(SvidError::Empty)?;
    let not_before = leaf_info(leaf)?.not_before;
    let at = match not_before.duration_since(now) {
        Ok(ahead) if ahead.is_zero() => now,
        Ok(ahead) if ahead <= skew => not_before,
        Ok(ahead) => return Err(SvidError::AheadOfClock { ahead, skew }),
        Err(_) => now,
    };
    check(chain, key, roots, expected, at)
}

/// Verifies that `chain` (leaf first) chains to one of `roots` at `now`.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), SvidError> {
    let leaf = chain.first().ok_or(SvidError::Empty)?;
    if roots.is_empty() {
        return Err(SvidError::NoBundle(String::new()));
    }
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Verify(format!("bad root: {e}")))?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let end_entity =
        EndEntityCert::try_from(&leaf_der).map_err(|e| SvidError::Verify(e.to_string()))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let time = UnixTime::since_unix_epoch(since);
    let client = end_entity.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        time,
        KeyUsage::client_auth(),
        None,
        None,
    );
    match client {
        Ok(_) => Ok(()),
        Err(first) => end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                time,
                KeyUsage::server_auth(),
                None,
                None,
            )
            .map(|_| ())
            .map_err(|_| SvidError::Verify(first.to_string())),
    }
}

/// PEM text of DER certificates, in order.
pub fn certs_to_pem(certs: &[Vec<u8>]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.clone())))
        .collect()
}

/// The DER certificates of PEM text (other blocks ignored).
pub fn certs_from_pem(text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect()
}

#[cfg(test)]
pub(crate) mod testca {
    //! A throwaway root and intermediate that sign SVIDs, for unit tests.

    use std::time::{Duration, SystemTime};

    use meshcert_protocol::SpiffeId;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };

    /// A root → intermediate test CA.
    pub struct TestCa {
        /// Root DER.
        pub root: Vec<u8>,
        /// Intermediate DER.
        pub intermediate: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        /// A fresh CA.
        pub fn new() -> Self {
            let root_key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let root = p.self_signed(&root_key).expect("root");
            let root_issuer = Issuer::new(p, root_key);
            let int_key = KeyPair::generate().expect("key");
            let mut ip = CertificateParams::new(Vec::<String>::new()).expect("params");
            ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let intermediate = ip.signed_by(&int_key, &root_issuer).expect("int");
            Self {
                root: root.der().to_vec(),
                intermediate: intermediate.der().to_vec(),
                issuer: Issuer::new(ip, int_key),
            }
        }

        /// Signs `csr` as an SVID for `id`, valid for `ttl` from `now`; returns leaf + intermediate.
        pub fn sign(
            &self,
            csr: &[u8],
            id: &SpiffeId,
            now: SystemTime,
            ttl: Duration,
        ) -> Vec<Vec<u8>> {
            let mut req =
                CertificateSigningRequestParams::from_der(&csr.to_vec().into()).expect("csr");
            req.params.subject_alt_names =
                vec![SanType::URI(id.to_string().try_into().expect("uri"))];
            req.params.not_before = now.into();
            req.params.not_after = (now + ttl).into();
            req.params.serial_number =
                Some(SerialNumber::from(fastrand::u64(..).to_be_bytes().to_vec()));
            req.params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let leaf = req.signed_by(&self.issuer).expect("sign");
            vec![leaf.der().to_vec(), self.intermediate.clone()]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testca::TestCa;
    use super::*;
    use crate::csr;
    use crate::keys::KeyAlgorithm;

    #[test]
    fn a_not_before_slightly_ahead_of_the_clock_is_tolerated() {
        let ca = TestCa::new();
        let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let now = SystemTime::now();
        // The holder's clock is 30 s ahead of this node's.
        let chain = ca.sign(
            &csr::build(&key, Some(&id)).expect("csr"),
            &id,
            now + Duration::from_secs(30),
            Duration::from_secs(3600),
        );
        let roots = vec![ca.root.clone()];
        assert!(
            check(&chain, &key, &roots, &id, now).is_err(),
            "not valid yet"
        );
        let skew = Duration::from_secs(60);
        check_with_skew(&chain, &key, &roots, &id, now, skew).expect("within the skew");
        let tight = check_with_skew(&chain, &key, &roots, &id, now, Duration::from_secs(10));
        assert!(
            matches!(tight, Err(SvidError::AheadOfClock { .. })),
            "{tight:?}"
        );
    }

    #[test]
    fn checks_refuse_what_a_user_would_refuse() {
        let ca = TestCa::new();
        let other_ca = TestCa::new();
        let now = SystemTime::now();
        let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
        let other_id = SpiffeId::new("spiffe://mesh-a.test/db").expect("id");
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let other_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let chain = ca.sign(
            &csr::build(&key, Some(&id)).expect("csr"),
            &id,
            now,
            Duration::from_secs(3600),
        );
        let roots = vec![ca.root.clone()];

        let info = check(&chain, &key, &roots, &id, now).expect("valid");
        assert_eq!(info.spiffe_id, id);
        assert!(info.not_after > now);

        let cases: Vec<(&str, Result<LeafInfo, SvidError>)> = vec![
            ("wrong id", check(&chain, &key, &roots, &other_id, now)),
            ("wrong key", check(&chain, &other_key, &roots, &id, now)),
            (
                "other root",
                check(&chain, &key, std::slice::from_ref(&other_ca.root), &id, now),
            ),
            (
                "expired",
                check(&chain, &key, &roots, &id, now + Duration::from_secs(7200)),
            ),
            (
                "no intermediate",
                check(&chain[..1], &key, &roots, &id, now),
            ),
            ("empty", check(&[], &key, &roots, &id, now)),
            ("no roots", check(&chain, &key, &[], &id, now)),
        ];
        for (name, result) in cases {
            assert!(result.is_err(), "{name} must be refused");
        }
    }

    #[test]
    fn pem_round_trip() {
        let ca = TestCa::new();
        let certs = vec![ca.root.clone(), ca.intermediate.clone()];
        let text = certs_to_pem(&certs);
        assert_eq!(certs_from_pem(&text), certs);
        assert!(certs_from_pem("nothing").is_empty());
    }
}
