//! Root rotation gated on the fleet's acknowledgements (`meshcert-ca root ...`): mTLS between
//! two nodes' workloads never fails across a whole rotation; an offline node holds activation
//! back until the timeout and is named; `abort` leaves the old root alone; a holder killed in
//! any phase resumes it; under limited trust a mesh's own root rotates alone (only its nodes
//! gate and re-issue, no other mesh trusts its new root); retirement waits for node SVIDs too.
//! Short settings (TTLs and windows of seconds) keep each run near a minute.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshcert_tests::agent::{Agent, wait_until};
use meshcert_tests::ca::CaHolder;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::virtualmesh::{
    FAST_SYNC, Workload, agent_config, handshake, pem_blocks, spiffe_id_of, wait_svid,
};

/// Short rotation settings: SVIDs live 20 s, re-issuance spreads over 3 s, the old root may
/// leave 8 s after activation.
const ROTATION: &str = "holder:\n  heartbeat: 2s\n  svidMaxTtl: 20s\n  nodeSvidTtl: 20s\n  rootRotation:\n    window: 3s\n    retireAfter: 8s\n    ackTimeout: ACK\n    minShare: 50%\n";

/// Two meshes under shared trust with PERMISSIVE federation and the rotation settings.
fn rotation_config(ack_timeout: &str) -> String {
    agent_config(
        "  shared: {}\n  federation: {mode: PERMISSIVE}\n  enforceAccessControl: ENABLED\n",
    )
    .replace(
        "holder:\n  heartbeat: 30s\n",
        &ROTATION.replace("ACK", ack_timeout),
    )
}

/// `meshcert-ca root status -o json`: the shared root's rotation.
fn root_status(ca: &CaHolder) -> serde_json::Value {
    scope_status(ca, None)
}

/// `meshcert-ca root status [--mesh MESH] -o json`.
fn scope_status(ca: &CaHolder, mesh: Option<&str>) -> serde_json::Value {
    let mut args = vec!["root", "status", "-o", "json"];
    if let Some(m) = mesh {
        args.extend(["--mesh", m]);
    }
    let out = ca.ctl(&args).expect("root status runs");
    assert!(
        out.status.success(),
        "root status {mesh:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("root status prints JSON")
}

/// Polls the shared root's rotation status until `done`; panics with the last status after
/// `timeout`.
fn wait_rotation(
    ca: &CaHolder,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_scope(ca, None, what, timeout, done)
}

/// Polls a root's rotation status (the shared root's, or `mesh`'s) until `done`; panics with
/// the last status after `timeout`.
fn wait_scope(
    ca: &CaHolder,
    mesh: Option<&str>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scope_status(ca, mesh);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn phase(s: &serde_json::Value) -> &str {
    s["phase"].as_str().unwrap_or_default()
}

/// `meshcert-ca root rotate`, which must succeed; the next root's fingerprint.
fn rotate(ca: &CaHolder) -> String {
    let out = ca.ctl(&["root", "rotate"]).expect("root rotate runs");
    assert!(
        out.status.success(),
        "root rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = root_status(ca);
    assert_eq!(phase(&s), "PREPARED", "{s:#}");
    s["rotation"]["next"]
        .as_str()
        .expect("next root")
        .to_owned()
}

fn sha256_hex(der: &[u8]) -> String {
    meshcert_ca::authority::fingerprint(der)
}

/// The fingerprints of the roots an admin `meshcert-ca bundle` prints.
fn bundle_fingerprints(ca: &CaHolder) -> Vec<String> {
    let out = ca.ctl(&["bundle"]).expect("bundle runs");
    assert!(out.status.success());
    x509_parser::pem::Pem::iter_from_buffer(&out.stdout)
        .map(|b| sha256_hex(&b.expect("PEM").contents))
        .collect()
}

/// A workload set up from one consistent generation of its folder (`..data` resolved once, so
/// key and certificate belong together, as a workload reading through `..data` sees them).
/// The agent removes a generation right after `..data` names the next one, so a read that
/// finds its generation gone starts again from `..data`, as a careful application does; a
/// file missing while `..data` still names the same generation is an error.
fn workload_at(dir: &Path) -> anyhow::Result<Workload> {
    let mut retired = 0;
    loop {
        let data = std::fs::read_link(dir.join("..data"))?;
        match generation_at(&dir.join(&data)) {
            Err(e) if is_not_found(&e) && retired < 5 => {
                anyhow::ensure!(
                    std::fs::read_link(dir.join("..data"))? != data,
                    "{e} while ..data still names {}",
                    data.display()
                );
                retired += 1;
            }
            other => return other,
        }
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// The workload of one generation folder of an entry.
fn generation_at(data: &Path) -> anyhow::Result<Workload> {
    let chain = pem_blocks(&data.join("svid.pem"), "CERTIFICATE")?;
    let key_pkcs8 = pem_blocks(&data.join("svid.key"), "PRIVATE KEY")?.remove(0);
    let own = spiffe_id_of(&chain[0]).map_err(anyhow::Error::msg)?;
    let mut roots = pem_blocks(&data.join("bundle.pem"), "CERTIFICATE")?;
    let mut domains = vec![own.trust_domain().to_string()];
    if let Ok(files) = std::fs::read_dir(data.join("federated")) {
        for f in files {
            let path = f?.path();
            if let Some(td) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            {
                domains.push(td.to_owned());
                roots.extend(pem_blocks(&path, "CERTIFICATE")?);
            }
        }
    }
    Ok(Workload {
        chain,
        key_pkcs8,
        roots,
        domains,
    })
}

/// A workload as the Workload API serves it (SVID, key, bundle and federated bundles).
async fn workload_from_api(socket: &Path) -> anyhow::Result<Workload> {
    let endpoint = format!("unix://{}", socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
    let svid = client.fetch_x509_svid().await?;
    let bundles = client.fetch_x509_bundles().await?;
    let mut roots = Vec::new();
    let mut domains = vec![svid.spiffe_id().trust_domain().to_string()];
    for (td, b) in bundles.iter() {
        if td.to_string() != domains[0] {
            domains.push(td.to_string());
        }
        roots.extend(b.authorities().iter().map(|c| c.as_bytes().to_vec()));
    }
    Ok(Workload {
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        key_pkcs8: svid.private_key().as_bytes().to_vec(),
        roots,
        domains,
    })
}

/// Handshake failures seen by the sampler, with their reasons.
#[derive(Default)]
struct Samples {
    taken: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

/// Every 100 ms until `stop`: an mTLS handshake between the two nodes' workloads with the files
/// their agents wrote, and one with what their Workload APIs serve.
fn sample(
    a: (std::path::PathBuf, std::path::PathBuf),
    b: (std::path::PathBuf, std::path::PathBuf),
    stop: Arc<AtomicBool>,
    samples: Arc<Samples>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        while !stop.load(Ordering::SeqCst) {
            let tick = Instant::now();
            let files = workload_at(&a.0)
                .and_then(|x| Ok((x, workload_at(&b.0)?)))
                .map_err(|e| format!("reading the files: {e}"))
                .and_then(|(x, y)| handshake(&x, &y).map_err(|e| format!("files: {e}")));
            let api = rt
                .block_on(async {
                    Ok::<_, anyhow::Error>((
                        workload_from_api(&a.1).await?,
                        workload_from_api(&b.1).await?,
                    ))
                })
                .map_err(|e| format!("the Workload API: {e}"))
                .and_then(|(x, y)| handshake(&y, &x).map_err(|e| format!("workload API: {e}")));
            samples.taken.fetch_add(1, Ordering::SeqCst);
            for r in [files, api] {
                if let Err(e) = r {
                    let at = humantime::format_rfc3339_micros(std::time::SystemTime::now());
                    samples
                        .failures
                        .lock()
                        .expect("lock")
                        .push(format!("{at}: {e}"));
                }
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
        }
    })
}

/// Whether `chain` (leaf first) ends in an intermediate issued by the root with this
/// fingerprint (its signature verifies under that root's key).
fn chains_to(chain: &[Vec<u8>], root: &[u8]) -> bool {
    let Some(top) = chain.last() else {
        return false;
    };
    let (Ok((_, top)), Ok((_, root))) = (
        X509Certificate::from_der(top),
        X509Certificate::from_der(root),
    ) else {
        return false;
    };
    top.verify_signature(Some(root.public_key())).is_ok()
}

#[test]
fn mtls_between_two_nodes_never_fails_across_a_whole_root_rotation() {
    let ca = CaHolder::start(&rotation_config("1m")).expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent a");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", FAST_SYNC).expect("agent b");
    let web = wait_svid(&agent_a, "web");
    let api = wait_svid(&agent_b, "api");
    let old = bundle_fingerprints(&ca);
    assert_eq!(old.len(), 1, "one root before the rotation");

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::default());
    let sampler = sample(
        (web.clone(), agent_a.workload_socket()),
        (api.clone(), agent_b.workload_socket()),
        Arc::clone(&stop),
        Arc::clone(&samples),
    );
    let next = rotate(&ca);
    let active = wait_rotation(&ca, "ACTIVE", Duration::from_secs(60), |s| {
        phase(s) == "ACTIVE"
    });
    assert_eq!(
        active["rotation"]["leftBehind"].as_array().map(Vec::len),
        Some(0),
        "every node acknowledged: {active:#}"
    );
    let done = wait_rotation(&ca, "RETIRED", Duration::from_secs(90), |s| {
        phase(s) == "IDLE"
    });
    // A few more samples under the new root alone.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("the sampler ran");

    let failures = samples.failures.lock().expect("lock").clone();
    let taken = samples.taken.load(Ordering::SeqCst);
    assert!(taken > 50, "sampled {taken} times");
    if !failures.is_empty() {
        eprintln!(
            "agent a's log:\n{}\nagent b's log:\n{}",
            agent_a.log(),
            agent_b.log()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {taken} samples failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(done["last"]["phase"], "RETIRED", "{done:#}");
    assert_eq!(done["signingRoot"], next.as_str());
    assert_eq!(
        bundle_fingerprints(&ca),
        vec![next.clone()],
        "only the new root"
    );
    for dir in [&web, &api] {
        let w = workload_at(dir).expect("the folder");
        // bundle.pem and, under PERMISSIVE federation, the other mesh's federated file.
        let roots: Vec<String> = w.roots.iter().map(|r| sha256_hex(r)).collect();
        assert!(
            roots.iter().all(|r| *r == next),
            "{}: only the new root in the bundles: {roots:?}",
            dir.display()
        );
        assert!(
            chains_to(&w.chain, &w.roots[0]),
            "{}: the SVID chains to the new root",
            dir.display()
        );
    }
}

#[test]
fn an_offline_node_holds_activation_back_until_the_timeout_and_is_named() {
    let ca = CaHolder::start(&rotation_config("12s")).expect("holder starts");
    let _agent_a = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent a");
    let mut agent_b = Agent::start(&ca, "node-b", "mesh-b", FAST_SYNC).expect("agent b");
    wait_svid(&agent_b, "api");
    // node-b reported: it counts. Then it goes offline.
    wait_until("node-b reported", Duration::from_secs(30), || {
        ca.status()
            .ok()
            .and_then(|s| serde_json::to_string(&s).ok())
            .is_some_and(|t| t.contains("\"lastReport\""))
    })
    .expect("a report");
    agent_b.kill9();
    rotate(&ca);
    let blocked = wait_rotation(
        &ca,
        "node-b named as pending",
        Duration::from_secs(30),
        |s| {
            s["progress"]["pending"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == "node-b"))
                && s["progress"]["acknowledged"] == 1
        },
    );
    assert_eq!(
        phase(&blocked),
        "PREPARED",
        "held back by node-b: {blocked:#}"
    );
    assert!(
        blocked["progress"]["blockedBy"]
            .as_str()
            .is_some_and(|b| b.contains("node-b") && b.contains("ackTimeout")),
        "{blocked:#}"
    );
    let active = wait_rotation(
        &ca,
        "ACTIVE after the timeout",
        Duration::from_secs(60),
        |s| phase(s) == "ACTIVE",
    );
    assert_eq!(
        active["rotation"]["leftBehind"],
        serde_json::json!(["node-b"]),
        "{active:#}"
    );
    let out = ca.ctl(&["root", "status"]).expect("table");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("left behind at activation: node-b"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn abort_before_active_leaves_the_old_root_and_a_killed_holder_resumes_every_phase() {
    let mut ca = CaHolder::start(&rotation_config("1m")).expect("holder starts");
    let agent = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent");
    wait_svid(&agent, "web");
    let old = bundle_fingerprints(&ca);

    // Abort while PREPARED: the next root leaves, the old one stays and signs.
    let next = rotate(&ca);
    assert!(
        bundle_fingerprints(&ca).contains(&next),
        "PREPARED: in the bundle"
    );
    let out = ca.ctl(&["root", "abort"]).expect("abort runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = root_status(&ca);
    assert_eq!(phase(&s), "IDLE");
    assert_eq!(s["last"]["phase"], "ABORTED");
    assert_eq!(bundle_fingerprints(&ca), old, "the old root alone");
    assert_eq!(s["signingRoot"], old[0].as_str());
    let again = ca.ctl(&["root", "abort"]).expect("abort runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no_rotation"));

    // kill -9 in PREPARED: the same rotation resumes.
    let next = rotate(&ca);
    ca.restart().expect("restart in PREPARED");
    let s = root_status(&ca);
    assert_eq!(s["rotation"]["next"], next.as_str(), "{s:#}");
    // ACTIVE is persisted, then the next root signs from the following second.
    wait_rotation(&ca, "the next root signing", Duration::from_secs(60), |s| {
        phase(s) == "ACTIVE" && s["signingRoot"] == next.as_str()
    });

    // kill -9 in ACTIVE: still ACTIVE, and abort is refused with its code.
    ca.restart().expect("restart in ACTIVE");
    let s = root_status(&ca);
    assert_eq!(phase(&s), "ACTIVE", "{s:#}");
    assert_eq!(s["signingRoot"], next.as_str());
    let refused = ca.ctl(&["root", "abort"]).expect("abort runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("rotation_active"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Retired, then kill -9: the new root stays the root.
    wait_rotation(&ca, "RETIRED", Duration::from_secs(90), |s| {
        phase(s) == "IDLE"
    });
    ca.restart().expect("restart after RETIRED");
    let s = root_status(&ca);
    assert_eq!(phase(&s), "IDLE");
    assert_eq!(s["signingRoot"], next.as_str());
    assert_eq!(bundle_fingerprints(&ca), vec![next.clone()]);
    // The agent, trusting the holder through the synced bundle, still gets SVIDs.
    wait_until(
        "a fresh SVID under the new root",
        Duration::from_secs(60),
        || {
            workload_at(&agent.volume_dir().join("web")).is_ok_and(|w| {
                w.roots.iter().all(|r| sha256_hex(r) == next) && chains_to(&w.chain, &w.roots[0])
            })
        },
    )
    .expect("the agent follows");
}

/// The fingerprints `meshcert-ca bundle --mesh MESH` prints.
fn mesh_bundle(ca: &CaHolder, mesh: &str) -> Vec<String> {
    let out = ca.ctl(&["bundle", "--mesh", mesh]).expect("bundle runs");
    assert!(out.status.success());
    x509_parser::pem::Pem::iter_from_buffer(&out.stdout)
        .map(|b| sha256_hex(&b.expect("PEM").contents))
        .collect()
}

#[test]
fn under_limited_trust_the_shared_root_rotates_and_gateways_follow_it() {
    let config = agent_config("  limited: {}\n  enforceAccessControl: ENABLED\n").replace(
        "holder:\n  heartbeat: 30s\n",
        &ROTATION.replace("ACK", "1m"),
    );
    let ca = CaHolder::start(&config).expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent a");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", FAST_SYNC).expect("agent b");
    let gw_a = agent_a.volume_dir().join("gw-a");
    let gw_b = agent_b.volume_dir().join("gw-b");
    for gw in [&gw_a, &gw_b] {
        agent_a
            .wait_for_file(&gw.join("gateway-svid.pem"))
            .expect("gateway SVIDs");
    }
    let mesh_roots = (mesh_bundle(&ca, "mesh-a"), mesh_bundle(&ca, "mesh-b"));
    let next = rotate(&ca);
    wait_rotation(&ca, "RETIRED", Duration::from_secs(90), |s| {
        phase(s) == "IDLE"
    });
    assert_eq!(
        bundle_fingerprints(&ca),
        vec![next.clone()],
        "the shared root"
    );
    assert_eq!(
        (mesh_bundle(&ca, "mesh-a"), mesh_bundle(&ca, "mesh-b")),
        mesh_roots,
        "each mesh keeps its own root"
    );
    for gw in [&gw_a, &gw_b] {
        wait_until(
            "the gateway under the new shared root",
            Duration::from_secs(30),
            || {
                let data = match std::fs::read_link(gw.join("..data")) {
                    Ok(d) => gw.join(d),
                    Err(_) => return false,
                };
                let (Ok(chain), Ok(roots)) = (
                    pem_blocks(&data.join("gateway-svid.pem"), "CERTIFICATE"),
                    pem_blocks(&data.join("gateway-bundle.pem"), "CERTIFICATE"),
                ) else {
                    return false;
                };
                roots.iter().all(|r| sha256_hex(r) == next) && chains_to(&chain, &roots[0])
            },
        )
        .expect("the gateway follows");
    }
}

#[test]
fn a_builtin_root_starts_its_rotation_at_five_sixths_of_its_life() {
    // A 30-day builtin root: its rotation is due after 25 days.
    let ca = CaHolder::start_with_fake_clock(&rotation_config("1m")).expect("holder starts");
    let s = root_status(&ca);
    assert_eq!(phase(&s), "IDLE", "{s:#}");
    assert!(s["automaticAt"].is_string(), "{s:#}");
    ca.set_clock_offset(24 * 86400).expect("clock");
    // Something that must not happen: watched over one round of the driver (every 5 s).
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        phase(&root_status(&ca)),
        "IDLE",
        "not before 5/6 of its life"
    );
    ca.set_clock_offset(25 * 86400 + 60).expect("clock");
    let s = wait_rotation(&ca, "an automatic rotation", Duration::from_secs(30), |s| {
        phase(s) != "IDLE"
    });
    assert_eq!(s["rotation"]["reason"], "automatic", "{s:#}");
}

/// `meshcert-ca root status --mesh MESH -o json`.
fn mesh_root_status(ca: &CaHolder, mesh: &str) -> serde_json::Value {
    scope_status(ca, Some(mesh))
}

/// Polls a mesh root's rotation status until `done`; panics with the last status after
/// `timeout`.
fn wait_mesh_rotation(
    ca: &CaHolder,
    mesh: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_scope(ca, Some(mesh), what, timeout, done)
}

/// The fingerprints of the roots in a folder's `bundle.pem` (through `..data`).
fn folder_bundle(dir: &Path) -> Vec<String> {
    workload_at(dir)
        .map(|w| w.roots.iter().map(|r| sha256_hex(r)).collect())
        .unwrap_or_default()
}

#[test]
fn under_limited_trust_a_mesh_root_rotates_alone_and_its_nodes_never_lose_mtls() {
    let uid = nix::unistd::geteuid().as_raw();
    // A second node in mesh-a with its own workload, so two mesh-a nodes talk mTLS.
    let config = agent_config("  limited: {}\n  enforceAccessControl: ENABLED\n")
        .replace(
            "holder:\n  heartbeat: 30s\n",
            &ROTATION.replace("ACK", "1m"),
        )
        .replace(
            "entries:\n",
            &format!(
                "entries:\n  - id: db\n    spiffeId: spiffe://mesh-a.test/db\n    nodes: [node-a2]\n    selectors: [\"unix:uid:{uid}\"]\n    dir: db\n"
            ),
        );
    let ca = CaHolder::start(&config).expect("holder starts");
    let agent_a = Agent::start(&ca, "node-a", "mesh-a", FAST_SYNC).expect("agent a");
    let agent_a2 = Agent::start(&ca, "node-a2", "mesh-a", FAST_SYNC).expect("agent a2");
    let agent_b = Agent::start(&ca, "node-b", "mesh-b", FAST_SYNC).expect("agent b");
    let web = wait_svid(&agent_a, "web");
    let db = wait_svid(&agent_a2, "db");
    let api = wait_svid(&agent_b, "api");
    let shared = bundle_fingerprints(&ca);
    let old_a = mesh_bundle(&ca, "mesh-a");
    let old_b = mesh_bundle(&ca, "mesh-b");
    assert_eq!(old_a.len(), 1);
    assert_eq!(folder_bundle(&api), old_b, "mesh-b trusts its own root");

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::default());
    let sampler = sample(
        (web.clone(), agent_a.workload_socket()),
        (db.clone(), agent_a2.workload_socket()),
        Arc::clone(&stop),
        Arc::clone(&samples),
    );
    let out = ca
        .ctl(&["root", "rotate", "--mesh", "mesh-a"])
        .expect("root rotate runs");
    assert!(
        out.status.success(),
        "root rotate --mesh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prepared = mesh_root_status(&ca, "mesh-a");
    assert_eq!(prepared["mesh"], "mesh-a", "{prepared:#}");
    let next = prepared["rotation"]["next"]
        .as_str()
        .expect("next root")
        .to_owned();
    assert!(!shared.contains(&next) && !old_b.contains(&next));
    assert_eq!(
        phase(&root_status(&ca)),
        "IDLE",
        "the shared root does not rotate"
    );
    let active = wait_mesh_rotation(&ca, "mesh-a", "ACTIVE", Duration::from_secs(60), |s| {
        phase(s) == "ACTIVE"
    });
    assert_eq!(
        active["progress"]["expected"], 2,
        "only mesh-a's two nodes gate it: {active:#}"
    );
    assert!(
        !folder_bundle(&api).contains(&next),
        "mesh-b never trusts mesh-a's next root"
    );
    let done = wait_mesh_rotation(&ca, "mesh-a", "RETIRED", Duration::from_secs(90), |s| {
        phase(s) == "IDLE"
    });
    std::thread::sleep(Duration::from_secs(1)); // A few more samples under the new root alone.
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("the sampler ran");

    let failures = samples.failures.lock().expect("lock").clone();
    let taken = samples.taken.load(Ordering::SeqCst);
    assert!(taken > 50, "sampled {taken} times");
    assert!(
        failures.is_empty(),
        "{} of {taken} samples failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(done["last"]["phase"], "RETIRED", "{done:#}");
    assert_eq!(done["signingRoot"], next.as_str());
    assert_eq!(mesh_bundle(&ca, "mesh-a"), vec![next.clone()]);
    assert_eq!(mesh_bundle(&ca, "mesh-b"), old_b, "mesh-b's root untouched");
    assert_eq!(
        bundle_fingerprints(&ca),
        shared,
        "the shared root untouched"
    );
    assert_eq!(root_status(&ca)["meshes"]["mesh-a"], "IDLE");
    for dir in [&web, &db] {
        wait_until(
            "mesh-a's SVIDs under the new root alone",
            Duration::from_secs(30),
            || {
                workload_at(dir).is_ok_and(|w| {
                    w.roots.iter().all(|r| sha256_hex(r) == next)
                        && chains_to(&w.chain, &w.roots[0])
                })
            },
        )
        .expect("mesh-a follows");
    }
    // mesh-b: its bundle never changed, its SVID chains to its own root, and it cannot use
    // mesh-a's new root: a mesh-a SVID under it does not verify with mesh-b's bundle.
    let b = workload_at(&api).expect("api");
    assert_eq!(
        b.roots.iter().map(|r| sha256_hex(r)).collect::<Vec<_>>(),
        old_b
    );
    assert!(chains_to(&b.chain, &b.roots[0]));
    let mut a = workload_at(&web).expect("web");
    a.domains = vec!["mesh-a.test".into(), "mesh-b.test".into()];
    let mut b = b;
    b.domains = a.domains.clone();
    let err = handshake(&a, &b).expect_err("mesh-b must not accept mesh-a's new root");
    assert!(
        err.contains("UnknownIssuer"),
        "the chain is what fails: {err}"
    );
}

/// Joins `node` to `mesh` with a join token, without an agent: its mTLS identity.
fn join_bare(ca: &CaHolder, node: &str, mesh: &str) -> meshcert_tests::ca::ClientIdentity {
    let key = meshcert_tests::pki::p256();
    let req = meshcert_protocol::api::AttestRequest {
        token: ca.token(node, mesh).expect("token"),
        csr: meshcert_tests::pki::csr(&key, &[]),
    };
    let a = ca
        .https(
            "POST",
            "/v1/attest",
            Some(&serde_json::to_vec(&req).expect("json")),
            None,
        )
        .expect("attest");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: meshcert_protocol::api::NodeSvidResponse =
        serde_json::from_slice(&a.body).expect("node SVID");
    meshcert_tests::ca::ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    }
}

/// The serial of a node identity's leaf, lowercase hex as reports carry it.
fn serial_of(node: &meshcert_tests::ca::ClientIdentity) -> (String, u64, u64) {
    let (_, c) = X509Certificate::from_der(&node.chain[0]).expect("leaf");
    let serial: String = c
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    let t = |x: i64| u64::try_from(x).unwrap_or(0);
    (
        serial,
        t(c.validity().not_before.timestamp()),
        t(c.validity().not_after.timestamp()),
    )
}

/// Reports a node holding `version` and no workload SVID, only its node SVID.
fn report_node_svid(ca: &CaHolder, node: &meshcert_tests::ca::ClientIdentity, version: u64) {
    let (serial, not_before, not_after) = serial_of(node);
    let report = meshcert_protocol::NodeReport {
        bundle_version: version,
        enforcement: None,
        identities: Vec::new().into(),
        node_svid: Some(meshcert_protocol::NodeSvidReport {
            serial: serial.into(),
            not_before,
            not_after,
        }),
    };
    let a = ca
        .https(
            "POST",
            "/v1/report",
            Some(&serde_json::to_vec(&report).expect("json")),
            Some(node),
        )
        .expect("report");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
}

#[test]
fn retirement_waits_for_a_node_svid_still_chaining_to_the_previous_root() {
    // The node SVID outlives the test; the previous root may leave 8 s after activation.
    let config = rotation_config("1m").replace("nodeSvidTtl: 20s", "nodeSvidTtl: 10m");
    let ca = CaHolder::start(&config).expect("holder starts");
    // Under shared trust a mesh has no root of its own to rotate.
    for mesh in ["mesh-a", "no-such-mesh"] {
        let out = ca
            .ctl(&["root", "rotate", "--mesh", mesh])
            .expect("root rotate runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("not_found"), "{err}");
    }
    let node = join_bare(&ca, "bare", "mesh-a");
    report_node_svid(&ca, &node, 1);
    let next = rotate(&ca);
    let version = root_status(&ca)["rotation"]["preparedVersion"]
        .as_u64()
        .expect("the prepared bundle version");
    report_node_svid(&ca, &node, version);
    wait_rotation(&ca, "ACTIVE", Duration::from_secs(60), |s| {
        phase(s) == "ACTIVE"
    });
    // Past retireAfter, the node SVID is the only thing holding retirement back.
    let held = wait_rotation(
        &ca,
        "retirement held by the node SVID alone",
        Duration::from_secs(60),
        |s| {
            report_node_svid(&ca, &node, version);
            s["progress"]["blockedBy"].as_str().is_some_and(|b| {
                b.contains("previous root (on bare)") && !b.contains("longest TTL")
            })
        },
    );
    assert_eq!(phase(&held), "ACTIVE", "{held:#}");
    assert_eq!(
        held["progress"]["svids"], 1,
        "the node SVID counts: {held:#}"
    );

    // Renewed under the next root and reported: the previous root retires.
    let key = meshcert_tests::pki::p256();
    let req = meshcert_protocol::api::RenewRequest {
        csr: meshcert_tests::pki::csr(&key, &[]),
    };
    let a = ca
        .https(
            "POST",
            "/v1/node/renew",
            Some(&serde_json::to_vec(&req).expect("json")),
            Some(&node),
        )
        .expect("renew");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: meshcert_protocol::api::NodeSvidResponse =
        serde_json::from_slice(&a.body).expect("node SVID");
    let renewed = meshcert_tests::ca::ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    };
    report_node_svid(&ca, &renewed, version);
    let done = wait_rotation(&ca, "RETIRED", Duration::from_secs(30), |s| {
        phase(s) == "IDLE"
    });
    assert_eq!(done["last"]["phase"], "RETIRED", "{done:#}");
    assert_eq!(done["signingRoot"], next.as_str());
}

#[test]
fn under_limited_trust_builtin_mesh_roots_start_their_rotations_on_their_own() {
    let config = agent_config("  limited: {}\n  enforceAccessControl: ENABLED\n").replace(
        "holder:\n  heartbeat: 30s\n",
        &ROTATION.replace("ACK", "1m"),
    );
    let mut ca = CaHolder::start_with_fake_clock(&config).expect("holder starts");
    let s = mesh_root_status(&ca, "mesh-b");
    assert_eq!(phase(&s), "IDLE", "{s:#}");
    assert!(s["automaticAt"].is_string(), "{s:#}");
    ca.set_clock_offset(25 * 86400 + 60).expect("clock");
    for mesh in ["mesh-a", "mesh-b"] {
        let s = wait_mesh_rotation(
            &ca,
            mesh,
            "an automatic rotation",
            Duration::from_secs(60),
            |s| phase(s) != "IDLE",
        );
        assert_eq!(s["rotation"]["reason"], "automatic", "{s:#}");
    }
    let shared = root_status(&ca);
    assert_ne!(shared["meshes"]["mesh-a"], "IDLE", "{shared:#}");
    // kill -9 mid-rotation: the restarted holder resumes mesh-a's own rotation to its end.
    let next = mesh_root_status(&ca, "mesh-a")["rotation"]["next"]
        .as_str()
        .expect("next")
        .to_owned();
    ca.restart().expect("restart");
    let done = wait_mesh_rotation(&ca, "mesh-a", "RETIRED", Duration::from_secs(60), |s| {
        phase(s) == "IDLE"
    });
    assert_eq!(done["last"]["phase"], "RETIRED", "{done:#}");
    assert_eq!(done["signingRoot"], next.as_str(), "{done:#}");
    assert_eq!(mesh_bundle(&ca, "mesh-a"), vec![next]);
}
