//! Issuance policy: the pure checks a CSR passes before the holder signs it.
//!
//! Order of checks for a workload CSR, and the code each failure gets:
//! 1. a holder entry exists (`unknown_entry`) and is assigned to the calling node
//!    (`not_assigned`); an agent-local entry (sent with the CSR) is checked by
//!    [`check_local_entry`] instead: outside the node's trust domain it is refused
//!    (`outside_trust_domain`) under every mode, under ENABLED it is refused (`policy_denied`),
//!    a node identity or a bare trust domain is never granted (`reserved_id`), nor an ID any
//!    holder entry registers (`id_registered`), nor one outside `holder.localEntryPrefixes`
//!    (default `/node/{node}/`: the node's own namespace; `outside_local_prefixes`);
//! 2. the entry's ID is inside the calling node's trust domain (`outside_trust_domain`) and
//!    not a node identity (`reserved_id`, even for a holder entry stored without validation);
//! 3. the CSR parses (`bad_csr`) and its key is ECDSA P-256, P-384 or RSA ≥ 2048
//!    (`key_not_allowed`; checked before the signature, since aws-lc-rs will not even verify
//!    an RSA-1024 signature);
//! 4. its signature verifies (`bad_csr`);
//! 5. it has exactly one URI SAN, equal to the entry's ID. A SPIFFE ID of another trust domain
//!    answers `outside_trust_domain`; anything else (no URI, two URIs, a non-SPIFFE URI, another
//!    path) answers `san_mismatch`.
//!
//! Only the public key is taken from the CSR; everything else in the certificate comes from the
//! entry, so a CSR asking for `CA:true` still yields a non-CA leaf.

use meshcert_protocol::api::{ApiError, ErrorCode};
use meshcert_protocol::{Enforcement, Entry, SpiffeId, TrustDomain};
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension};
use x509_parser::public_key::PublicKey;

use crate::authority::CsrKey;

/// The path prefix of node identities (`spiffe://<td>/meshcert/node/<name>`): never a
/// workload's, whoever registers it.
pub const NODE_ID_PREFIX: &str = "/meshcert/node/";

/// OID of the P-256 curve.
const P256: &str = "1.2.840.10045.3.1.7";
/// OID of the P-384 curve.
const P384: &str = "1.3.132.0.34";

/// The node a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Node name.
    pub node: String,
    /// Its mesh.
    pub mesh: String,
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
}

/// A CSR that parsed and verified, with an allowed key.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// The public key, used verbatim.
    pub key: CsrKey,
    /// The URI SANs the CSR asked for.
    pub uris: Vec<String>,
}

fn refuse(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// Parses a CSR, verifies its signature and checks its key algorithm and size.
pub fn check_csr(der: &[u8]) -> Result<CheckedCsr, ApiError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|_| refuse(ErrorCode::BadCsr, "the CSR is not valid DER"))?;
    if !rest.is_empty() {
        return Err(refuse(ErrorCode::BadCsr, "trailing bytes after the CSR"));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(P256) => &rcgen::PKCS_ECDSA_P256_SHA256,
                Some(P384) => &rcgen::PKCS_ECDSA_P384_SHA384,
                other => {
                    return Err(refuse(
                        ErrorCode::KeyNotAllowed,
                        format!(
                            "EC curve {} is not allowed; use P-256 or P-384",
                            other.unwrap_or("(none)")
                        ),
                    ));
                }
            }
        }
        Ok(PublicKey::RSA(rsa)) => {
            if rsa.key_size() < 2048 {
                return Err(refuse(
                    ErrorCode::KeyNotAllowed,
                    format!("RSA-{} is too small; at least 2048 bits", rsa.key_size()),
                ));
            }
            &rcgen::PKCS_RSA_SHA256
        }
        _ => {
            return Err(refuse(
                ErrorCode::KeyNotAllowed,
                "the key algorithm is not allowed; use ECDSA P-256, P-384 or RSA ≥ 2048",
            ));
        }
    };
    // The key is acceptable; now the signature (rcgen verifies it, and refuses extensions it
    // does not know).
    rcgen::CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| refuse(ErrorCode::BadCsr, format!("the CSR is not valid: {e}")))?;
    let mut uris = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uris.push((*u).to_owned());
                    }
                }
            }
        }
    }
    Ok(CheckedCsr {
        key: CsrKey {
            spki: spki.raw.to_vec(),
            raw: spki.subject_public_key.data.to_vec(),
            alg,
        },
        uris,
    })
}

/// What the holder will sign: the entry's ID with the entry's TTL, over the CSR's key.
#[derive(Debug, Clone)]
pub struct Approved {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The requested lifetime (the authority clamps it).
    pub ttl: std::time::Duration,
    /// The CSR's public key.
    pub key: CsrKey,
    /// A holder entry marked as a gateway (never an agent-local one).
    pub gateway: bool,
    /// Signed for an agent-local entry.
    pub local: bool,
}

/// The holder's rules for agent-local entries, as they apply to one CSR.
#[derive(Debug, Clone, Copy)]
pub struct LocalRules<'a> {
    /// The mesh's effective enforcement (`MESH_DEFAULT` must already be resolved; it counts as
    /// ENABLED here).
    pub enforcement: Enforcement,
    /// `holder.localEntryPrefixes`: path prefixes (ending in `/`, `{node}` standing for the
    /// calling node's name) inside the node's trust domain.
    pub prefixes: &'a [String],
    /// Whether a holder entry (of any node or mesh) registers the local entry's ID.
    pub registered: bool,
}

/// The path prefix a `holder.localEntryPrefixes` template gives for `node`.
pub fn expand_prefix(template: &str, node: &str) -> String {
    template.replace("{node}", node)
}

/// Whether `path` lies strictly inside one of the prefixes (expanded for `node`).
pub fn inside_prefixes(path: &str, prefixes: &[String], node: &str) -> bool {
    prefixes.iter().any(|t| {
        let p = expand_prefix(t, node);
        path.len() > p.len() && path.starts_with(&p)
    })
}

/// The refusal of a local entry outside `holder.localEntryPrefixes`, naming what is allowed.
fn outside_prefixes(caller: &Caller, id: &SpiffeId, prefixes: &[String]) -> ApiError {
    let allowed: Vec<String> = prefixes
        .iter()
        .map(|t| {
            format!(
                "spiffe://{}{}",
                caller.trust_domain,
                expand_prefix(t, &caller.node)
            )
        })
        .collect();
    refuse(
        ErrorCode::OutsideLocalPrefixes,
        format!(
            "`{id}` is outside the prefixes allowed for local entries of node `{}` (holder.localEntryPrefixes: {})",
            caller.node,
            if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            }
        ),
    )
}

/// Whether an agent-local entry may be signed for `caller`. The rules, in order, each with
/// its own code: inside the node's trust domain (`outside_trust_domain`, under every mode);
/// enforcement DISABLED (`policy_denied`); not the bare trust domain nor under `/meshcert/`
/// (`reserved_id`); an ID no holder entry registers (`id_registered`); inside the allowed
/// prefixes (`outside_local_prefixes`).
pub fn check_local_entry(
    caller: &Caller,
    entry_id: &str,
    local: &Entry,
    rules: &LocalRules<'_>,
) -> Result<(), ApiError> {
    let id = &local.spiffe_id;
    if !caller.trust_domain.contains(id) {
        return Err(refuse(
            ErrorCode::OutsideTrustDomain,
            format!(
                "the local entry's `{id}` is outside the node's trust domain `{}`",
                caller.trust_domain
            ),
        ));
    }
    if rules.enforcement != Enforcement::Disabled {
        return Err(refuse(
            ErrorCode::PolicyDenied,
            format!(
                "agent-local entries are not allowed: access control is enforced (ENABLED) for mesh `{}`",
                caller.mesh
            ),
        ));
    }
    if !id.is_leaf() || id.path().starts_with("/meshcert/") {
        return Err(refuse(
            ErrorCode::ReservedId,
            format!("`{id}` is reserved; a local entry needs a workload path outside /meshcert/"),
        ));
    }
    if rules.registered {
        return Err(refuse(
            ErrorCode::IdRegistered,
            format!(
                "`{id}` is registered by a holder entry; a local entry never takes an ID the holder assigns"
            ),
        ));
    }
    if !inside_prefixes(id.path(), rules.prefixes, &caller.node) {
        return Err(outside_prefixes(caller, id, rules.prefixes));
    }
    if local.id != entry_id {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!(
                "the CSR names entry `{entry_id}` but carries local entry `{}`",
                local.id
            ),
        ));
    }
    if local.ttl.is_zero() {
        return Err(refuse(
            ErrorCode::BadRequest,
            "the local entry's ttl must be longer than zero",
        ));
    }
    Ok(())
}

/// The CSR's URI SANs must be exactly `want`; a SAN outside the caller's trust domain is named
/// as such.
fn check_uri_san(caller: &Caller, uris: &[String], want: &SpiffeId) -> Result<(), ApiError> {
    let want = want.to_string();
    match uris {
        [only] if *only == want => Ok(()),
        [only] => {
            if let Ok(id) = SpiffeId::new(only)
                && !caller.trust_domain.contains(&id)
            {
                return Err(refuse(
                    ErrorCode::OutsideTrustDomain,
                    format!(
                        "the CSR asks for `{id}`, outside the trust domain `{}`",
                        caller.trust_domain
                    ),
                ));
            }
            Err(refuse(
                ErrorCode::SanMismatch,
                format!("the CSR's URI SAN `{only}` is not the entry's ID `{want}`"),
            ))
        }
        [] => Err(refuse(
            ErrorCode::SanMismatch,
            format!("the CSR has no URI SAN; it must be exactly `{want}`"),
        )),
        many => Err(refuse(
            ErrorCode::SanMismatch,
            format!(
                "the CSR has {} URI SANs; it must have exactly one, `{want}`",
                many.len()
            ),
        )),
    }
}

/// Decides one CSR of a signing batch. `entry` is the stored entry with the requested id;
/// `local` the agent-local entry sent with the CSR, decided by `rules`.
pub fn check_sign(
    caller: &Caller,
    entry_id: &str,
    entry: Option<&Entry>,
    local: Option<&Entry>,
    rules: &LocalRules<'_>,
    csr_der: &[u8],
) -> Result<Approved, ApiError> {
    let entry = match local {
        Some(l) => {
            check_local_entry(caller, entry_id, l, rules)?;
            l
        }
        None => entry.ok_or_else(|| {
            refuse(
                ErrorCode::UnknownEntry,
                format!("no entry has the id `{entry_id}`"),
            )
        })?,
    };
    if local.is_none() && !entry.is_assigned_to(&caller.node, &caller.mesh) {
        return Err(refuse(
            ErrorCode::NotAssigned,
            format!(
                "entry `{entry_id}` is not assigned to node `{}`",
                caller.node
            ),
        ));
    }
    if !caller.trust_domain.contains(&entry.spiffe_id) {
        return Err(refuse(
            ErrorCode::OutsideTrustDomain,
            format!(
                "`{}` is outside the node's trust domain `{}`",
                entry.spiffe_id, caller.trust_domain
            ),
        ));
    }
    // A holder entry is validated when declared or created, but one stored by an older holder
    // (or written into the datastore by hand) is not: a node identity is never signed as a
    // workload SVID, whatever the entry says (it would be another node's identity).
    if entry.spiffe_id.path().starts_with(NODE_ID_PREFIX) {
        return Err(refuse(
            ErrorCode::ReservedId,
            format!(
                "`{}` is reserved for node identities; entry `{entry_id}` cannot be signed",
                entry.spiffe_id
            ),
        ));
    }
    let csr = check_csr(csr_der)?;
    check_uri_san(caller, &csr.uris, &entry.spiffe_id)?;
    Ok(Approved {
        spiffe_id: entry.spiffe_id.clone(),
        ttl: entry.ttl,
        key: csr.key,
        gateway: entry.gateway && local.is_none(),
        local: local.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Authority;
    use crate::config::{Mesh, MeshType, RootSource};
    use proptest::prelude::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData as _, SanType};
    use std::time::{Duration, SystemTime};
    use x509_parser::prelude::*;

    const DEFAULT_PREFIXES: &[String] = &[];

    fn default_prefixes() -> Vec<String> {
        vec![crate::config::DEFAULT_LOCAL_ENTRY_PREFIX.to_owned()]
    }

    fn rules(enforcement: Enforcement, prefixes: &[String]) -> LocalRules<'_> {
        LocalRules {
            enforcement,
            prefixes,
            registered: false,
        }
    }

    fn caller() -> Caller {
        Caller {
            node: "node-1".into(),
            mesh: "mesh-a".into(),
            trust_domain: TrustDomain::new("mesh-a.test").expect("valid"),
        }
    }

    fn entry(id: &str, spiffe: &str, nodes: &[&str]) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: SpiffeId::new(spiffe).expect("valid"),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            mesh: None,
            selectors: vec![],
            ttl: Duration::from_secs(3600),
            dir: id.into(),
            owner: None,
            hook: None,
            gateway: false,
        }
    }

    fn csr_with(key: &KeyPair, uris: &[&str], ca: bool) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.serialize_request(key).expect("csr").der().to_vec()
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
    }

    /// An RSA-1024 key, which aws-lc-rs will not generate: a fixed PKCS#8 test key.
    fn rsa1024_csr() -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "rsa:1024",
                "-nodes",
                "-keyout",
                "/dev/null",
            ])
            .args([
                "-subj",
                "/CN=x",
                "-addext",
                "subjectAltName=URI:spiffe://mesh-a.test/web",
            ])
            .args(["-outform", "DER"])
            .output();
        match out {
            Ok(o) if o.status.success() => o.stdout,
            _ => Vec::new(),
        }
    }

    #[test]
    fn policy_table() {
        let k = p256();
        let web = "spiffe://mesh-a.test/web";
        let good = csr_with(&k, &[web], false);
        let mut bad_sig = good.clone();
        let n = bad_sig.len();
        bad_sig[n - 5] ^= 0x55;
        let rsa1024 = rsa1024_csr();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let rsa2048 = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .expect("rsa");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");

        let web_e = entry("web", web, &["node-1"]);
        let other_node = entry("web", web, &["node-2"]);
        let other_td = entry("web", "spiffe://mesh-b.test/web", &["node-1"]);

        // (case, entry, agent-local, CSR, expected refusal)
        type Case<'a> = (&'a str, Option<&'a Entry>, bool, Vec<u8>, Option<ErrorCode>);
        let cases: Vec<Case<'_>> = vec![
            ("good", Some(&web_e), false, good.clone(), None),
            (
                "ca:true asked",
                Some(&web_e),
                false,
                csr_with(&k, &[web], true),
                None,
            ),
            (
                "p-384",
                Some(&web_e),
                false,
                csr_with(&p384, &[web], false),
                None,
            ),
            (
                "rsa-2048",
                Some(&web_e),
                false,
                csr_with(&rsa2048, &[web], false),
                None,
            ),
            (
                "unknown entry",
                None,
                false,
                good.clone(),
                Some(ErrorCode::UnknownEntry),
            ),
            (
                "entry of another node",
                Some(&other_node),
                false,
                good.clone(),
                Some(ErrorCode::NotAssigned),
            ),
            (
                "entry in another trust domain",
                Some(&other_td),
                false,
                csr_with(&k, &["spiffe://mesh-b.test/web"], false),
                Some(ErrorCode::OutsideTrustDomain),
            ),
            (
                "local entry",
                Some(&web_e),
                true,
                good.clone(),
                Some(ErrorCode::PolicyDenied),
            ),
            (
                "wrong SAN",
                Some(&web_e),
                false,
                csr_with(&k, &["spiffe://mesh-a.test/db"], false),
                Some(ErrorCode::SanMismatch),
            ),
            (
                "two URI SANs",
                Some(&web_e),
                false,
                csr_with(&k, &[web, "spiffe://mesh-a.test/db"], false),
                Some(ErrorCode::SanMismatch),
            ),
            (
                "no URI SAN",
                Some(&web_e),
                false,
                csr_with(&k, &[], false),
                Some(ErrorCode::SanMismatch),
            ),
            (
                "non-SPIFFE URI",
                Some(&web_e),
                false,
                csr_with(&k, &["https://mesh-a.test/web"], false),
                Some(ErrorCode::SanMismatch),
            ),
            (
                "other trust domain in CSR",
                Some(&web_e),
                false,
                csr_with(&k, &["spiffe://mesh-b.test/web"], false),
                Some(ErrorCode::OutsideTrustDomain),
            ),
            (
                "bad signature",
                Some(&web_e),
                false,
                bad_sig,
                Some(ErrorCode::BadCsr),
            ),
            (
                "garbage DER",
                Some(&web_e),
                false,
                b"\x30\x03garbage".to_vec(),
                Some(ErrorCode::BadCsr),
            ),
            (
                "empty",
                Some(&web_e),
                false,
                Vec::new(),
                Some(ErrorCode::BadCsr),
            ),
            (
                "ed25519",
                Some(&web_e),
                false,
                csr_with(&ed, &[web], false),
                Some(ErrorCode::KeyNotAllowed),
            ),
            (
                "rsa-1024",
                Some(&web_e),
                false,
                rsa1024.clone(),
                Some(ErrorCode::KeyNotAllowed),
            ),
        ];
        for (name, e, local, csr, want) in cases {
            if name == "rsa-1024" && rsa1024.is_empty() {
                panic!("openssl is needed to build an RSA-1024 CSR");
            }
            let got = check_sign(
                &caller(),
                "web",
                e,
                local.then_some(&web_e),
                &rules(Enforcement::Enabled, DEFAULT_PREFIXES),
                &csr,
            );
            match want {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(code) => {
                    let err = got.expect_err(name);
                    assert_eq!(err.code, code, "{name}: {}", err.message);
                }
            }
        }
    }

    /// A holder entry naming a node identity (stored without validation, e.g. by hand in the
    /// datastore) would mint another node's identity: refused with `reserved_id`.
    #[test]
    fn a_holder_entry_naming_a_node_identity_is_never_signed() {
        let k = p256();
        let id = "spiffe://mesh-a.test/meshcert/node/node-2";
        let e = entry("stolen", id, &["node-1"]);
        let got = check_sign(
            &caller(),
            "stolen",
            Some(&e),
            None,
            &rules(Enforcement::Enabled, DEFAULT_PREFIXES),
            &csr_with(&k, &[id], false),
        );
        let err = got.expect_err("a node identity is signed as a workload's");
        assert_eq!(err.code, ErrorCode::ReservedId, "{}", err.message);
        assert!(err.message.contains("reserved for node identities"));
    }

    #[test]
    fn local_entries_follow_the_enforcement_table() {
        use Enforcement::{Disabled, Enabled, MeshDefault};
        let k = p256();
        let own = "spiffe://mesh-a.test/node/node-1/local-web";
        let inside = entry("local-web", own, &[]);
        let with = |id: &str| Entry {
            spiffe_id: SpiffeId::new(id).expect("valid"),
            ..inside.clone()
        };
        let mut gateway = inside.clone();
        gateway.gateway = true;
        let default = default_prefixes();
        let tools = vec!["/tools/".to_owned(), "/team/{node}/".to_owned()];
        let none: Vec<String> = vec![];
        let everything = vec!["/".to_owned()];
        // (case, local entry ID, mode, prefixes, registered by a holder entry, expected refusal)
        type Case<'a> = (
            &'a str,
            Entry,
            Enforcement,
            &'a [String],
            bool,
            Option<ErrorCode>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "own namespace, DISABLED",
                inside.clone(),
                Disabled,
                &default,
                false,
                None,
            ),
            (
                "own namespace, ENABLED",
                inside.clone(),
                Enabled,
                &default,
                false,
                Some(ErrorCode::PolicyDenied),
            ),
            (
                "unresolved default",
                inside.clone(),
                MeshDefault,
                &default,
                false,
                Some(ErrorCode::PolicyDenied),
            ),
            (
                "outside the trust domain",
                with("spiffe://mesh-b.test/node/node-1/x"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::OutsideTrustDomain),
            ),
            (
                "outside the trust domain, ENABLED",
                with("spiffe://mesh-b.test/x"),
                Enabled,
                &default,
                false,
                Some(ErrorCode::OutsideTrustDomain),
            ),
            (
                "a node identity",
                with("spiffe://mesh-a.test/meshcert/node/node-2"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::ReservedId),
            ),
            (
                "under /meshcert/",
                with("spiffe://mesh-a.test/meshcert/x"),
                Disabled,
                &everything,
                false,
                Some(ErrorCode::ReservedId),
            ),
            (
                "the bare trust domain",
                with("spiffe://mesh-a.test"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::ReservedId),
            ),
            (
                "registered by a holder entry",
                inside.clone(),
                Disabled,
                &default,
                true,
                Some(ErrorCode::IdRegistered),
            ),
            (
                "another node's namespace",
                with("spiffe://mesh-a.test/node/node-2/x"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            (
                "a longer node name",
                with("spiffe://mesh-a.test/node/node-10/x"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            (
                "the namespace itself",
                with("spiffe://mesh-a.test/node/node-1"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            (
                "outside every prefix",
                with("spiffe://mesh-a.test/payments"),
                Disabled,
                &default,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            (
                "an operator's prefix",
                with("spiffe://mesh-a.test/tools/x"),
                Disabled,
                &tools,
                false,
                None,
            ),
            (
                "an operator's node template",
                with("spiffe://mesh-a.test/team/node-1/x"),
                Disabled,
                &tools,
                false,
                None,
            ),
            (
                "another node under the template",
                with("spiffe://mesh-a.test/team/node-2/x"),
                Disabled,
                &tools,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            (
                "no prefixes at all",
                inside.clone(),
                Disabled,
                &none,
                false,
                Some(ErrorCode::OutsideLocalPrefixes),
            ),
            ("a gateway flag", gateway, Disabled, &default, false, None),
        ];
        for (name, local, mode, prefixes, registered, want) in cases {
            let csr = csr_with(&k, &[&local.spiffe_id.to_string()], false);
            let rules = LocalRules {
                enforcement: mode,
                prefixes,
                registered,
            };
            // No holder entry has this id, and the local entry is assigned to no node: neither
            // matters for a local entry.
            let got = check_sign(&caller(), "local-web", None, Some(&local), &rules, &csr);
            match want {
                None => {
                    let ok = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(ok.local, "{name}");
                    assert!(
                        !ok.gateway,
                        "{name}: a local entry never gets a gateway SVID"
                    );
                }
                Some(code) => {
                    let err = got.expect_err(name);
                    assert_eq!(err.code, code, "{name}: {}", err.message);
                }
            }
        }
        let rules = rules(Disabled, &default);
        // Under DISABLED the CSR rules still hold: the SAN must be the local entry's ID.
        let csr = csr_with(&k, &["spiffe://mesh-a.test/node/node-1/other"], false);
        let got = check_sign(&caller(), "local-web", None, Some(&inside), &rules, &csr);
        assert_eq!(got.expect_err("san").code, ErrorCode::SanMismatch);
        // The CSR's entry id must be the local entry's.
        let csr = csr_with(&k, &[own], false);
        let got = check_sign(&caller(), "web", None, Some(&inside), &rules, &csr);
        assert_eq!(got.expect_err("id").code, ErrorCode::BadRequest);
    }

    fn authority(dir: &std::path::Path) -> Authority {
        let mesh = Mesh {
            name: "mesh-a".into(),
            trust_domain: TrustDomain::new("mesh-a.test").expect("valid"),
            mesh_type: MeshType::Generic,
        };
        let root = RootSource::Builtin {
            ttl_days: 30,
            rsa_bits: 2048,
            org_name: "o".into(),
        };
        Authority::open(&root, "t", &[mesh], dir, SystemTime::now()).expect("authority")
    }

    /// Checks a leaf against the X509-SVID rules with x509-parser (independent of rcgen).
    fn assert_x509_svid(der: &[u8], id: &str, issuer: &[u8]) {
        let (_, c) = X509Certificate::from_der(der).expect("leaf parses");
        let (_, ca) = X509Certificate::from_der(issuer).expect("issuer parses");
        let san = c
            .subject_alternative_name()
            .expect("ok")
            .expect("SAN present");
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec![id]);
        if c.subject().iter().next().is_none() {
            assert!(san.critical, "empty subject needs a critical SAN");
        }
        let bc = c
            .basic_constraints()
            .expect("ok")
            .expect("basic constraints present");
        assert!(!bc.value.ca, "leaf must not be a CA");
        let ku = c.key_usage().expect("ok").expect("key usage present");
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = c.extended_key_usage().expect("ok").expect("eku");
        assert!(eku.value.server_auth && eku.value.client_auth);
        let mut ski = false;
        let mut aki = None;
        for e in c.extensions() {
            match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(_) => ski = true,
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        assert!(ski, "SKI present");
        let ca_ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        assert_eq!(aki, ca_ski, "AKI = issuer's SKI");
        let serial = c.raw_serial();
        assert!(!serial.is_empty() && serial.len() <= 20 && serial[0] & 0x80 == 0);
        assert!(c.validity().not_after <= ca.validity().not_after);
        assert!(c.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn leaf_follows_x509_svid_rules_even_when_the_csr_asks_for_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = authority(dir.path());
        let web = "spiffe://mesh-a.test/web";
        for key in [
            p256(),
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .expect("rsa"),
        ] {
            let csr = csr_with(&key, &[web], true);
            let e = entry("web", web, &["node-1"]);
            let ok = check_sign(
                &caller(),
                "web",
                Some(&e),
                None,
                &rules(Enforcement::Enabled, DEFAULT_PREFIXES),
                &csr,
            )
            .expect("approved");
            let now = SystemTime::now();
            let issued = a
                .sign_leaf(
                    "mesh-a",
                    &ok.key,
                    &ok.spiffe_id,
                    ok.ttl,
                    Duration::from_secs(86400),
                    now,
                )
                .expect("signed");
            assert_x509_svid(&issued.leaf, web, &issued.intermediate);
            let (_, c) = X509Certificate::from_der(&issued.leaf).expect("parse");
            assert_eq!(c.public_key().raw, key.subject_public_key_info().as_slice());
            let nb = c.validity().not_before.timestamp();
            let na = c.validity().not_after.timestamp();
            assert_eq!(na - nb, 3600 + 10, "ttl from the entry, backdated 10 s");
        }
    }

    #[test]
    fn leaf_never_outlives_its_signer_or_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = authority(dir.path());
        let key = p256();
        let ck = check_csr(&csr_with(&key, &[], false)).expect("csr").key;
        let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
        let now = SystemTime::now();
        let i = a
            .sign_leaf(
                "mesh-a",
                &ck,
                &id,
                Duration::from_secs(400 * 86400),
                Duration::from_secs(7200),
                now,
            )
            .expect("signed");
        let (_, c) = X509Certificate::from_der(&i.leaf).expect("parse");
        assert_eq!(
            c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
            7200 + 10
        );
        let long = a
            .sign_leaf(
                "mesh-a",
                &ck,
                &id,
                Duration::from_secs(400 * 86400),
                Duration::from_secs(400 * 86400),
                now,
            )
            .expect("signed");
        let ica = a.intermediate("mesh-a").expect("i");
        assert!(long.not_after <= ica.not_after);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_refused_as_a_bad_csr(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let e = entry("web", "spiffe://mesh-a.test/web", &["node-1"]);
            let got = check_sign(&caller(), "web", Some(&e), None, &rules(Enforcement::Enabled, DEFAULT_PREFIXES), &bytes);
            // Refused for what the bytes are (not a CSR, or not an allowed key), never approved.
            let code = got.map(|_| ()).map_err(|e| e.code);
            prop_assert!(
                matches!(code, Err(ErrorCode::BadCsr | ErrorCode::KeyNotAllowed)),
                "{:?}", code
            );
        }

        #[test]
        fn never_approves_outside_the_trust_domain(
            td in "[a-z0-9-]{1,20}\\.test",
            path in "[a-z0-9]{1,10}",
        ) {
            let key = p256();
            let id = format!("spiffe://{td}/{path}");
            let e = entry("x", &id, &["node-1"]);
            let csr = csr_with(&key, &[&id], false);
            let got = check_sign(&caller(), "x", Some(&e), None, &rules(Enforcement::Enabled, DEFAULT_PREFIXES), &csr);
            if td == "mesh-a.test" {
                prop_assert!(got.is_ok());
            } else {
                prop_assert!(got.is_err());
            }
            if let Ok(a) = got {
                prop_assert!(caller().trust_domain.contains(&a.spiffe_id));
            }
            // An agent-local entry in the node's own namespace, under the most permissive mode.
            let id = format!("spiffe://{td}/node/node-1/{path}");
            let e = entry("x", &id, &[]);
            let csr = csr_with(&key, &[&id], false);
            let prefixes = default_prefixes();
            let local = check_sign(&caller(), "x", None, Some(&e), &rules(Enforcement::Disabled, &prefixes), &csr);
            if td == "mesh-a.test" {
                prop_assert!(local.is_ok());
            } else {
                prop_assert_eq!(local.map(|_| ()).map_err(|e| e.code), Err(ErrorCode::OutsideTrustDomain));
            }
        }
    }
}
