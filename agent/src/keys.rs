//! Private keys generated on the node: the algorithm choice, generation, PEM encoding, and a
//! newtype that zeroizes on drop and never prints its bytes.

use std::fmt;
use std::sync::Arc;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, RsaKeySize};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a key could not be generated or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The crypto library refused to generate a key.
    #[error("cannot generate a {algorithm} key: {source}")]
    Generate {
        /// The algorithm asked for.
        algorithm: KeyAlgorithm,
        /// The error.
        #[source]
        source: rcgen::Error,
    },
    /// The bytes are not a PKCS#8 private key we can use.
    #[error("not a usable PKCS#8 private key: {0}")]
    Parse(#[source] rcgen::Error),
    /// The PEM text holds no `PRIVATE KEY` block.
    #[error("no PRIVATE KEY block in the PEM text")]
    Pem,
}

/// The key algorithm of workload and node keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// RSA 2048 bits, PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072 bits.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA 4096 bits.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyAlgorithm {
    /// The config name (`ecdsa-p256`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A private key: unencrypted PKCS#8 DER, wiped from memory on drop, redacted in `Debug`.
/// Clones share one copy of the bytes (the rotator and the served SVID hold the same key).
#[derive(Clone)]
pub struct PrivateKey {
    pkcs8: Arc<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// Generates a fresh key. RSA generation takes a while: call it off the async threads.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let generated = match algorithm {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::EcdsaP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
            KeyAlgorithm::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
            KeyAlgorithm::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
            KeyAlgorithm::Rsa4096 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_4096),
        };
        let pair = generated.map_err(|source| KeyError::Generate { algorithm, source })?;
        Ok(Self {
            pkcs8: Arc::new(Zeroizing::new(pair.serialize_der())),
        })
    }

    /// Takes PKCS#8 DER, checking that it parses.
    pub fn from_pkcs8(der: Vec<u8>) -> Result<Self, KeyError> {
        let key = Self {
            pkcs8: Arc::new(Zeroizing::new(der)),
        };
        key.key_pair()?;
        Ok(key)
    }

    /// Reads the first `PRIVATE KEY` block of PEM text.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let blocks = pem::parse_many(text).map_err(|_| KeyError::Pem)?;
        let block = blocks
            .into_iter()
            .find(|b| b.tag() == "PRIVATE KEY")
            .ok_or(KeyError::Pem)?;
        Self::from_pkcs8(block.into_contents())
    }

    /// The PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The PKCS#8 DER bytes, shared (not copied) with this key.
    pub fn shared_pkcs8(&self) -> Arc<Zeroizing<Vec<u8>>> {
        self.pkcs8.clone()
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), in a buffer that is wiped on drop.
    pub fn to_pem(&self) -> Zeroizing<String> {
        let block = pem::Pem::new("PRIVATE KEY", self.pkcs8.to_vec());
        let text = Zeroizing::new(pem::encode(&block));
        // The copy the PEM encoder was given is wiped too.
        drop(Zeroizing::new(block.into_contents()));
        text
    }

    /// The rcgen key pair, to sign a CSR with.
    pub fn key_pair(&self) -> Result<KeyPair, KeyError> {
        KeyPair::try_from(self.pkcs8.as_slice()).map_err(KeyError::Parse)
    }

    /// The raw public key (the bit string of the SubjectPublicKeyInfo).
    pub fn public_key_raw(&self) -> Result<Vec<u8>, KeyError> {
        Ok(self.key_pair()?.public_key_raw().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_generate_and_round_trip() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Rsa2048,
        ] {
            let key = PrivateKey::generate(alg).expect("generate");
            let pem = key.to_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{alg}");
            let back = PrivateKey::from_pem(&pem).expect("parse");
            assert_eq!(back.pkcs8_der(), key.pkcs8_der());
            assert_eq!(
                back.public_key_raw().expect("pub"),
                key.public_key_raw().expect("pub")
            );
        }
    }

    #[test]
    fn debug_is_redacted() {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("generate");
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn config_names() {
        for (text, want) in [
            ("\"ecdsa-p256\"", Some(KeyAlgorithm::EcdsaP256)),
            ("\"ecdsa-p384\"", Some(KeyAlgorithm::EcdsaP384)),
            ("\"rsa-4096\"", Some(KeyAlgorithm::Rsa4096)),
            ("\"rsa-1024\"", None),
        ] {
            assert_eq!(
                serde_json::from_str::<KeyAlgorithm>(text).ok(),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(PrivateKey::from_pkcs8(vec![1, 2, 3]).is_err());
        assert!(PrivateKey::from_pem("hello").is_err());
    }
}
