//! Keys, CSRs and certificates made at test time: what a node sends, and what an agent serves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_agent::cache::{InstalledSvid, Snapshot};
use meshcert_protocol::api::Der;
use meshcert_protocol::{Entry, Selector, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

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

/// A root and an intermediate that sign X509-SVIDs for one trust domain, and the agent
/// [`Snapshot`]s serving them: feeds the Workload API without a holder or an agent.
pub struct TestPki {
    trust_domain: TrustDomain,
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// A fresh root and intermediate for `trust_domain` (e.g. `example.org`).
    pub fn new(trust_domain: &str) -> anyhow::Result<Self> {
        let ca = |name: &str| -> anyhow::Result<CertificateParams> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.distinguished_name.push(DnType::CommonName, name);
            params.use_authority_key_identifier_extension = true;
            Ok(params)
        };
        let root = CertifiedIssuer::self_signed(ca("test root")?, KeyPair::generate()?)?;
        let intermediate =
            CertifiedIssuer::signed_by(ca("test intermediate")?, KeyPair::generate()?, &root)?;
        Ok(Self {
            trust_domain: TrustDomain::new(trust_domain)?,
            root,
            intermediate,
        })
    }

    /// The intermediate, DER: the second certificate of every chain.
    pub fn intermediate_der(&self) -> Vec<u8> {
        self.intermediate.der().to_vec()
    }

    /// The root, DER: the trust domain's bundle.
    pub fn root_der(&self) -> Vec<u8> {
        self.root.der().to_vec()
    }

    /// A fresh SVID (new key, new certificate) for `id`, served to callers matching
    /// `selectors`; its entry id and folder are the last segment of `id`'s path.
    pub fn svid(
        &self,
        id: &str,
        selectors: &[Selector],
        hint: &str,
    ) -> anyhow::Result<Arc<InstalledSvid>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = SystemTime::from(params.not_after);
        let leaf = params.signed_by(&key, &self.intermediate)?;
        let spiffe_id = SpiffeId::new(id)?;
        let name = id.rsplit('/').next().unwrap_or("entry").to_owned();
        Ok(Arc::new(InstalledSvid {
            entry: Arc::new(Entry {
                id: name.clone(),
                spiffe_id: spiffe_id.clone(),
                nodes: vec!["node-1".into()],
                mesh: None,
                selectors: selectors.to_vec(),
                ttl: Duration::from_secs(3600),
                dir: name,
                owner: None,
                hook: None,
                gateway: false,
            }),
            spiffe_id,
            leaf: leaf.der().to_vec(),
            intermediates: vec![self.intermediate.der().to_vec()].into(),
            key_pkcs8: Arc::new(key.serialize_der().into()),
            not_after,
            hint: hint.to_owned(),
        }))
    }

    /// What an agent serves: these SVIDs, and the root as the trust domain's bundle (version 1).
    pub fn snapshot(&self, svids: &[&Arc<InstalledSvid>]) -> Snapshot {
        Snapshot {
            trust_domain: Some(self.trust_domain.clone()),
            bundle_version: 1,
            bundles: BTreeMap::from([(self.trust_domain.clone(), vec![self.root_der()])]),
            svids: svids.iter().map(|s| Arc::clone(s)).collect(),
            ..Snapshot::default()
        }
    }
}
