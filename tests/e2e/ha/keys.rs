//! Key material every replica shares: a JWT-SVID signed through one replica verifies against the
//! JWKS another serves (checked with an independent JOSE library), the signing key never sits
//! in clear in the database, and a root rotation prepared through one replica activates and
//! signs through the other.

use std::time::Duration;

use base64::Engine as _;
use meshcert_protocol::api::SyncResponse;
use meshcert_protocol::jwt::{JwtBundles, JwtSignRequest, JwtSignResponse};
use meshcert_tests::agent::wait_until;
use meshcert_tests::ca::{CaHolder, ClientIdentity, EXAMPLE_CONFIG};
use meshcert_tests::postgres::replica_config;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{MESH, Shared, api_error, attest, body, sign_chain};

/// The raw bytes of a datastore document, read straight from the database.
fn document_bytes(shared: &Shared, name: &str) -> Vec<u8> {
    let hex = shared.pg.psql_in(
        "meshcert",
        &format!("SELECT encode(value, 'hex') FROM documents WHERE name = '{name}'"),
    );
    assert!(!hex.is_empty(), "document `{name}` is stored");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `node`'s holder entry `id`, as a sync through `ca` delivers it.
fn synced_entry(ca: &CaHolder, node: &ClientIdentity, id: &str) -> meshcert_protocol::Entry {
    let a = ca.https("GET", "/v1/sync", None, Some(node)).expect("sync");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let sync: SyncResponse = serde_json::from_slice(&a.body).expect("sync answer");
    sync.entries
        .into_iter()
        .find(|e| e.id == id)
        .expect("the entry is assigned to the node")
}

/// A JWT-SVID for `entry` with audience `db`, signed through `ca`.
fn jwt_svid(ca: &CaHolder, node: &ClientIdentity, entry: &meshcert_protocol::Entry) -> String {
    let req = JwtSignRequest {
        entry: entry.clone(),
        audience: vec!["db".into()],
        ttl_seconds: 300,
    };
    let a = ca
        .https("POST", "/v1/jwt/sign", Some(&body(&req)), Some(node))
        .expect("jwt sign call");
    assert_eq!(a.status, 200, "{:?}", api_error(&a));
    let signed: JwtSignResponse = serde_json::from_slice(&a.body).expect("jwt answer");
    signed.token
}

/// Verifies `token` as a relying party would, with the JWKS `ca` serves to `node` (the
/// `jsonwebtoken` crate, not the holder's code); its `sub` on success.
fn verify_with_jwks_of(
    ca: &CaHolder,
    node: &ClientIdentity,
    token: &str,
) -> Result<String, String> {
    let a = ca
        .https("GET", "/v1/jwt/bundles", None, Some(node))
        .map_err(|e| e.to_string())?;
    let bundles: JwtBundles = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
    let jwks = bundles
        .trust_domains
        .iter()
        .find(|(td, _)| td.to_string() == "mesh-a.test")
        .map(|(_, j)| j.clone())
        .ok_or("no JWKS for mesh-a.test")?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).map_err(|e| e.to_string())?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("the token has no kid")?;
    let jwk = set
        .find(&kid)
        .ok_or(format!("kid {kid} is not in the JWKS"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["db"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?,
        &validation,
    )
    .map_err(|e| e.to_string())?;
    Ok(data.claims["sub"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_jwt_svid_signed_through_one_replica_verifies_with_the_jwks_of_the_other() {
    let shared = Shared::new();
    let replicas = shared.replicas(2, "");
    let (a, b) = (&replicas[0], &replicas[1]);
    let token = a.token("node-1", MESH).expect("token");
    let node = attest(a, &token).expect("joined through A");
    let entry = synced_entry(a, &node, "web");
    // Both replicas sign their first token at once: they race to create the key.
    let (from_a, from_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| jwt_svid(a, &node, &entry));
        let tb = s.spawn(|| jwt_svid(b, &node, &entry));
        (ta.join().expect("A"), tb.join().expect("B"))
    });
    assert_eq!(
        verify_with_jwks_of(b, &node, &from_a).expect("A's token with B's JWKS"),
        "spiffe://mesh-a.test/web"
    );
    assert_eq!(
        verify_with_jwks_of(a, &node, &from_b).expect("B's token with A's JWKS"),
        "spiffe://mesh-a.test/web"
    );
    let kid = |t: &str| jsonwebtoken::decode_header(t).expect("header").kid;
    assert_eq!(
        kid(&from_a),
        kid(&from_b),
        "one signing key for both replicas"
    );

    // The document is sealed: opened with the key-encryption key it holds the private key, and
    // no form of that key appears in the bytes the database stores.
    let name = "jwt-keys/mesh-a.test";
    let stored = document_bytes(&shared, name);
    let kek = meshcert_ca::sealed::Kek::load(&shared.keys.path().join("kek")).expect("kek");
    let plain = kek
        .open(name, &stored)
        .expect("opens with the replicas' key");
    let keys: Vec<serde_json::Value> = serde_json::from_slice(&plain).expect("key set");
    assert_eq!(keys.len(), 1);
    let pkcs8 = keys[0]["pkcs8"].as_str().expect("a private key");
    let der = base64::engine::general_purpose::STANDARD
        .decode(pkcs8)
        .expect("base64");
    assert!(!contains(&stored, pkcs8.as_bytes()), "base64 key in clear");
    assert!(!contains(&stored, &der), "DER key in clear");
    assert!(!contains(&stored, b"pkcs8"));
    // ... and no replica keeps it in a file.
    for r in &replicas {
        let files = std::fs::read_dir(r.state_dir().join("jwt")).map_or(0, Iterator::count);
        assert_eq!(files, 0, "no JWT key file in {}", r.state_dir().display());
    }
}

/// Rotation settings that keep the rotation ACTIVE for the test's duration.
const ROTATION: &str =
    "  heartbeat: 2s\n  rootRotation:\n    window: 3s\n    retireAfter: 1h\n    ackTimeout: 1m\n";

/// Whether the top of `chain` is signed by `root`'s key.
fn chains_to(chain: &[Vec<u8>], root: &[u8]) -> bool {
    let (Some(top), Ok((_, root))) = (chain.last(), X509Certificate::from_der(root)) else {
        return false;
    };
    X509Certificate::from_der(top)
        .is_ok_and(|(_, top)| top.verify_signature(Some(root.public_key())).is_ok())
}

fn root_status(ca: &CaHolder) -> serde_json::Value {
    let out = ca.ctl(&["root", "status", "-o", "json"]).expect("status");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn a_rotation_prepared_through_one_replica_activates_and_signs_through_the_other() {
    let shared = Shared::new();
    let base = EXAMPLE_CONFIG.replace("  heartbeat: 30s\n", ROTATION);
    let config = replica_config(&base, &shared.url, &shared.keys.path().join("kek"));
    let replicas: Vec<CaHolder> = std::thread::scope(|s| {
        let starting: Vec<_> = (0..2)
            .map(|_| s.spawn(|| CaHolder::start(&config)))
            .collect();
        starting
            .into_iter()
            .map(|t| t.join().expect("thread").expect("replica starts"))
            .collect()
    });
    let (a, b) = (&replicas[0], &replicas[1]);
    let out = a.ctl(&["root", "rotate"]).expect("root rotate");
    assert!(out.status.success(), "{out:?}");
    let next = root_status(a)["rotation"]["next"]
        .as_str()
        .expect("next root")
        .to_owned();
    // B learns of the rotation and, with no node to wait for, it activates.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = root_status(b);
        if s["phase"] == "ACTIVE" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ACTIVE: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // B serves the step at its next rotation check, whichever replica activated: its bundle
    // carries the next root, whose key reached B's state folder from the datastore.
    let mut next_root = None;
    wait_until(
        "B's bundle carries the next root",
        Duration::from_secs(30),
        || {
            let bundle = b.ctl(&["bundle"]).expect("bundle");
            next_root = x509_parser::pem::Pem::iter_from_buffer(&bundle.stdout)
                .map(|p| p.expect("PEM").contents)
                .find(|der| meshcert_ca::authority::fingerprint(der) == next);
            next_root.is_some()
        },
    )
    .unwrap_or_else(|e| panic!("{e}; B's log:\n{}", b.log()));
    let next_root = next_root.expect("found above");
    assert!(
        b.state_dir().join(format!("rotation/{next}.key")).exists(),
        "B holds the next root's key"
    );
    let token = b.token("node-1", MESH).expect("token");
    let node = attest(a, &token).expect("joined through A");
    let mut last = None;
    wait_until(
        "B signs under the next root",
        Duration::from_secs(30),
        || {
            let chain = sign_chain(b, &node, "web").expect("signed through B");
            let done = chains_to(&chain, &next_root);
            last = Some(chain.len());
            done
        },
    )
    .unwrap_or_else(|e| panic!("{e} (last chain of {last:?} certificates)"));
    // A follows the document B wrote at its next rotation check (every 5 s).
    wait_until(
        "A signs under the next root too",
        Duration::from_secs(30),
        || {
            chains_to(
                &sign_chain(a, &node, "web").expect("signed through A"),
                &next_root,
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}; A's log:\n{}", a.log()));
    let stored = document_bytes(&shared, meshcert_ca::sealed::ROTATION_ROOTS);
    assert!(
        !contains(&stored, b"PRIVATE KEY"),
        "the database never holds the next root's key in clear"
    );
}
