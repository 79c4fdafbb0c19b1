//! How the agent trusts the holder's server certificate: the configured trust bundle plus
//! every root of the last synced bundles (old and new during a root rotation), so a rotation
//! never needs a new join token or a new configured bundle. The set is swapped whole when a
//! sync brings other roots; verification itself is rustls-webpki's.

use std::sync::{Arc, RwLock};

use meshcert_protocol::api::Bundles;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a trust set cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A root is not a usable trust anchor.
    #[error("trust bundle: {0}")]
    BadRoot(String),
}

/// The roots the holder's server certificate may chain to; updated from syncs.
#[derive(Debug)]
pub struct HolderTrust {
    configured: Vec<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<(Vec<Vec<u8>>, Arc<WebPkiServerVerifier>)>,
}

fn verifier(
    roots: &[Vec<u8>],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TrustError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .map_err(|e| TrustError::BadRoot(e.to_string()))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::clone(provider))
        .build()
        .map_err(|e| TrustError::BadRoot(e.to_string()))
}

/// Every root of `bundles` (each trust domain's and the shared root), without duplicates,
/// after `configured`; pure.
pub fn union(configured: &[Vec<u8>], bundles: &Bundles) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = configured.to_vec();
    let synced = bundles
        .trust_domains
        .values()
        .flatten()
        .chain(&bundles.shared_root);
    for r in synced {
        if !out.contains(&r.0) {
            out.push(r.0.clone());
        }
    }
    out
}

impl HolderTrust {
    /// Trusts the configured roots.
    pub fn new(
        configured: &[Vec<u8>],
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, TrustError> {
        let v = verifier(configured, &provider)?;
        Ok(Self {
            configured: configured.to_vec(),
            provider,
            current: RwLock::new((configured.to_vec(), v)),
        })
    }

    /// Trusts the configured roots and those of `bundles` from now on (new handshakes).
    pub fn follow(&self, bundles: &Bundles) {
        let roots = union(&self.configured, bundles);
        let same = self.current.read().is_ok_and(|c| c.0 == roots);
        if same {
            return;
        }
        match verifier(&roots, &self.provider) {
            Ok(v) => {
                if let Ok(mut c) = self.current.write() {
                    tracing::info!(
                        roots = roots.len(),
                        "trusting the holder through the synced bundle"
                    );
                    *c = (roots, v);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the synced bundle cannot be trusted; keeping the previous roots")
            }
        }
    }

    fn get(&self) -> Option<Arc<WebPkiServerVerifier>> {
        self.current.read().ok().map(|c| Arc::clone(&c.1))
    }
}

fn poisoned() -> rustls::Error {
    rustls::Error::General("trust lock poisoned".into())
}

impl ServerCertVerifier for HolderTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get().ok_or_else(poisoned)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()
            .ok_or_else(poisoned)?
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()
            .ok_or_else(poisoned)?
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcert_protocol::TrustDomain;
    use meshcert_protocol::api::Der;

    #[test]
    fn the_synced_roots_join_the_configured_ones_once() {
        let td = TrustDomain::new("a.test").expect("td");
        let b = Bundles {
            trust_domains: [(td, vec![Der(vec![1]), Der(vec![2])])].into(),
            shared_root: vec![Der(vec![1]), Der(vec![3])],
            ..Bundles::default()
        };
        assert_eq!(union(&[vec![2]], &b), vec![vec![2], vec![1], vec![3]]);
    }
}
