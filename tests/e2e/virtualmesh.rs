//! The VirtualMesh end to end on the holder side: shared and limited trust proven with real
//! mTLS handshakes between workloads (tokio-rustls on loopback, SVIDs and bundles exactly as the
//! holder returned them), federation and bundle versions, enforcement of agent-local entries,
//! live reload, the status document and the metrics listener.
//!
//! The workloads' SVIDs carry only a URI SAN, so the usual DNS-name check cannot apply: the
//! client side verifies the chain with rustls' webpki (`verify_server_cert_signed_by_trust_anchor`)
//! and then the SPIFFE ID by hand; the server side uses the plain `WebPkiClientVerifier` (no
//! name check) and checks the client's SPIFFE ID by hand after the handshake.

use std::sync::Arc;
use std::time::Duration;

use meshcert_protocol::api::{
    ApiError, AttestRequest, Bundles, CsrRequest, Der, ErrorCode, NodeSvidResponse, SignOutcome,
    SignRequest, SignResponse, SyncResponse,
};
use meshcert_protocol::{CertState, Enforcement, Entry, IdentityReport, NodeReport, SpiffeId};
use meshcert_tests::ca::{CaHolder, ClientIdentity};
use rcgen::{CertificateParams, KeyPair, SanType};
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

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key generation")
}

fn csr(key: &KeyPair, uris: &[&str]) -> Der {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ia5 string")))
        .collect();
    Der(p.serialize_request(key).expect("csr").der().to_vec())
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
struct Workload {
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    roots: Vec<Vec<u8>>,
    domains: Vec<String>,
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
fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, String> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let san = c
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no SAN")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
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

/// One mTLS exchange on loopback, `client` → `server`, each verifying the other with what it
/// trusts. Ok((the ID the client saw, the ID the server saw)) when both sides accepted.
fn handshake(server: &Workload, client: &Workload) -> Result<(String, String), String> {
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
    let accept_both = |mut w: Workload| {
        w.domains = vec!["mesh-a.test".into(), "mesh-b.test".into()];
        w
    };
    let err = handshake(&accept_both(api.clone()), &accept_both(web.clone()))
        .expect_err("plain workloads of two meshes must not authenticate each other");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "the chain is what fails: {err}"
    );
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
        ..accept_both(web)
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
    let inside = local_entry("tool", "spiffe://mesh-a.test/tool");
    let outside = local_entry("sneaky", "spiffe://mesh-b.test/tool");

    let signed = sign(&ca, &node_a, local_csrs(&inside, &outside));
    let SignOutcome::Issued { svid, gateway_svid } = &signed.results[0].outcome else {
        panic!("a local entry inside the trust domain is signed under DISABLED: {signed:?}");
    };
    assert_eq!(svid.spiffe_id.to_string(), "spiffe://mesh-a.test/tool");
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
            identities: vec![],
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
                }],
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
    let mut child = std::process::Command::new(meshcert_tests::bin_path("meshcert-ca"))
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
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
    assert_eq!(child.wait().expect("exits").code(), Some(0));
}

/// `GET /metrics` over plain HTTP/1.0 on loopback.
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
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
            identities: vec![],
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
    let out = std::process::Command::new(meshcert_tests::bin_path("meshcert-ca"))
        .arg("validate")
        .arg("--config")
        .arg(&example)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ACCEPTED"), "{stdout}");
}
