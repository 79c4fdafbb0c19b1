//! The VirtualMesh end to end on the holder side: shared and limited trust proven with real
//! mTLS handshakes between workloads (tokio-rustls on loopback, SVIDs and bundles exactly as the
//! holder returned them), federation and bundle versions, enforcement of agent-local entries,
//! live reload, the status document and the metrics listener; then the same proofs through
//! real agents (their volumes and Workload API), bundle changes reaching open streams and
//! `federated/`, and enforcement switched by a live edit of the holder's config.
//!
//! The workloads' SVIDs carry only a URI SAN, so the usual DNS-name check cannot apply: the
//! client side verifies the chain with rustls' webpki (`verify_server_cert_signed_by_trust_anchor`)
//! and then the SPIFFE ID by hand; the server side uses the plain `WebPkiClientVerifier` (no
//! name check) and checks the client's SPIFFE ID by hand after the handshake.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;

use meshcert_protocol::api::{
    ApiError, AttestRequest, Bundles, CsrRequest, Der, ErrorCode, NodeSvidResponse, SignOutcome,
    SignRequest, SignResponse, SyncResponse,
};
use meshcert_protocol::{CertState, Enforcement, Entry, IdentityReport, NodeReport, SpiffeId};
use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, ClientIdentity};
use meshcert_tests::oracle::uri_sans;
use meshcert_tests::pki::{csr, p256};
use rcgen::KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::*;

/// Two meshes, `mesh-a` (istio) and `mesh-b` (generic); TRUST and the rest are filled in.
const TWO_MESHES: &str = r#"apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: vm
spec:
  displayName: Two meshes
  meshes:
    - name: mesh-a
      trustDomain: mesh-a.test
      type: istio
    - name: mesh-b
      trustDomain: mesh-b.test
      type: generic
  certificateAuthority:
    builtin:
      ttlDays: 30
      rsaKeySizeBytes: 2048
      orgName: meshcert-tests
TRUST
holder:
  heartbeat: 30s
entries:
  - id: web
    spiffeId: spiffe://mesh-a.test/web
    nodes: [node-a]
    dir: web
  - id: api
    spiffeId: spiffe://mesh-b.test/api
    nodes: [node-b]
    dir: api
  - id: gw-a
    spiffeId: spiffe://mesh-a.test/gateway
    nodes: [node-a]
    dir: gw-a
    gateway: true
  - id: gw-b
    spiffeId: spiffe://mesh-b.test/gateway
    nodes: [node-b]
    dir: gw-b
    gateway: true
"#;

fn config(spec_tail: &str) -> String {
    TWO_MESHES.replace("TRUST\n", spec_tail)
}

/// A request body as JSON bytes.
macro_rules! body {
    ($v:expr) => {
        serde_json::to_vec($v).expect("serialise")
    };
}

/// Joins `node` to `mesh` with a fresh token: the node's mTLS identity and the answer.
fn join(ca: &CaHolder, node: &str, mesh: &str) -> (ClientIdentity, NodeSvidResponse) {
    let key = p256();
    let req = AttestRequest {
        token: ca.token(node, mesh).expect("token"),
        csr: csr(&key, &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(&req)), None)
        .expect("attest call");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: NodeSvidResponse = serde_json::from_slice(&a.body).expect("node SVID answer");
    let identity = ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    };
    (identity, resp)
}

fn sync(ca: &CaHolder, node: &ClientIdentity) -> SyncResponse {
    let a = ca.https("GET", "/v1/sync", None, Some(node)).expect("sync");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    serde_json::from_slice(&a.body).expect("sync answer")
}

fn sign(ca: &CaHolder, node: &ClientIdentity, csrs: Vec<CsrRequest>) -> SignResponse {
    let a = ca
        .https(
            "POST",
            "/v1/sign",
            Some(&body!(&SignRequest { csrs })),
            Some(node),
        )
        .expect("sign");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    serde_json::from_slice(&a.body).expect("sign answer")
}

fn report(ca: &CaHolder, node: &ClientIdentity, r: &NodeReport) {
    let a = ca
        .https("POST", "/v1/report", Some(&body!(r)), Some(node))
        .expect("report");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
}

fn refusal(outcome: &SignOutcome) -> Option<&ApiError> {
    match outcome {
        SignOutcome::Refused { error } => Some(error),
        SignOutcome::Issued { .. } => None,
    }
}

/// A workload as its agent would set it up: its SVID (chain, leaf first), its key, and what it
/// trusts (root certificates and the trust domains whose IDs it accepts).
#[derive(Clone)]
pub(crate) struct Workload {
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key_pkcs8: Vec<u8>,
    pub(crate) roots: Vec<Vec<u8>>,
    pub(crate) domains: Vec<String>,
}

/// The trust a workload gets from its bundles: every trust domain's roots (what the Workload
/// API serves as the bundle plus the federated bundles).
fn trust_of(bundles: &Bundles) -> (Vec<Vec<u8>>, Vec<String>) {
    let roots = bundles
        .trust_domains
        .values()
        .flatten()
        .map(|d| d.0.clone())
        .collect();
    let domains = bundles
        .trust_domains
        .keys()
        .map(|td| td.to_string())
        .collect();
    (roots, domains)
}

/// Signs one CSR for `entry_id`/`id` with a fresh key: the workload with its bundles' trust,
/// the key, and the outcome.
fn issue(
    ca: &CaHolder,
    node: &ClientIdentity,
    entry_id: &str,
    id: &str,
) -> (Workload, KeyPair, SignOutcome, Bundles) {
    let key = p256();
    let signed = sign(
        ca,
        node,
        vec![CsrRequest {
            entry_id: entry_id.into(),
            csr: csr(&key, &[id]),
            local: None,
        }],
    );
    let outcome = signed.results[0].outcome.clone();
    let SignOutcome::Issued { svid, .. } = &outcome else {
        panic!("{entry_id} was refused: {outcome:?}");
    };
    let (roots, domains) = trust_of(&signed.bundles);
    let w = Workload {
        chain: svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
        roots,
        domains,
    };
    (w, key, outcome, signed.bundles)
}

/// The one URI SAN of a certificate, as a SPIFFE ID.
pub(crate) fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    c.subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no SAN")?;
    match uri_sans(&c).map_err(|e| e.to_string())?.as_slice() {
        [one] => SpiffeId::new(one).map_err(|e| e.to_string()),
        other => Err(format!("{} URI SANs", other.len())),
    }
}

fn check_domain(der: &[u8], domains: &[String]) -> Result<SpiffeId, rustls::Error> {
    let id = spiffe_id_of(der).map_err(rustls::Error::General)?;
    if !domains.contains(&id.trust_domain().to_string()) {
        return Err(rustls::Error::General(format!(
            "{id} is not in a trusted trust domain"
        )));
    }
    Ok(id)
}

/// Verifies a server's X509-SVID: the chain with webpki against the roots, then the SPIFFE ID
/// by hand (instead of the DNS-name check an SVID cannot pass).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    domains: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_domain(end_entity, &self.domains)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn root_store(roots: &[Vec<u8>]) -> RootCertStore {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .expect("a usable root");
    }
    store
}

/// `w`, accepting the IDs of both test meshes: only the chain can then refuse a peer.
fn accept_both_domains(mut w: Workload) -> Workload {
    w.domains = vec!["mesh-a.test".into(), "mesh-b.test".into()];
    w
}

/// Plain workloads of two meshes under limited trust: each trusts only its mesh's root, so even
/// accepting the other trust domain's IDs, the other mesh's chain does not verify.
fn assert_chains_do_not_cross_meshes(a: &Workload, b: &Workload) {
    let err = handshake(
        &accept_both_domains(a.clone()),
        &accept_both_domains(b.clone()),
    )
    .expect_err("plain workloads of two meshes must not authenticate each other");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "the chain is what fails: {err}"
    );
}

/// One mTLS exchange on loopback, `client` → `server`, each verifying the other with what it
/// trusts. Ok((the ID the client saw, the ID the server saw)) when both sides accepted.
pub(crate) fn handshake(server: &Workload, client: &Workload) -> Result<(String, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = |w: &Workload| -> Vec<CertificateDer<'static>> {
            w.chain.iter().cloned().map(CertificateDer::from).collect()
        };
        let key =
            |w: &Workload| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(w.key_pkcs8.clone()));

        let client_verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(&server.roots)),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain(server), key(server))
            .map_err(|e| e.to_string())?;
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: root_store(&client.roots),
                domains: client.domains.clone(),
                provider: Arc::clone(&provider),
            }))
            .with_client_auth_cert(chain(client), key(client))
            .map_err(|e| e.to_string())?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let server_domains = server.domains.clone();
        let serve = async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor
                .accept(tcp)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .ok_or("server: no client certificate")?;
            let id = check_domain(&peer, &server_domains).map_err(|e| format!("server: {e}"))?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            tls.write_all(b"pong")
                .await
                .map_err(|e| format!("server write: {e}"))?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id.to_string())
        };
        let connect = async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
            let name = ServerName::try_from("workload.invalid").map_err(|e| e.to_string())?;
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("client: {e}"))?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .ok_or("client: no server certificate")?;
            // TLS 1.3: the server judges the client certificate after the client finished;
            // an exchange of application data proves both sides accepted.
            tls.write_all(b"ping")
                .await
                .map_err(|e| format!("client write: {e}"))?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            let id = spiffe_id_of(&peer)?;
            Ok::<_, String>(id.to_string())
        };
        let (served, connected) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(serve, connect)
        })
        .await
        .map_err(|_| "no handshake within 30 s".to_owned())?;
        match (connected, served) {
            (Ok(c), Ok(s)) => Ok((c, s)),
            (c, s) => Err(format!("client: {c:?}; server: {s:?}")),
        }
    })
}

#[test]
fn shared_trust_workloads_of_two_meshes_complete_an_mtls_handshake() {
    let ca = CaHolder::start(&config(
        "  shared: {}\n  federation: {mode: PERMISSIVE}\n  enforceAccessControl: ENABLED\n",
    ))
    .expect("holder starts");
    let (node_a, joined_a) = join(&ca, "node-a", "mesh-a");
    let (node_b, _) = join(&ca, "node-b", "mesh-b");
    assert!(
        joined_a.bundles.shared_root.is_empty(),
        "shared trust sends no separate shared root"
    );
    let (web, _, outcome, bundles) = issue(&ca, &node_a, "web", "spiffe://mesh-a.test/web");
    let (api, _, _, _) = issue(&ca, &node_b, "api", "spiffe://mesh-b.test/api");
    let SignOutcome::Issued { gateway_svid, .. } = &outcome else {
        unreachable!("issue() checks")
    };
    assert!(gateway_svid.is_none());
    // Both trust domains' bundles are the same shared root.
    let roots: Vec<&Vec<Der>> = bundles.trust_domains.values().collect();
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0], roots[1]);
    let (client_saw, server_saw) = handshake(&api, &web).expect("the mTLS handshake succeeds");
    assert_eq!(client_saw, "spiffe://mesh-b.test/api");
    assert_eq!(server_saw, "spiffe://mesh-a.test/web");
    // Gateways hold one SVID only under shared trust.
    let (_, _, outcome, _) = issue(&ca, &node_a, "gw-a", "spiffe://mesh-a.test/gateway");
    let SignOutcome::Issued { gateway_svid, .. } = outcome else {
        unreachable!("issue() checks")
    };
    assert!(gateway_svid.is_none());
}

#[test]
fn limited_trust_separates_workloads_and_joins_gateways() {
    let ca = CaHolder::start(&config("  limited: {}\n  enforceAccessControl: ENABLED\n"))
        .expect("holder starts");
    let (node_a, joined_a) = join(&ca, "node-a", "mesh-a");
    let (node_b, _) = join(&ca, "node-b", "mesh-b");

    // Without federation a node receives its own trust domain's bundle and the shared root.
    let synced = sync(&ca, &node_a);
    let tds: Vec<String> = synced
        .bundles
        .trust_domains
        .keys()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(tds, vec!["mesh-a.test"]);
    let shared_root = synced.bundles.shared_root.clone();
    assert_eq!(shared_root.len(), 1);
    let root_a = synced.bundles.trust_domains.values().next().expect("a")[0].clone();
    assert_ne!(root_a, shared_root[0], "mesh-a has its own root");
    assert_eq!(
        meshcert_tests::ca::read_pem_certs(&ca.bundle_pem_path()).expect("root.pem"),
        vec![shared_root[0].0.clone()],
        "agents bootstrap with the shared root, which signs the holder's server certificate"
    );
    // The node SVID chains to the mesh root.
    let (_, inter) = X509Certificate::from_der(&joined_a.svid.chain[1].0).expect("parse");
    let (_, root) = X509Certificate::from_der(&root_a.0).expect("parse");
    assert!(inter.verify_signature(Some(root.public_key())).is_ok());

    let (web, _, _, _) = issue(&ca, &node_a, "web", "spiffe://mesh-a.test/web");
    let (api, _, _, bundles_b) = issue(&ca, &node_b, "api", "spiffe://mesh-b.test/api");
    assert_ne!(
        bundles_b.trust_domains.values().next(),
        Some(&vec![root_a.clone()]),
        "mesh-b's root is not mesh-a's"
    );
    // Plain workloads of two meshes: each trusts only its mesh's root. Even accepting the
    // other trust domain's IDs, the other mesh's chain does not verify.
    assert_chains_do_not_cross_meshes(&api, &web);
    // Each still talks to its own mesh.
    let (web2, _, _, _) = issue(&ca, &node_a, "web", "spiffe://mesh-a.test/web");
    handshake(&web2, &web).expect("same-mesh workloads authenticate each other");

    // Gateways: a second SVID over the same key and ID, chained to the shared root.
    let gateway = |node: &ClientIdentity, entry: &str, id: &str| {
        let (_, key, outcome, bundles) = issue(&ca, node, entry, id);
        let SignOutcome::Issued { svid, gateway_svid } = outcome else {
            unreachable!("issue() checks")
        };
        let g = gateway_svid.expect("a gateway gets a second SVID under limited trust");
        assert_eq!(g.spiffe_id, svid.spiffe_id);
        let public = |der: &[u8]| {
            X509Certificate::from_der(der)
                .expect("parse")
                .1
                .public_key()
                .raw
                .to_vec()
        };
        assert_eq!(public(&g.chain[0].0), public(&svid.chain[0].0), "same key");
        assert_ne!(g.chain[1], svid.chain[1], "another intermediate");
        Workload {
            chain: g.chain.iter().map(|d| d.0.clone()).collect(),
            key_pkcs8: key.serialize_der(),
            roots: bundles.shared_root.iter().map(|d| d.0.clone()).collect(),
            domains: vec!["mesh-a.test".into(), "mesh-b.test".into()],
        }
    };
    let gw_a = gateway(&node_a, "gw-a", "spiffe://mesh-a.test/gateway");
    let gw_b = gateway(&node_b, "gw-b", "spiffe://mesh-b.test/gateway");
    let (client_saw, server_saw) =
        handshake(&gw_b, &gw_a).expect("gateways of two meshes authenticate each other");
    assert_eq!(client_saw, "spiffe://mesh-b.test/gateway");
    assert_eq!(server_saw, "spiffe://mesh-a.test/gateway");
    // A plain workload's SVID does not pass a gateway's trust.
    let web_to_gateway = Workload {
        roots: gw_b.roots.clone(),
        ..accept_both_domains(web)
    };
    let err = handshake(&gw_b, &web_to_gateway).expect_err("a plain SVID is not a gateway's");
    assert!(
        err.contains("UnknownCA") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // The status shows limited trust with every root and gateway intermediate.
    let status = ca.status().expect("status");
    let cs = &status["certificateStatus"];
    assert_eq!(cs["trust"], "LIMITED");
    assert_eq!(cs["state"], "ACCEPTED");
    assert_eq!(cs["meshRoots"].as_array().map(Vec::len), Some(2));
    let gateways = cs["intermediates"]
        .as_array()
        .expect("intermediates")
        .iter()
        .filter(|i| i["gateway"] == true)
        .count();
    assert_eq!(gateways, 2);
}

fn local_entry(id: &str, spiffe_id: &str) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: SpiffeId::new(spiffe_id).expect("id"),
        nodes: vec![],
        mesh: None,
        selectors: vec![],
        ttl: Duration::from_secs(600),
        dir: id.into(),
        owner: None,
        hook: None,
        gateway: false,
    }
}

fn local_csrs(inside: &Entry, outside: &Entry) -> Vec<CsrRequest> {
    [inside, outside]
        .iter()
        .map(|e| CsrRequest {
            entry_id: e.id.clone(),
            csr: csr(&p256(), &[&e.spiffe_id.to_string()]),
            local: Some((*e).clone()),
        })
        .collect()
}

#[test]
fn agent_local_entries_are_signed_under_disabled_and_refused_under_enabled() {
    let disabled = config("  shared: {}\n  enforceAccessControl: DISABLED\n");
    let ca = CaHolder::start(&disabled).expect("holder starts");
    let (node_a, _) = join(&ca, "node-a", "mesh-a");
    assert_eq!(sync(&ca, &node_a).enforcement, Enforcement::Disabled);
    let inside = local_entry("tool", "spiffe://mesh-a.test/node/node-a/tool");
    let outside = local_entry("sneaky", "spiffe://mesh-b.test/node/node-a/tool");

    let signed = sign(&ca, &node_a, local_csrs(&inside, &outside));
    let SignOutcome::Issued { svid, gateway_svid } = &signed.results[0].outcome else {
        panic!("a local entry inside the trust domain is signed under DISABLED: {signed:?}");
    };
    assert_eq!(
        svid.spiffe_id.to_string(),
        "spiffe://mesh-a.test/node/node-a/tool"
    );
    assert!(gateway_svid.is_none());
    let (_, leaf) = X509Certificate::from_der(&svid.chain[0].0).expect("parse");
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 600 + 10, "the local entry's TTL, backdated 10 s");
    let serial = leaf.raw_serial_as_string().replace(':', "");
    assert_eq!(
        refusal(&signed.results[1].outcome).map(|e| e.code),
        Some(ErrorCode::OutsideTrustDomain)
    );
    // The issuance is recorded with the node and the local marker.
    let out = ca.ctl(&["issuances", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rec = list
        .as_array()
        .expect("array")
        .iter()
        .find(|i| i["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("{serial} in {list:#}"));
    assert_eq!(rec["node"], "node-a");
    assert_eq!(rec["local"], true);

    // The same local entry under ENABLED (a live edit of the file): refused.
    ca.write_config(&disabled.replace("DISABLED", "ENABLED"))
        .expect("edit");
    ca.wait_for_status("ENABLED in force", |s| {
        s["accessControlEnforcementStatus"]["meshes"][0]["effective"] == "ENABLED"
    })
    .expect("reloaded");
    assert_eq!(sync(&ca, &node_a).enforcement, Enforcement::Enabled);
    let signed = sign(&ca, &node_a, local_csrs(&inside, &outside));
    let codes: Vec<Option<ErrorCode>> = signed
        .results
        .iter()
        .map(|r| refusal(&r.outcome).map(|e| e.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            Some(ErrorCode::PolicyDenied),
            Some(ErrorCode::OutsideTrustDomain)
        ]
    );

    // MESH_DEFAULT: istio → DISABLED, generic → ENABLED; nodes apply it and say so.
    ca.write_config(&disabled.replace("  enforceAccessControl: DISABLED\n", ""))
        .expect("edit");
    let status = ca
        .wait_for_status("MESH_DEFAULT in force", |s| {
            s["accessControlEnforcementStatus"]["meshes"][0]["configured"] == "MESH_DEFAULT"
        })
        .expect("reloaded");
    let meshes = &status["accessControlEnforcementStatus"]["meshes"];
    assert_eq!(meshes[0]["effective"], "DISABLED");
    assert_eq!(meshes[1]["effective"], "ENABLED");
    assert_eq!(status["accessControlEnforcementStatus"]["state"], "PENDING");
    assert_eq!(sync(&ca, &node_a).enforcement, Enforcement::Disabled);
    let signed = sign(&ca, &node_a, local_csrs(&inside, &outside));
    assert!(refusal(&signed.results[0].outcome).is_none(), "{signed:?}");
    report(
        &ca,
        &node_a,
        &NodeReport {
            bundle_version: signed.bundles.version,
            enforcement: Some(Enforcement::Disabled),
            identities: vec![].into(),
            node_svid: None,
        },
    );
    let status = ca.status().expect("status");
    let a = &status["accessControlEnforcementStatus"]["meshes"][0];
    assert_eq!(
        (a["applied"].as_u64(), a["nodes"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        status["accessControlEnforcementStatus"]["state"],
        "ACCEPTED"
    );
}

#[test]
fn a_broken_edit_keeps_serving_and_a_fixed_edit_takes_effect_without_restart() {
    let good = config("  shared: {}\n  enforceAccessControl: ENABLED\n");
    let ca = CaHolder::start(&good).expect("holder starts");
    let (node_a, _) = join(&ca, "node-a", "mesh-a");
    assert_eq!(sync(&ca, &node_a).entries.len(), 2);

    let broken = good
        .replace("trustDomain: mesh-b.test", "trustDomain: Mesh_B")
        .replace("type: generic", "type: consul");
    ca.write_config(&broken).expect("edit");
    let status = ca
        .wait_for_status("INVALID", |s| s["configStatus"]["state"] == "INVALID")
        .expect("the broken edit is seen");
    let messages = status["configStatus"]["messages"].to_string();
    assert!(
        messages.contains("spec.meshes[1].trustDomain"),
        "{messages}"
    );
    assert!(messages.contains("spec.meshes[1].type"), "{messages}");
    // The previous configuration keeps serving.
    let synced = sync(&ca, &node_a);
    assert_eq!(synced.entries.len(), 2);
    let (_, _, _, _) = issue(&ca, &node_a, "web", "spiffe://mesh-a.test/web");
    let table = String::from_utf8_lossy(&ca.ctl(&["status"]).expect("status").stdout).to_string();
    assert!(table.contains("INVALID"), "{table}");

    // Not even YAML: still INVALID, still serving.
    ca.write_raw_config("spec: [unclosed").expect("edit");
    ca.wait_for_status("INVALID (not YAML)", |s| {
        s["configStatus"]["messages"].to_string().contains("(file)")
    })
    .expect("seen");
    assert_eq!(sync(&ca, &node_a).entries.len(), 2);

    // A fixed edit with a new entry for node-a takes effect, on SIGHUP as well.
    let fixed = good.replace(
        "entries:\n",
        "entries:\n  - id: db\n    spiffeId: spiffe://mesh-a.test/db\n    nodes: [node-a]\n    dir: db\n",
    );
    ca.write_config(&fixed).expect("edit");
    ca.sighup().expect("SIGHUP");
    ca.wait_for_status("ACCEPTED", |s| s["configStatus"]["state"] == "ACCEPTED")
        .expect("the fixed edit is accepted");
    let synced = sync(&ca, &node_a);
    assert!(
        synced.entries.iter().any(|e| e.id == "db"),
        "{:?}",
        synced.entries
    );
    issue(&ca, &node_a, "db", "spiffe://mesh-a.test/db");
}

#[test]
fn bundle_versions_grow_with_bundle_changes_and_federation_status_counts_acknowledging_nodes() {
    let two = config("  limited: {}\n  federation: {mode: PERMISSIVE}\n");
    let ca = CaHolder::start(&two).expect("holder starts");
    let (a1, _) = join(&ca, "node-a", "mesh-a");
    let (a2, _) = join(&ca, "node-a2", "mesh-a");
    let (b1, _) = join(&ca, "node-b", "mesh-b");
    let synced = sync(&ca, &a1);
    let v1 = synced.bundles.version;
    assert!(v1 >= 1);
    // PERMISSIVE: every mesh's trust domain.
    assert_eq!(synced.bundles.trust_domains.len(), 2);

    let ack = |node: &ClientIdentity, version: u64| {
        report(
            &ca,
            node,
            &NodeReport {
                bundle_version: version,
                enforcement: None,
                identities: vec![IdentityReport {
                    entry_id: "web".into(),
                    spiffe_id: SpiffeId::new("spiffe://mesh-a.test/web").expect("id"),
                    state: CertState::Issued,
                    serial: None,
                    not_after: None,
                    next_rotation: None,
                    last_error: None,
                    attempts: 0,
                }]
                .into(),
                node_svid: None,
            },
        )
    };
    ack(&a1, v1);
    ack(&a2, v1 - 1);
    ack(&b1, v1);
    let status = ca.status().expect("status");
    let f = &status["federationStatus"];
    assert_eq!(f["mode"], "PERMISSIVE");
    assert_eq!(f["bundleVersion"].as_u64(), Some(v1));
    assert_eq!(f["state"], "PENDING");
    let a = &f["meshes"][0];
    assert_eq!(a["mesh"], "mesh-a");
    assert_eq!(
        (a["acknowledged"].as_u64(), a["nodes"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(a["lagging"], serde_json::json!(["node-a2"]));
    assert_eq!(f["meshes"][1]["acknowledged"].as_u64(), Some(1));
    ack(&a2, v1);
    assert_eq!(
        ca.status().expect("status")["federationStatus"]["state"],
        "ACCEPTED"
    );

    // A reload that changes nothing in the bundles keeps the version.
    ca.write_config(&two.replace("heartbeat: 30s", "heartbeat: 20s"))
        .expect("edit");
    ca.sighup().expect("SIGHUP");
    ca.wait_for_status("ACCEPTED", |s| s["configStatus"]["state"] == "ACCEPTED")
        .expect("reloaded");
    assert_eq!(sync(&ca, &a1).bundles.version, v1);

    // A new mesh brings a new root: the bundles change, the version grows, every node lags.
    let three = two.replace(
        "      type: generic\n",
        "      type: generic\n    - name: mesh-c\n      trustDomain: mesh-c.test\n",
    );
    ca.write_config(&three).expect("edit");
    let status = ca
        .wait_for_status("a new bundle version", |s| {
            s["federationStatus"]["bundleVersion"].as_u64() > Some(v1)
        })
        .expect("reloaded");
    let v2 = status["federationStatus"]["bundleVersion"]
        .as_u64()
        .expect("version");
    assert_eq!(status["federationStatus"]["state"], "PENDING");
    assert_eq!(
        status["federationStatus"]["meshes"][0]["acknowledged"].as_u64(),
        Some(0)
    );
    let synced = sync(&ca, &a1);
    assert_eq!(synced.bundles.version, v2);
    assert_eq!(synced.bundles.trust_domains.len(), 3);
    ack(&a1, v2);
    let status = ca.status().expect("status");
    assert_eq!(
        status["federationStatus"]["meshes"][0]["acknowledged"].as_u64(),
        Some(1)
    );
    // The table shows the version and the count at a glance.
    let table = String::from_utf8_lossy(&ca.ctl(&["status"]).expect("status").stdout).to_string();
    assert!(table.contains(&format!("v{v2} 1/2")), "{table}");

    // The version survives a restart.
    let mut ca = ca;
    ca.restart().expect("restart");
    assert_eq!(sync(&ca, &a1).bundles.version, v2);
}

#[test]
fn systemd_hears_reloading_with_monotonic_usec_then_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let config_path = dir.path().join("config.yaml");
    let text = config("  shared: {}\n");
    std::fs::write(&config_path, &text).expect("write");
    let mut child = meshcert_tests::ChildGuard::spawn(
        meshcert_tests::ca::run_command(&config_path, dir.path())
            .env("NOTIFY_SOCKET", &notify)
            .stderr(std::process::Stdio::null()),
    )
    .expect("starts");
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification arrives");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(next().contains("READY=1"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("hup");
    let msg = next();
    assert!(msg.contains("RELOADING=1"), "{msg}");
    let usec = msg
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {msg}"));
    assert!(usec.parse::<u64>().expect("a number") > 0);
    assert!(next().contains("READY=1"), "READY after the reload");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("term");
    assert!(next().contains("STOPPING=1"));
    let status = child
        .wait_within(meshcert_tests::COMMAND_TIMEOUT)
        .expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// `GET /metrics` over plain HTTP/1.0 on loopback.
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[test]
fn metrics_count_signed_and_refused_csrs_and_nodes() {
    let text = config("  shared: {}\n  enforceAccessControl: ENABLED\n").replace(
        "heartbeat: 30s",
        "heartbeat: 30s\n  metricsListen: 127.0.0.1:0",
    );
    let ca = CaHolder::start(&text).expect("holder starts");
    let status = ca.status().expect("status");
    let addr = status["metricsAddress"]
        .as_str()
        .expect("metricsAddress in the status")
        .to_owned();
    let (node_a, _) = join(&ca, "node-a", "mesh-a");
    let signed = sign(
        &ca,
        &node_a,
        vec![
            CsrRequest {
                entry_id: "web".into(),
                csr: csr(&p256(), &["spiffe://mesh-a.test/web"]),
                local: None,
            },
            CsrRequest {
                entry_id: "api".into(),
                csr: csr(&p256(), &["spiffe://mesh-b.test/api"]),
                local: None,
            },
        ],
    );
    report(
        &ca,
        &node_a,
        &NodeReport {
            bundle_version: signed.bundles.version,
            enforcement: Some(Enforcement::Enabled),
            identities: vec![].into(),
            node_svid: None,
        },
    );
    let body = scrape(&addr);
    assert!(body.contains("meshcert_ca_csrs_signed_total 1"), "{body}");
    assert!(
        body.contains("meshcert_ca_csrs_refused_total{code=\"not_assigned\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("meshcert_ca_signing_duration_seconds_count 1"),
        "{body}"
    );
    assert!(body.contains("meshcert_ca_nodes_reporting 1"), "{body}");
    assert!(body.contains("meshcert_ca_nodes_stale 0"), "{body}");
    assert!(
        body.contains("meshcert_ca_svids_issued 2"),
        "node + workload: {body}"
    );
    assert!(
        body.contains(&format!(
            "meshcert_ca_bundle_version {}",
            signed.bundles.version
        )),
        "{body}"
    );
    assert!(!body.contains("PRIVATE"), "nothing secret");
}

#[test]
fn the_limited_trust_example_config_is_valid() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/limited.yaml");
    let out = meshcert_tests::output_within(
        std::process::Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("validate")
            .arg("--config")
            .arg(&example),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ACCEPTED"), "{stdout}");
}

// ---- the VirtualMesh through real agents ----------------------------------------------------
//
// The same proofs with real `meshcert-agent` processes: the SVIDs, keys and bundles are the
// files the agents wrote into their volumes (or what their Workload API serves), not the
// holder's answers.

/// [`config`] with every entry served to this test process's uid on the Workload API.
pub(crate) fn agent_config(spec_tail: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    config(spec_tail).replace(
        "    dir: ",
        &format!("    selectors: [\"unix:uid:{uid}\"]\n    dir: "),
    )
}

/// Agent config lines: sync every second, so a holder-side change reaches the agent at once
/// (agents pull; the default interval is 30 s).
pub(crate) const FAST_SYNC: &str = "syncInterval: 1s\n";

/// Every PEM block labelled `label` in `path`, as DER.
pub(crate) fn pem_blocks(path: &Path, label: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
        let block = block.with_context(|| format!("{} is not PEM", path.display()))?;
        if block.label == label {
            out.push(block.contents);
        }
    }
    anyhow::ensure!(!out.is_empty(), "no {label} in {}", path.display());
    Ok(out)
}

/// Waits (bounded by [`WAIT`]) until an agent has written `dir`'s SVID and its Workload API
/// serves it; the folder.
pub(crate) fn wait_svid(agent: &Agent, dir: &str) -> PathBuf {
    agent
        .wait_for_served(dir)
        .unwrap_or_else(|e| panic!("{dir} was not installed: {e}"))
}

/// A workload set up from its folder as its agent wrote it: `svid.pem`, `svid.key`, and what
/// it trusts, `bundle.pem` for its own trust domain and `federated/<td>.pem` for the others.
fn workload_from_volume(dir: &Path) -> anyhow::Result<Workload> {
    let chain = pem_blocks(&dir.join("svid.pem"), "CERTIFICATE")?;
    let key_pkcs8 = pem_blocks(&dir.join("svid.key"), "PRIVATE KEY")?.remove(0);
    let own = spiffe_id_of(&chain[0]).map_err(anyhow::Error::msg)?;
    let mut roots = pem_blocks(&dir.join("bundle.pem"), "CERTIFICATE")?;
    let mut domains = vec![own.trust_domain().to_string()];
    let federated = dir.join("federated");
    if federated.exists() {
        for file in std::fs::read_dir(&federated)? {
            let path = file?.path();
            let td = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
                .with_context(|| format!("{} is not <td>.pem", path.display()))?
                .to_owned();
            roots.extend(pem_blocks(&path, "CERTIFICATE")?);
            domains.push(td);
        }
    }
    Ok(Workload {
        chain,
        key_pkcs8,
        roots,
        domains,
    })
}

/// A gateway's second identity from its folder: `gateway-svid.pem` over the same `svid.key`,
/// trusting `gateway-bundle.pem` (the shared root) for every mesh's gateways.
fn gateway_from_volume(dir: &Path, domains: &[&str]) -> anyhow::Result<Workload> {
    Ok(Workload {
        chain: pem_blocks(&dir.join("gateway-svid.pem"), "CERTIFICATE")?,
        key_pkcs8: pem_blocks(&dir.join("svid.key"), "PRIVATE KEY")?.remove(0),
        roots: pem_blocks(&dir.join("gateway-bundle.pem"), "CERTIFICATE")?,
        domains: domains.iter().map(|d| (*d).to_owned()).collect(),
    })
}

/// The trust domains named under `federated/` in a folder.
fn federated_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("federated"))
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn agents_of_two_meshes_under_shared_trust_hand_their_workloads_svids_that_complete_an_mtls_handshake()
 {
    let ca = CaHolder::start(&agent_config(
        "  shared: {}\n  federation: {mode: PERMISSIVE}\n  enforceAccessControl: ENABLED\n",
    ))
    .expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", "").expect("agent a");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", "").expect("agent b");
    let web_dir = wait_svid(&agent_a, "web");
    let api_dir = wait_svid(&agent_b, "api");
    let web = workload_from_volume(&web_dir).expect("web's folder");
    let api = workload_from_volume(&api_dir).expect("api's folder");
    // PERMISSIVE: each workload's folder trusts the other mesh through `federated/`.
    assert_eq!(web.domains, ["mesh-a.test", "mesh-b.test"]);
    assert_eq!(api.domains, ["mesh-b.test", "mesh-a.test"]);

    let (client_saw, server_saw) = handshake(&api, &web).expect("the mTLS handshake succeeds");
    assert_eq!(client_saw, "spiffe://mesh-b.test/api");
    assert_eq!(server_saw, "spiffe://mesh-a.test/web");
    let (client_saw, server_saw) = handshake(&web, &api).expect("and the other way round");
    assert_eq!(client_saw, "spiffe://mesh-a.test/web");
    assert_eq!(server_saw, "spiffe://mesh-b.test/api");

    // What the Workload API serves is what the volume holds: the same SVID, and the other
    // mesh's bundle as a federated bundle.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let endpoint = format!("unix://{}", agent_a.workload_socket().display());
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        let svid = client
            .fetch_x509_svid()
            .await
            .expect("an SVID for this uid");
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://mesh-a.test/web");
        assert_eq!(svid.leaf().as_bytes(), web.chain[0].as_slice());
        let bundles = client.fetch_x509_bundles().await.expect("bundles");
        let b = bundles
            .get(&spiffe::TrustDomain::new("mesh-b.test").expect("td"))
            .expect("mesh-b.test is federated");
        let served: Vec<&[u8]> = b.authorities().iter().map(|c| c.as_bytes()).collect();
        let on_disk = pem_blocks(&web_dir.join("federated/mesh-b.test.pem"), "CERTIFICATE")
            .expect("federated file");
        assert_eq!(
            served,
            on_disk.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
    });
}

#[test]
fn agents_under_limited_trust_separate_plain_workloads_and_join_their_gateways() {
    let ca = CaHolder::start(&agent_config(
        "  limited: {}\n  enforceAccessControl: ENABLED\n",
    ))
    .expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", "").expect("agent a");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", "").expect("agent b");
    let web_dir = wait_svid(&agent_a, "web");
    let api_dir = wait_svid(&agent_b, "api");
    let gw_a_dir = wait_svid(&agent_a, "gw-a");
    let gw_b_dir = wait_svid(&agent_b, "gw-b");

    let web = workload_from_volume(&web_dir).expect("web's folder");
    let api = workload_from_volume(&api_dir).expect("api's folder");
    // Without federation a plain workload trusts its own mesh only.
    assert_eq!(web.domains, ["mesh-a.test"]);
    assert!(federated_names(&web_dir).is_empty());
    assert!(
        !web_dir.join("gateway-svid.pem").exists(),
        "web is no gateway"
    );
    assert_chains_do_not_cross_meshes(&api, &web);
    // A gateway's first SVID is a plain workload's of its mesh: it works inside its mesh.
    let gw_a_plain = workload_from_volume(&gw_a_dir).expect("gw-a's folder");
    handshake(&web, &gw_a_plain).expect("same-mesh workloads authenticate each other");

    // The gateways' second SVIDs, as the agents wrote them, chain to the shared root.
    let both = ["mesh-a.test", "mesh-b.test"];
    let gw_a = gateway_from_volume(&gw_a_dir, &both).expect("gw-a's gateway files");
    let gw_b = gateway_from_volume(&gw_b_dir, &both).expect("gw-b's gateway files");
    assert_eq!(gw_a.roots, gw_b.roots, "one shared root");
    assert_ne!(gw_a.roots, web.roots, "not mesh-a's root");
    let (client_saw, server_saw) =
        handshake(&gw_b, &gw_a).expect("gateways of two meshes authenticate each other");
    assert_eq!(client_saw, "spiffe://mesh-b.test/gateway");
    assert_eq!(server_saw, "spiffe://mesh-a.test/gateway");
    // A plain workload's SVID does not pass a gateway's trust, nor the other way round.
    let web_to_gateway = Workload {
        roots: gw_b.roots.clone(),
        ..accept_both_domains(web.clone())
    };
    let err = handshake(&gw_b, &web_to_gateway).expect_err("a plain SVID is not a gateway's");
    assert!(
        err.contains("UnknownCA") || err.contains("UnknownIssuer"),
        "the chain is what fails: {err}"
    );
    let err = handshake(&accept_both_domains(web), &gw_b)
        .expect_err("a plain workload does not trust gateways");
    assert!(
        err.contains("UnknownCA") || err.contains("UnknownIssuer"),
        "the chain is what fails: {err}"
    );

    // The Workload API serves the gateway's second SVID under the hint `gateway`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let endpoint = format!("unix://{}", agent_a.workload_socket().display());
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        let svids = client.fetch_all_x509_svids().await.expect("svids");
        let gateway = svids
            .iter()
            .find(|s| s.leaf().as_bytes() == gw_a.chain[0].as_slice())
            .expect("the gateway SVID is served");
        assert_eq!(gateway.hint(), Some("gateway"));
        assert_eq!(
            gateway.spiffe_id().to_string(),
            "spiffe://mesh-a.test/gateway"
        );
    });
}

/// The holder's federation status: (bundle version, acknowledged of nodes per mesh in order).
fn federation(status: &serde_json::Value) -> (u64, Vec<(u64, u64)>) {
    let f = &status["federationStatus"];
    let meshes = f["meshes"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["acknowledged"].as_u64().unwrap_or(0),
                        m["nodes"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (f["bundleVersion"].as_u64().unwrap_or(0), meshes)
}

#[test]
fn a_bundle_change_reaches_open_workload_streams_and_the_volumes_and_every_node_acknowledges_it() {
    // `web` also runs on node-a2, a second node of mesh-a that is down while the bundles change.
    let two = agent_config("  limited: {}\n  federation: {mode: PERMISSIVE}\n").replace(
        "spiffe://mesh-a.test/web\n    nodes: [node-a]\n",
        "spiffe://mesh-a.test/web\n    nodes: [node-a, node-a2]\n",
    );
    assert!(two.contains("node-a2"), "the config changed shape");
    let ca = CaHolder::start(&two).expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent a");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", FAST_SYNC).expect("agent b");
    let mut agent_a2 = Agent::start(&ca, "node-a2", "mesh-a", FAST_SYNC).expect("agent a2");
    let web_dir = wait_svid(&agent_a, "web");
    let api_dir = wait_svid(&agent_b, "api");
    wait_svid(&agent_a2, "web");
    assert_eq!(
        federated_names(&web_dir),
        BTreeSet::from(["mesh-b.test.pem".to_owned()])
    );
    let status = ca
        .wait_for_status("every node acknowledges the first bundle version", |s| {
            s["federationStatus"]["state"] == "ACCEPTED"
        })
        .expect("acknowledged");
    let (v1, meshes) = federation(&status);
    assert_eq!(meshes, [(2, 2), (1, 1)], "{status:#}");
    agent_a2.kill9();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = format!("unix://{}", agent_a.workload_socket().display());
    let mesh_c = spiffe::TrustDomain::new("mesh-c.test").expect("td");
    // An application watching its identity: an open stream that sees every update.
    let source = rt
        .block_on(spiffe::X509SourceBuilder::new().endpoint(&endpoint).build())
        .expect("an X509Source on agent a");
    assert!(source.try_bundle_for_trust_domain(&mesh_c).is_none());
    let mut updates = source.updated();
    // And a plain open FetchX509Bundles stream: its first message comes at once, without mesh-c.
    let (_client, mut bundle_stream) = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        let stream = client
            .stream_x509_bundles()
            .await
            .expect("FetchX509Bundles opens a stream");
        (client, Box::pin(stream))
    });
    let first = rt
        .block_on(async { tokio::time::timeout(WAIT, bundle_stream.next()).await })
        .expect("the first FetchX509Bundles message comes at once")
        .expect("the stream stays open")
        .expect("a bundle set");
    assert!(first.get(&mesh_c).is_none());

    // A live edit adds a third mesh: its root joins every workload's federated bundles.
    let three = two.replace(
        "      type: generic\n",
        "      type: generic\n    - name: mesh-c\n      trustDomain: mesh-c.test\n",
    );
    let edited = Instant::now();
    ca.write_config(&three).expect("edit");
    rt.block_on(async {
        tokio::time::timeout(WAIT, async {
            while source.try_bundle_for_trust_domain(&mesh_c).is_none() {
                updates.changed().await.expect("the source keeps watching");
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "mesh-c.test never reached the open stream; agent log:\n{}",
                agent_a.log()
            )
        });
    });
    let on_stream = edited.elapsed();
    let on_bundle_stream = rt.block_on(async {
        tokio::time::timeout(WAIT, async {
            loop {
                let set = bundle_stream
                    .next()
                    .await
                    .expect("the FetchX509Bundles stream stays open")
                    .expect("a bundle set");
                if let Some(bundle) = set.get(&mesh_c) {
                    break bundle
                        .authorities()
                        .iter()
                        .map(|c| c.as_bytes().to_vec())
                        .collect::<Vec<Vec<u8>>>();
                }
            }
        })
        .await
        .expect("mesh-c.test reaches the open FetchX509Bundles stream")
    });
    for (agent, dir) in [(&agent_a, &web_dir), (&agent_b, &api_dir)] {
        wait_until("federated/mesh-c.test.pem", WAIT, || {
            federated_names(dir).contains("mesh-c.test.pem")
        })
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    }
    let in_volumes = edited.elapsed();
    // The bundle on the stream, on a fresh FetchX509Bundles and in the volume are one root.
    let on_disk = pem_blocks(&web_dir.join("federated/mesh-c.test.pem"), "CERTIFICATE")
        .expect("mesh-c's federated bundle");
    let streamed = source
        .try_bundle_for_trust_domain(&mesh_c)
        .expect("on the stream");
    let streamed: Vec<Vec<u8>> = streamed
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(streamed, on_disk);
    assert_eq!(on_bundle_stream, on_disk);
    let fetched = rt.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        client.fetch_x509_bundles().await.expect("bundles")
    });
    let fetched: Vec<Vec<u8>> = fetched
        .get(&mesh_c)
        .expect("FetchX509Bundles carries mesh-c.test")
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(fetched, on_disk);
    // A new mesh under limited trust has its own root.
    assert_ne!(
        on_disk,
        pem_blocks(&web_dir.join("bundle.pem"), "CERTIFICATE").expect("bundle")
    );

    // The running agents report the new version: federated to 1 of 2 nodes of mesh-a (the
    // node that is down lags) and 1 of 1 of mesh-b.
    let status = ca
        .wait_for_status(
            "the running nodes acknowledge the new bundle version",
            |s| {
                let (v, meshes) = federation(s);
                v > v1 && meshes.get(..2) == Some(&[(1, 2), (1, 1)][..])
            },
        )
        .expect("acknowledged");
    let acknowledged = edited.elapsed();
    let (v2, meshes) = federation(&status);
    assert_eq!(meshes, [(1, 2), (1, 1), (0, 0)], "{status:#}");
    let f = &status["federationStatus"];
    assert_eq!(f["state"], "PENDING");
    assert_eq!(f["meshes"][0]["lagging"], serde_json::json!(["node-a2"]));
    let table = String::from_utf8_lossy(&ca.ctl(&["status"]).expect("status").stdout).to_string();
    assert!(table.contains(&format!("v{v2} 1/2")), "{table}");
    assert!(table.contains(&format!("v{v2} 1/1")), "{table}");

    // The node that was down catches up when it comes back: 2 of 2.
    agent_a2.restart().expect("agent a2 restarts");
    let status = ca
        .wait_for_status("every node acknowledges the new bundle version", |s| {
            s["federationStatus"]["state"] == "ACCEPTED"
        })
        .expect("acknowledged");
    assert_eq!(federation(&status), (v2, vec![(2, 2), (1, 1), (0, 0)]));
    let a2_web = agent_a2.volume_dir().join("web");
    wait_until("node-a2's federated/mesh-c.test.pem", WAIT, || {
        federated_names(&a2_web).contains("mesh-c.test.pem")
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent_a2.log()));
    // Not an assertion: what an operator can expect with `syncInterval: 1s`.
    eprintln!(
        "bundle v{v1} → v{v2}: on the open stream after {on_stream:?}, in both running nodes' \
         volumes after {in_volumes:?}, acknowledged by them after {acknowledged:?}"
    );
    rt.block_on(source.shutdown());
}

/// The agent's status entry for `entry_id`, if it has one.
fn agent_identity(agent: &Agent, entry_id: &str) -> Option<serde_json::Value> {
    agent.status_json().ok().and_then(|s| {
        s["identities"]
            .as_array()
            .and_then(|ids| ids.iter().find(|i| i["entryId"] == entry_id).cloned())
    })
}

/// The holder's enforcement status of mesh-a: (effective mode, applied, nodes).
fn enforcement_a(status: &serde_json::Value) -> (String, u64, u64) {
    let m = &status["accessControlEnforcementStatus"]["meshes"][0];
    (
        m["effective"].as_str().unwrap_or("").to_owned(),
        m["applied"].as_u64().unwrap_or(0),
        m["nodes"].as_u64().unwrap_or(0),
    )
}

/// Agent config lines declaring the local entry `tool` inside node-a's own namespace of
/// mesh-a's trust domain (the default `holder.localEntryPrefixes`).
const LOCAL_TOOL: &str = "entries:\n  - id: tool\n    spiffeId: spiffe://mesh-a.test/node/node-a/tool\n    dir: tool\n    ttl: 1h\n";

/// A local entry (list item) in mesh-b's trust domain, which node-a may never hold.
const LOCAL_SNEAKY: &str =
    "  - id: sneaky\n    spiffeId: spiffe://mesh-b.test/tool\n    dir: sneaky\n    ttl: 1h\n";

/// Whether the agent's status shows `entry_id` FAILED with `code` in its last error.
fn refused_with(agent: &Agent, entry_id: &str, code: &str) -> bool {
    agent_identity(agent, entry_id).is_some_and(|i| {
        i["state"] == "FAILED" && i["lastError"].as_str().is_some_and(|e| e.contains(code))
    })
}

#[test]
fn an_agent_local_entry_is_signed_under_disabled_and_refused_under_enabled_by_a_live_edit() {
    let disabled = agent_config("  shared: {}\n  enforceAccessControl: DISABLED\n");
    let ca = CaHolder::start(&disabled).expect("holder starts");
    let agent = Agent::start(
        &ca,
        "node-a",
        "mesh-a",
        &format!("{FAST_SYNC}{LOCAL_TOOL}{LOCAL_SNEAKY}"),
    )
    .expect("agent");
    let tool_dir = wait_svid(&agent, "tool");
    // Outside the node's trust domain: refused even under DISABLED, and the status says why.
    wait_until("sneaky refused with outside_trust_domain", WAIT, || {
        refused_with(&agent, "sneaky", "outside_trust_domain")
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    assert!(!agent.volume_dir().join("sneaky").exists());
    let first = workload_from_volume(&tool_dir).expect("tool's folder");
    assert_eq!(
        spiffe_id_of(&first.chain[0]).expect("id").to_string(),
        "spiffe://mesh-a.test/node/node-a/tool"
    );
    wait_svid(&agent, "web");
    let status = ca
        .wait_for_status("DISABLED applied on node-a", |s| {
            enforcement_a(s) == ("DISABLED".into(), 1, 1)
        })
        .expect("applied");
    assert_eq!(
        status["accessControlEnforcementStatus"]["state"],
        "ACCEPTED"
    );

    // ENABLED by a live edit: the agent stops serving the local SVID, and the holder refuses
    // it; the agent's status says so.
    ca.write_config(&disabled.replace("DISABLED", "ENABLED"))
        .expect("edit");
    wait_until("tool refused with policy_denied", WAIT, || {
        refused_with(&agent, "tool", "policy_denied")
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    assert!(!tool_dir.exists(), "the local entry's folder is gone");
    assert!(
        agent.volume_dir().join("web/svid.pem").exists(),
        "the holder's entry stays"
    );
    let status = ca
        .wait_for_status("ENABLED applied on node-a", |s| {
            enforcement_a(s) == ("ENABLED".into(), 1, 1)
        })
        .expect("applied");
    assert_eq!(
        status["accessControlEnforcementStatus"]["state"],
        "ACCEPTED"
    );
    let table = String::from_utf8_lossy(&ca.ctl(&["status"]).expect("status").stdout).to_string();
    assert!(table.contains("ENABLED 1/1"), "{table}");
    let table = String::from_utf8_lossy(
        &meshcert_tests::output_within(
            std::process::Command::new(meshcert_tests::bin_path("meshcert-agent"))
                .args(["status", "--admin-socket"])
                .arg(agent.admin_socket()),
            meshcert_tests::COMMAND_TIMEOUT,
        )
        .expect("agent status")
        .stdout,
    )
    .to_string();
    assert!(table.contains("policy_denied"), "{table}");

    // DISABLED again: signed again at once, with a new key.
    ca.write_config(&disabled).expect("edit");
    let tool_dir = wait_svid(&agent, "tool");
    let again = workload_from_volume(&tool_dir).expect("tool's folder");
    assert_ne!(again.key_pkcs8, first.key_pkcs8);
    wait_until("tool issued", WAIT, || {
        agent_identity(&agent, "tool").is_some_and(|i| i["state"] == "ISSUED")
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    ca.wait_for_status("DISABLED applied again", |s| {
        enforcement_a(s) == ("DISABLED".into(), 1, 1)
    })
    .expect("applied");
}

/// One local-entry CSR per `(entry id, SPIFFE ID)`, each with a fresh key.
fn local_requests(entries: &[(&str, &str)]) -> Vec<CsrRequest> {
    entries
        .iter()
        .map(|(id, spiffe_id)| CsrRequest {
            entry_id: (*id).into(),
            csr: csr(&p256(), &[spiffe_id]),
            local: Some(local_entry(id, spiffe_id)),
        })
        .collect()
}

/// Each result's refusal (code and message), or `None` when issued, by entry id.
fn outcomes(signed: &SignResponse) -> Vec<(String, Option<(ErrorCode, String)>)> {
    signed
        .results
        .iter()
        .map(|r| {
            (
                r.entry_id.clone(),
                refusal(&r.outcome).map(|e| (e.code, e.message.clone())),
            )
        })
        .collect()
}

#[test]
fn under_mesh_default_an_istio_node_gets_only_the_local_entries_the_holder_allows() {
    // mesh-a is istio: MESH_DEFAULT resolves to DISABLED, so its nodes may declare their own
    // entries, within the holder's rules. `payments` is registered to node-c only.
    let text = config("  shared: {}\n").replace(
        "entries:\n",
        "entries:\n  - id: payments\n    spiffeId: spiffe://mesh-a.test/ns/prod/sa/payments\n    nodes: [node-c]\n    dir: payments\n",
    );
    let ca = CaHolder::start(&text).expect("holder starts");
    let (node_a, _) = join(&ca, "node-a", "mesh-a");
    assert_eq!(sync(&ca, &node_a).enforcement, Enforcement::Disabled);
    // An entry created later over the admin socket registers its ID just the same.
    let out = ca
        .ctl(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://mesh-a.test/node/node-a/claimed",
            "--node",
            "node-c",
        ])
        .expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let signed = sign(
        &ca,
        &node_a,
        local_requests(&[
            ("payments", "spiffe://mesh-a.test/ns/prod/sa/payments"),
            ("claimed", "spiffe://mesh-a.test/node/node-a/claimed"),
            ("tool", "spiffe://mesh-a.test/ns/prod/sa/tool"),
            ("neighbour", "spiffe://mesh-a.test/node/node-b/tool"),
            ("node-id", "spiffe://mesh-a.test/meshcert/node/node-b"),
            ("own", "spiffe://mesh-a.test/node/node-a/tool"),
        ]),
    );
    let got = outcomes(&signed);
    let code = |id: &str| {
        got.iter()
            .find(|(e, _)| e == id)
            .and_then(|(_, r)| r.as_ref().map(|(c, _)| *c))
    };
    assert_eq!(code("payments"), Some(ErrorCode::IdRegistered), "{got:#?}");
    assert_eq!(code("claimed"), Some(ErrorCode::IdRegistered), "{got:#?}");
    assert_eq!(
        code("tool"),
        Some(ErrorCode::OutsideLocalPrefixes),
        "{got:#?}"
    );
    assert_eq!(
        code("neighbour"),
        Some(ErrorCode::OutsideLocalPrefixes),
        "{got:#?}"
    );
    assert_eq!(code("node-id"), Some(ErrorCode::ReservedId), "{got:#?}");
    assert_eq!(code("own"), None, "inside node-a's own namespace: {got:#?}");
    // The messages name the rule.
    let message = |id: &str| {
        got.iter()
            .find(|(e, _)| e == id)
            .and_then(|(_, r)| r.as_ref().map(|(_, m)| m.clone()))
            .unwrap_or_default()
    };
    assert!(
        message("payments").contains("registered by a holder entry"),
        "{got:#?}"
    );
    assert!(
        message("tool").contains("spiffe://mesh-a.test/node/node-a/"),
        "the allowed prefix is named: {got:#?}"
    );
    let SignOutcome::Issued { svid, .. } = &signed.results[5].outcome else {
        panic!("own namespace refused: {got:#?}");
    };
    assert_eq!(
        meshcert_tests::oracle::uri_sans_der(&svid.chain[0].0).expect("SAN reads"),
        vec!["spiffe://mesh-a.test/node/node-a/tool".to_owned()]
    );
    // Only that one was issued.
    let out = ca.ctl(&["issuances", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let local: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|i| i["local"] == true)
        .filter_map(|i| i["spiffeId"].as_str())
        .collect();
    assert_eq!(local, vec!["spiffe://mesh-a.test/node/node-a/tool"]);

    // The operator opens another prefix (a live edit): it is allowed, the default is replaced.
    ca.write_config(&text.replace(
        "holder:\n",
        "holder:\n  localEntryPrefixes: [\"/tools/{node}/\", \"/shared-tools/\"]\n",
    ))
    .expect("edit");
    let prefixes_applied = || {
        let signed = sign(
            &ca,
            &node_a,
            local_requests(&[("t", "spiffe://mesh-a.test/shared-tools/lint")]),
        );
        refusal(&signed.results[0].outcome).is_none()
    };
    wait_until("the new prefixes in force", WAIT, prefixes_applied).expect("reloaded");
    let signed = sign(
        &ca,
        &node_a,
        local_requests(&[
            ("mine", "spiffe://mesh-a.test/tools/node-a/x"),
            ("theirs", "spiffe://mesh-a.test/tools/node-b/x"),
            ("own", "spiffe://mesh-a.test/node/node-a/tool"),
        ]),
    );
    let codes: Vec<Option<ErrorCode>> = outcomes(&signed)
        .into_iter()
        .map(|(_, r)| r.map(|(c, _)| c))
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(ErrorCode::OutsideLocalPrefixes),
            Some(ErrorCode::OutsideLocalPrefixes)
        ]
    );
}

/// An operator's root for `name` written as PEM files into `dir`: the paths and an issuer that
/// signs with it (what whoever holds that root can do).
fn provided_root(dir: &Path, name: &str) -> (PathBuf, PathBuf, rcgen::Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} root"));
    let cert = params.self_signed(&key).expect("self-signed");
    let (cert_file, key_file) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    (cert_file, key_file, rcgen::Issuer::new(params, key))
}

/// A certificate for `uri` with a fresh key, signed by `issuer`: a CA (pathlen 0) or a client
/// leaf. Returns the DER and the key.
fn forge(issuer: &rcgen::Issuer<'_, KeyPair>, uri: &str, ca: bool) -> (Vec<u8>, KeyPair) {
    let key = p256();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("ia5"))];
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    } else {
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
    }
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("signed");
    (cert.der().to_vec(), key)
}

#[test]
fn under_limited_trust_another_mesh_root_cannot_speak_for_a_node_on_any_endpoint() {
    let roots = tempfile::tempdir().expect("tempdir");
    let (a_cert, a_key, _) = provided_root(roots.path(), "mesh-a");
    let (b_cert, b_key, mesh_b_root) = provided_root(roots.path(), "mesh-b");
    let ca_of = |cert: &Path, key: &Path| {
        format!(
            "      certificateAuthority:\n        provided:\n          certFile: {}\n          keyFile: {}\n",
            cert.display(),
            key.display()
        )
    };
    let text = config("  limited: {}\n")
        .replace(
            "      type: istio\n",
            &format!("      type: istio\n{}", ca_of(&a_cert, &a_key)),
        )
        .replace(
            "      type: generic\n",
            &format!("      type: generic\n{}", ca_of(&b_cert, &b_key)),
        );
    let ca = CaHolder::start(&text).expect("holder starts");
    let (node_a, _) = join(&ca, "node-a", "mesh-a");
    let (node_b, _) = join(&ca, "node-b", "mesh-b");
    assert_eq!(sync(&ca, &node_b).mesh, "mesh-b");

    // Whoever holds mesh-b's root makes node SVIDs for mesh-a's node `node-a`: signed by the root
    // itself, and through an intermediate that names mesh-a's trust domain.
    let id = "spiffe://mesh-a.test/meshcert/node/node-a";
    let (direct, direct_key) = forge(&mesh_b_root, id, false);
    let (inter, inter_key) = forge(&mesh_b_root, "spiffe://mesh-a.test", true);
    let inter_issuer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(inter.clone()), inter_key)
            .expect("issuer");
    let (via, via_key) = forge(&inter_issuer, id, false);
    let forged = [
        ClientIdentity {
            chain: vec![direct],
            key_pkcs8: direct_key.serialize_der(),
        },
        ClientIdentity {
            chain: vec![via, inter],
            key_pkcs8: via_key.serialize_der(),
        },
    ];
    let web_csr = SignRequest {
        csrs: vec![CsrRequest {
            entry_id: "web".into(),
            csr: csr(&p256(), &["spiffe://mesh-a.test/web"]),
            local: None,
        }],
    };
    let renew = meshcert_protocol::api::RenewRequest {
        csr: csr(&p256(), &[]),
    };
    let forged_report = NodeReport {
        bundle_version: 424_242,
        enforcement: Some(Enforcement::Enabled),
        identities: vec![].into(),
        node_svid: None,
    };
    let calls: [(&str, &str, Option<Vec<u8>>); 4] = [
        ("GET", "/v1/sync", None),
        ("POST", "/v1/sign", Some(body!(&web_csr))),
        ("POST", "/v1/node/renew", Some(body!(&renew))),
        ("POST", "/v1/report", Some(body!(&forged_report))),
    ];
    for (i, identity) in forged.iter().enumerate() {
        for (method, path, body) in &calls {
            let a = ca
                .https(method, path, body.as_deref(), Some(identity))
                .unwrap_or_else(|e| panic!("forged #{i} {path}: {e}"));
            let text = String::from_utf8_lossy(&a.body).to_string();
            assert_eq!(a.status, 401, "forged #{i} {method} {path}: {text}");
            let e: ApiError = serde_json::from_slice(&a.body).expect("ApiError");
            assert_eq!(e.code, ErrorCode::Unauthenticated, "{path}: {}", e.message);
            assert!(
                e.message.contains("mesh-a"),
                "the rule names the mesh: {}",
                e.message
            );
            assert!(
                !text.contains("BEGIN") && !text.contains("mesh-a.test/web"),
                "{text}"
            );
        }
    }
    // Nothing of the forgeries landed: no report from `node-a`, no issuance but the joins.
    let status = ca.status().expect("status");
    let na = status["certificateStatus"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node-a")
        .cloned()
        .expect("node-a");
    assert!(na.get("lastReport").is_none(), "{na:#}");
    assert_eq!(status["certificateStatus"]["svidsIssued"], 2, "{status:#}");
    // The real node of mesh-a keeps working on every endpoint.
    let entries: Vec<String> = sync(&ca, &node_a)
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert!(entries.contains(&"web".to_owned()), "{entries:?}");
    let signed = sign(&ca, &node_a, web_csr.csrs.clone());
    assert!(refusal(&signed.results[0].outcome).is_none(), "{signed:?}");
    report(
        &ca,
        &node_a,
        &NodeReport {
            bundle_version: signed.bundles.version,
            enforcement: Some(Enforcement::Disabled),
            identities: vec![].into(),
            node_svid: None,
        },
    );
    let a = ca
        .https(
            "POST",
            "/v1/node/renew",
            Some(&body!(&renew)),
            Some(&node_a),
        )
        .expect("renew");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
}
