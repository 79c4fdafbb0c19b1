//! The node agent end to end: a real `meshcert-ca` holder, real `meshcert-agent` processes,
//! real files in temporary folders. What is checked is what an operator would check: modes and
//! owners, `openssl verify`, key/certificate pairs read the way an application reads them.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshcert_protocol::api::{CsrRequest, Der, SignRequest};
use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, ClientIdentity, EXAMPLE_CONFIG};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use x509_parser::prelude::*;

const NODE: &str = "node-1";
const MESH: &str = "mesh-a";

/// The files' owner the entry asks for: uid/gid 1000 when the tests run as root (so the chown
/// is real), the test's own ids otherwise.
fn owner() -> (u32, u32) {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if uid == 0 { (1000, 1000) } else { (uid, gid) }
}

/// The example holder config with `web`'s TTL set to `web_ttl`, `web` owned by [`owner`], and
/// `extra_entries` (YAML list items) appended.
fn holder_config(web_ttl: &str, extra_entries: &str) -> String {
    let (uid, gid) = owner();
    let mut text = EXAMPLE_CONFIG.replace(
        "    ttl: 1h\n    dir: web\n",
        &format!("    ttl: {web_ttl}\n    dir: web\n    owner: \"{uid}:{gid}\"\n"),
    );
    assert!(
        text.contains(&format!("ttl: {web_ttl}")),
        "the example config changed shape"
    );
    text.push_str(extra_entries);
    text
}

fn entry_yaml(id: &str, node: &str, ttl: &str) -> String {
    format!(
        "  - id: {id}\n    spiffeId: spiffe://mesh-a.test/{id}\n    nodes: [{node}]\n    ttl: {ttl}\n    dir: {id}\n"
    )
}

/// One key/certificate pair as an application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pair {
    serial: String,
    spiffe_id: String,
    not_after: i64,
    chain: Vec<Vec<u8>>,
}

fn certs_of(pem_bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem_bytes) {
        let block = block?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

/// Checks that `key_pem` is the key of the first certificate of `chain_pem`.
fn pair_of(chain_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Pair> {
    let chain = certs_of(chain_pem)?;
    let leaf_der = chain
        .first()
        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der)?;
    let key = rcgen::KeyPair::from_pem(std::str::from_utf8(key_pem)?)?;
    anyhow::ensure!(
        key.public_key_raw() == leaf.public_key().subject_public_key.data.as_ref(),
        "the key does not match the certificate (serial {})",
        leaf.raw_serial_as_string()
    );
    let spiffe_id = meshcert_tests::oracle::uri_sans(&leaf)?
        .into_iter()
        .next()
        .unwrap_or_default();
    Ok(Pair {
        serial: leaf.raw_serial_as_string(),
        spiffe_id,
        not_after: leaf.validity().not_after.timestamp(),
        chain,
    })
}

/// Opens `..data` once and reads `svid.pem` and `svid.key` through that one folder, the way a
/// careful application does. `Ok(None)` when a rotation removed the folder in between.
fn read_pair(entry: &Path) -> anyhow::Result<Option<Pair>> {
    let dir = match File::open(entry.join("..data")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let read = |name: &str| -> anyhow::Result<Option<Vec<u8>>> {
        match openat(
            &dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let mut bytes = Vec::new();
                File::from(fd).read_to_end(&mut bytes)?;
                Ok(Some(bytes))
            }
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let (Some(cert), Some(key)) = (read("svid.pem")?, read("svid.key")?) else {
        return Ok(None);
    };
    pair_of(&cert, &key).map(Some)
}

/// Reads the combined `svid-bundle.pem` (key first, then the chain) with one open.
fn read_combined(entry: &Path) -> anyhow::Result<Option<Pair>> {
    let bytes = match std::fs::read(entry.join("svid-bundle.pem")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    anyhow::ensure!(
        bytes.starts_with(b"-----BEGIN PRIVATE KEY-----"),
        "svid-bundle.pem does not start with the key"
    );
    pair_of(&bytes, &bytes).map(Some)
}

/// One reading of `entry` while rotations run, judged strictly: `..data` is resolved once
/// (its target read), then `svid.pem` and `svid.key` (or, when `combined`, the visible
/// `svid-bundle.pem`) are read. `Ok(None)` only when a rotation retired the folder during the
/// read (`..data` names another folder afterwards); `..data` missing, or a file missing while
/// `..data` still names the same folder, is an error: a swap that is not atomic fails here.
fn read_during_rotations(entry: &Path, combined: bool) -> anyhow::Result<Option<Pair>> {
    let data_link = entry.join("..data");
    let resolve = || {
        std::fs::read_link(&data_link).map_err(|e| anyhow::anyhow!("{}: {e}", data_link.display()))
    };
    let data = resolve()?;
    let read = |path: std::path::PathBuf| match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let got = if combined {
        read(entry.join("svid-bundle.pem"))?.map(|b| (b.clone(), b))
    } else {
        let folder = entry.join(&data);
        match (
            read(folder.join("svid.pem"))?,
            read(folder.join("svid.key"))?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        }
    };
    match got {
        Some((cert, key)) => pair_of(&cert, &key).map(Some),
        None if resolve()? != data => Ok(None),
        None => anyhow::bail!(
            "a file is missing while ..data still names {} (combined: {combined})",
            data.display()
        ),
    }
}

fn wait_pair(
    agent: &Agent,
    entry: &Path,
    what: &str,
    f: impl Fn(&Pair) -> bool,
) -> anyhow::Result<Pair> {
    let mut found = None;
    wait_until(what, WAIT, || match read_pair(entry) {
        Ok(Some(p)) if f(&p) => {
            found = Some(p);
            true
        }
        _ => false,
    })
    .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", agent.log()))?;
    Ok(found.expect("set when the wait succeeded"))
}

fn now_unix() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
    )
    .expect("fits")
}

fn write_pem(path: &Path, certs: &[Vec<u8>]) {
    let mut text = String::new();
    for c in certs {
        text.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64_encode(c);
        for line in b64.as_bytes().chunks(64) {
            text.push_str(std::str::from_utf8(line).expect("ascii"));
            text.push('\n');
        }
        text.push_str("-----END CERTIFICATE-----\n");
    }
    std::fs::write(path, text).expect("write pem");
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `openssl verify -CAfile <root> [-untrusted <intermediates>] <leaf>` for a chain, leaf first.
fn openssl_verify(chain: &[Vec<u8>], root: &Path) -> std::process::Output {
    let tmp = tempfile::tempdir().expect("tempdir");
    let leaf = tmp.path().join("leaf.pem");
    write_pem(&leaf, &chain[..1]);
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(root);
    if chain.len() > 1 {
        let untrusted = tmp.path().join("intermediates.pem");
        write_pem(&untrusted, &chain[1..]);
        cmd.arg("-untrusted").arg(&untrusted);
    }
    meshcert_tests::output_within(cmd.arg(&leaf), meshcert_tests::COMMAND_TIMEOUT)
        .expect("openssl runs")
}

/// The environment of process `pid`, one `NAME=value` per item.
fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// `run` starts its program again in place (same process id) with the allocator's tunables,
/// and works as before; an operator's own `GLIBC_TUNABLES` is kept as given.
#[test]
fn run_restarts_in_place_with_the_allocator_tunables_unless_the_operator_set_them() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let pid = agent.pid().expect("running");
    let env = environ(pid);
    let tunables: Vec<&String> = env
        .iter()
        .filter(|v| v.starts_with("GLIBC_TUNABLES="))
        .collect();
    assert_eq!(tunables, ["GLIBC_TUNABLES=glibc.malloc.tcache_count=0"]);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("run\0--config"),
        "the same arguments: {cmdline:?}"
    );
    wait_pair(&agent, &agent.volume_dir().join("web"), "issued", |_| true).expect("issued");

    let token = ca.token("node-2", MESH).expect("token");
    let mut own = Agent::spawn_with_env(
        &ca,
        "node-2",
        MESH,
        "",
        Some(&token),
        &[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")],
    )
    .expect("agent");
    own.wait_joined().expect("joined");
    let env = environ(own.pid().expect("running"));
    let tunables: Vec<&String> = env
        .iter()
        .filter(|v| v.starts_with("GLIBC_TUNABLES="))
        .collect();
    assert_eq!(tunables, ["GLIBC_TUNABLES=glibc.malloc.arena_max=2"]);
}

/// The exact modes and owners of an entry folder: files the entry owner's (keys 0440,
/// certificates and bundles 0444), folders the agent's (data folders 0555, the entry folder
/// and the volume 0755), whatever the agent's umask.
fn assert_modes(agent: &Agent, entry: &Path) {
    // Without root the files stay the test's own and the owner checks prove nothing.
    assert!(
        nix::unistd::geteuid().is_root(),
        "owner checks chown to uid 1000 and must run as root"
    );
    let (uid, gid) = owner();
    let agent_uid = nix::unistd::geteuid().as_raw();
    let mut expected = vec![
        ("svid.pem".to_owned(), 0o444, uid),
        ("svid.key".to_owned(), 0o440, uid),
        ("bundle.pem".to_owned(), 0o444, uid),
        ("svid-bundle.pem".to_owned(), 0o440, uid),
        ("..data".to_owned(), 0o555, agent_uid),
        ("federated".to_owned(), 0o555, agent_uid),
        (".".to_owned(), 0o755, agent_uid),
    ];
    for federated in std::fs::read_dir(entry.join("federated")).expect("federated") {
        let name = federated.expect("entry").file_name();
        expected.push((format!("federated/{}", name.to_string_lossy()), 0o444, uid));
    }
    for (name, mode, owner_uid) in expected {
        let meta = std::fs::metadata(entry.join(&name)).expect(&name);
        assert_eq!(meta.mode() & 0o7777, mode, "mode of {name}");
        assert_eq!(meta.uid(), owner_uid, "owner of {name}");
        if owner_uid == uid {
            assert_eq!(meta.gid(), gid, "group of {name}");
        }
    }
    let root = std::fs::metadata(agent.volume_dir()).expect("volume");
    assert_eq!(root.mode() & 0o7777, 0o755, "mode of the volume");
}

#[test]
fn first_issuance_writes_a_verifiable_svid_with_the_right_modes_and_owner() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    agent.wait_for_file(&web.join("svid.pem")).expect("issued");
    let pair = wait_pair(&agent, &web, "a readable pair", |_| true).expect("pair");
    assert_eq!(pair.spiffe_id, "spiffe://mesh-a.test/web");
    assert!(pair.not_after > now_unix());

    assert_modes(&agent, &web);
    for name in [
        "svid.pem",
        "svid.key",
        "bundle.pem",
        "svid-bundle.pem",
        "federated",
    ] {
        let link = std::fs::read_link(web.join(name)).expect("a symlink");
        assert_eq!(link, Path::new("..data").join(name));
    }

    // openssl accepts the chain against bundle.pem, intermediates given as untrusted.
    let out = openssl_verify(&pair.chain, &web.join("bundle.pem"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": OK"),
        "openssl verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let combined = read_combined(&web).expect("combined").expect("present");
    assert_eq!(combined.serial, pair.serial);
}

#[test]
fn rotation_replaces_files_atomically() {
    const ROTATIONS: usize = 200;
    let ca = CaHolder::start(&holder_config("3s", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    agent.wait_for_file(&web.join("svid.pem")).expect("issued");

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [false, true]
        .into_iter()
        .map(|combined| {
            let web = web.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut serials = BTreeSet::new();
                let mut failures = Vec::new();
                let (mut reads, mut retired) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match read_during_rotations(&web, combined) {
                        Ok(Some(p)) => {
                            reads += 1;
                            serials.insert(p.serial);
                        }
                        Ok(None) => retired += 1,
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                (combined, serials, failures, reads, retired)
            })
        })
        .collect();

    // Count rotations by the serials the agent installs (the reader sees most of them).
    let mut seen = BTreeSet::new();
    let counted = wait_until("200 rotations", Duration::from_secs(300), || {
        if let Ok(Some(p)) = read_pair(&web) {
            seen.insert(p.serial);
        }
        seen.len() > ROTATIONS
    });
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let (combined, serials, failures, reads, retired) = reader.join().expect("reader thread");
        eprintln!(
            "reader (combined: {combined}): {reads} readings, {} serials, {retired} folders retired mid-read, {} failures",
            serials.len(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "torn, mismatched or missing reads (combined: {combined}): {} of them, first {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        // A reader spinning through the rotations sees most of them.
        assert!(
            serials.len() > ROTATIONS / 2,
            "the reader (combined: {combined}) saw only {} serials in {reads} readings",
            serials.len()
        );
    }
    counted.unwrap_or_else(|e| panic!("{e}; agent log tail:\n{}", tail(&agent.log())));
    // Old data folders do not pile up.
    let data_folders = std::fs::read_dir(&web)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("..")
                && n != "..data"
                && e.file_type().map(|t| t.is_dir()).unwrap_or(false)
        })
        .count();
    assert!(data_folders <= 2, "{data_folders} data folders left");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn ca_outage_keeps_serving_until_expiry_and_recovers() {
    // 20 s SVIDs (the holder backdates 10 s): due about 5 s after issue.
    let mut ca = CaHolder::start(&holder_config("20s", "")).expect("holder");
    let agent = Agent::start(
        &ca,
        NODE,
        MESH,
        "syncInterval: 2s\nrotation: {backoffInitial: 200ms, backoffMax: 2s}\n",
    )
    .expect("agent");
    let web = agent.volume_dir().join("web");
    let first = wait_pair(&agent, &web, "first SVID", |_| true).expect("issued");

    ca.kill9();
    // The rotation comes due while the holder is down: the agent waits for it (no backoff).
    wait_until("a rotation due during the outage", WAIT, || {
        agent.status_json().is_ok_and(|s| {
            s["caUnreachableSince"].is_u64()
                && s["identities"][0]["nextRotation"]
                    .as_u64()
                    .is_some_and(|t| i64::try_from(t).is_ok_and(|t| t < now_unix()))
        })
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    // Still served: the same valid pair is on disk.
    let during = read_pair(&web).expect("readable").expect("still there");
    assert_eq!(during.serial, first.serial);
    assert!(
        during.not_after > now_unix(),
        "the served SVID is still valid"
    );

    ca.restart().expect("holder back");
    let after = wait_pair(&agent, &web, "a new SVID after the outage", |p| {
        p.serial != first.serial
    })
    .expect("recovered");
    assert!(after.not_after > first.not_after);
}

#[test]
fn kill_9_at_random_moments_leaves_a_valid_pair_and_restart_does_not_reissue() {
    let ca =
        CaHolder::start(&holder_config("1h", &entry_yaml("fast", NODE, "3s"))).expect("holder");
    let mut agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    let fast = agent.volume_dir().join("fast");
    let long = wait_pair(&agent, &web, "web issued", |_| true).expect("web");
    wait_pair(&agent, &fast, "fast issued", |_| true).expect("fast");

    for round in 0..8 {
        // A random moment to kill at: the sleep is the point, not a wait for an effect.
        std::thread::sleep(Duration::from_millis(fastrand_ms(round)));
        agent.kill9();
        for entry in [&web, &fast] {
            let pair = read_pair(entry)
                .unwrap_or_else(|e| panic!("round {round}: {} is torn: {e}", entry.display()))
                .unwrap_or_else(|| panic!("round {round}: {} has no pair", entry.display()));
            assert!(!pair.chain.is_empty());
        }
        agent.restart().expect("restart");
    }
    // The restarted agent works (fast keeps rotating) and never re-issued web, which is not due.
    let before = read_pair(&fast).expect("fast").expect("present");
    wait_pair(&agent, &fast, "fast rotates after the restarts", |p| {
        p.serial != before.serial
    })
    .expect("rotating");
    let now = read_pair(&web).expect("web").expect("present");
    assert_eq!(
        now.serial, long.serial,
        "web was re-issued although not due"
    );
}

/// A pseudo-random pause (50..650 ms) without a random crate: kills land at varied moments.
fn fastrand_ms(round: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    50 + (nanos ^ round.wrapping_mul(7919)) % 600
}

#[test]
fn tampered_and_deleted_files_are_restored() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    let original = wait_pair(&agent, &web, "issued", |_| true).expect("issued");
    // `..data` is swapped before the visible names are made: svid.pem comes last.
    agent.wait_for_file(&web.join("svid.pem")).expect("visible");

    std::fs::remove_file(web.join("svid.pem")).expect("delete the link");
    agent
        .wait_for_file(&web.join("svid.pem"))
        .expect("link restored");

    std::fs::write(web.join("svid.key"), "not a key").expect("tamper");
    let restored = wait_pair(&agent, &web, "key restored", |_| true).expect("restored");
    assert_eq!(restored.serial, original.serial);

    std::fs::remove_file(web.join("..data")).expect("delete ..data");
    wait_pair(&agent, &web, "..data restored", |_| true).expect("restored");

    // Moved out of the volume in one step (what `rm -rf` ends with), then deleted.
    let aside = agent.volume_dir().with_file_name("web-deleted");
    std::fs::rename(&web, &aside).expect("move the folder away");
    remove_all(&aside);
    agent
        .wait_for_file(&web.join("svid.pem"))
        .expect("folder restored");
    let back = wait_pair(&agent, &web, "folder restored", |_| true).expect("restored");
    assert_eq!(
        back.serial, original.serial,
        "restored from memory, not re-issued"
    );

    // The whole volume folder goes: it comes back, and later tampering is still noticed.
    let volume_aside = agent.volume_dir().with_file_name("svids-deleted");
    std::fs::rename(agent.volume_dir(), &volume_aside).expect("move the volume away");
    remove_all(&volume_aside);
    agent
        .wait_for_file(&web.join("svid.pem"))
        .expect("volume restored");
    std::fs::remove_file(web.join("bundle.pem")).expect("delete the link");
    agent
        .wait_for_file(&web.join("bundle.pem"))
        .expect("link restored");
    let last = wait_pair(&agent, &web, "volume restored", |_| true).expect("restored");
    assert_eq!(last.serial, original.serial);
}

/// `rm -rf` of a folder with read-only (0550) subfolders.
fn remove_all(path: &Path) {
    let _ = meshcert_tests::output_within(
        Command::new("chmod").arg("-R").arg("u+w").arg(path),
        meshcert_tests::COMMAND_TIMEOUT,
    );
    std::fs::remove_dir_all(path).expect("remove");
}

#[test]
fn a_replayed_join_token_is_refused() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let token = ca.token(NODE, MESH).expect("token");
    let mut first = Agent::spawn(&ca, NODE, MESH, "", Some(&token)).expect("spawn");
    first.wait_joined().expect("the first use joins");
    let mut replay = Agent::spawn(&ca, NODE, MESH, "", Some(&token)).expect("spawn");
    let status = replay.wait_exit(WAIT).expect("the replay gives up");
    assert_eq!(status.code(), Some(1), "log:\n{}", replay.log());
    // Refused for its reason: the stable code of a used token.
    assert!(
        replay
            .log()
            .contains("token_used: the join token was already used"),
        "log:\n{}",
        replay.log()
    );
    assert!(!replay.state_dir().join("node.pem").exists());
}

#[test]
fn a_node_cannot_obtain_another_nodes_entry() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, "node-2", MESH, "").expect("agent");
    agent
        .wait_for_event("meshcert_agent::rotator", "ready")
        .expect("node-2 ready");
    assert!(
        !agent.volume_dir().join("web").exists(),
        "node-2 got node-1's entry"
    );

    // Asking directly with node-2's own identity is refused too.
    let key_pem = std::fs::read_to_string(agent.state_dir().join("node.key")).expect("node key");
    let node_key = rcgen::KeyPair::from_pem(&key_pem).expect("pkcs8");
    let chain =
        certs_of(&std::fs::read(agent.state_dir().join("node.pem")).expect("pem")).expect("chain");
    let identity = ClientIdentity {
        chain,
        key_pkcs8: node_key.serialize_der(),
    };
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://mesh-a.test/web".try_into().expect("uri"),
    )];
    let csr = params.serialize_request(&key).expect("csr");
    let body = serde_json::to_vec(&SignRequest {
        csrs: vec![CsrRequest {
            entry_id: "web".into(),
            csr: Der(csr.der().to_vec()),
            local: None,
        }],
    })
    .expect("json");
    let answer = ca
        .https("POST", "/v1/sign", Some(&body), Some(&identity))
        .expect("answer");
    let json = answer.json().expect("json");
    let result = &json["results"][0];
    assert_eq!(result["status"], "refused", "{json}");
    assert_eq!(result["error"]["code"], "not_assigned", "{json}");
}

#[test]
fn sigterm_exits_0_and_an_invalid_config_exits_78() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let mut agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    agent
        .wait_for_file(&agent.volume_dir().join("web/svid.pem"))
        .expect("issued");
    // The probes Kubernetes runs.
    for (check, want) in [("healthz", Some(0)), ("readyz", Some(0))] {
        let out = meshcert_tests::output_within(
            Command::new(meshcert_tests::bin_path("meshcert-agent"))
                .args(["status", "--check", check, "--admin-socket"])
                .arg(agent.admin_socket()),
            meshcert_tests::COMMAND_TIMEOUT,
        )
        .expect("runs");
        assert_eq!(out.status.code(), want, "{check}: {out:?}");
    }
    let status = agent.terminate().expect("stops");
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());

    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("agent.yaml");
    std::fs::write(&bad, "caAddress: nope\nrotation: {fraction: 2}\n").expect("write");
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-agent"))
            .args(["run", "--config"])
            .arg(&bad),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in ["caAddress", "trustBundle", "mesh", "rotation.fraction"] {
        assert!(
            stderr.contains(problem),
            "{problem} not listed in:\n{stderr}"
        );
    }
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-agent")).args(["run", "--no-such-flag"]),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn node_svid_renews_and_an_expired_one_asks_to_rejoin() {
    // 3 s node SVIDs (backdated 10 s by the holder): renewed over and over while running.
    let config = holder_config("1h", "").replace(
        "  heartbeat: 30s\n",
        "  heartbeat: 30s\n  nodeSvidTtl: 3s\n",
    );
    assert!(
        config.contains("nodeSvidTtl"),
        "the example config changed shape"
    );
    let ca = CaHolder::start(&config).expect("holder");
    let mut agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let node_pem = agent.state_dir().join("node.pem");
    let serial = |path: &Path| -> String {
        let certs = certs_of(&std::fs::read(path).unwrap_or_default()).unwrap_or_default();
        certs
            .first()
            .and_then(|c| {
                X509Certificate::from_der(c)
                    .ok()
                    .map(|(_, c)| c.raw_serial_as_string())
            })
            .unwrap_or_default()
    };
    let first = serial(&node_pem);
    wait_until("a renewed node SVID", WAIT, || {
        let now = serial(&node_pem);
        !now.is_empty() && now != first
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    agent.kill9();
    let not_after = {
        let certs = certs_of(&std::fs::read(&node_pem).expect("node.pem")).expect("pem");
        let (_, leaf) = X509Certificate::from_der(&certs[0]).expect("der");
        leaf.validity().not_after.timestamp()
    };
    wait_until("the node SVID to expire", WAIT, || {
        now_unix() > not_after + 1
    })
    .expect("expiry");
    agent.relaunch(None).expect("relaunch");
    let status = agent.wait_exit(WAIT).expect("refuses to start");
    assert_eq!(status.code(), Some(1));
    let log = agent.log();
    assert!(
        log.contains("expired") && log.contains("re-join") && log.contains("--join-token"),
        "the error does not say what happened and what to do:\n{}",
        tail(&log)
    );

    let token = ca.token(NODE, MESH).expect("token");
    agent.relaunch(Some(&token)).expect("relaunch");
    wait_until("a new node SVID", WAIT, || {
        serial(&node_pem) != first && {
            let certs = certs_of(&std::fs::read(&node_pem).unwrap_or_default()).unwrap_or_default();
            certs
                .first()
                .and_then(|c| {
                    X509Certificate::from_der(c)
                        .ok()
                        .map(|(_, c)| c.validity().not_after.timestamp() > now_unix())
                })
                .unwrap_or(false)
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    // Ready again, serving the entry.
    wait_until("ready after the re-join", WAIT, || {
        let log = agent.log();
        log.split_once("re-joining with the given token")
            .is_some_and(|(_, after)| {
                meshcert_tests::log_has_event(after, "meshcert_agent", "ready")
            })
    })
    .unwrap_or_else(|e| {
        let log = agent.log();
        let quiet: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("node SVID renewed"))
            .collect();
        panic!("{e}; log without renewals:\n{}", tail(&quiet.join("\n")))
    });
    assert!(
        read_pair(&agent.volume_dir().join("web"))
            .expect("pair")
            .is_some()
    );
}

#[test]
fn a_bad_reload_is_logged_and_the_running_config_stays() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    let before = wait_pair(&agent, &web, "issued", |_| true).expect("issued");

    // A broken edit of the config file: noticed, refused, service goes on.
    let config = agent.config_path();
    let good = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{good}rotation: {{fraction: 3}}\n")).expect("write");
    wait_until("the refused reload in the log", WAIT, || {
        meshcert_tests::log_has_event(
            &agent.log(),
            "meshcert_agent",
            "the new configuration is invalid; keeping the running one",
        )
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    assert!(
        agent.log().contains("rotation.fraction"),
        "the problem is named"
    );

    // SIGHUP with the good file back: reloaded.
    std::fs::write(&config, &good).expect("write");
    agent
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    wait_until("a reload", WAIT, || {
        meshcert_tests::log_has_event(&agent.log(), "meshcert_agent", "configuration reloaded")
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let mut agent = agent;
    assert!(agent.try_exit().expect("status").is_none(), "still running");
    let after = read_pair(&web).expect("pair").expect("present");
    assert_eq!(after.serial, before.serial);
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let token = ca.token(NODE, MESH).expect("token");
    let notify = path.display().to_string();
    let mut agent = Agent::spawn_with_env(
        &ca,
        NODE,
        MESH,
        "",
        Some(&token),
        &[("NOTIFY_SOCKET", notify.as_str())],
    )
    .expect("agent");
    let mut messages = Vec::new();
    let until_message = |what: &str, messages: &mut Vec<String>| {
        wait_until(what, WAIT, || {
            let mut buf = [0u8; 4096];
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            messages.iter().any(|m| m.contains(what))
        })
        .unwrap_or_else(|e| panic!("{e}; messages {messages:?}"));
    };
    until_message("READY=1", &mut messages);
    let ready = messages
        .iter()
        .find(|m| m.contains("READY=1"))
        .expect("ready");
    assert!(ready.contains("STATUS=1/1 SVIDs issued"), "{ready}");
    // READY means a valid SVID is on disk.
    assert!(
        read_pair(&agent.volume_dir().join("web"))
            .expect("pair")
            .is_some()
    );

    messages.clear();
    agent
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    until_message("RELOADING=1", &mut messages);
    let reloading = messages
        .iter()
        .find(|m| m.contains("RELOADING=1"))
        .expect("reloading");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    until_message("READY=1", &mut messages);

    agent
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    until_message("STOPPING=1", &mut messages);
    assert_eq!(agent.wait_exit(WAIT).expect("exits").code(), Some(0));
}

/// Agent config lines declaring the local entry `local-debug`, in node-1's own namespace (the
/// holder's default `holder.localEntryPrefixes`).
const LOCAL_ENTRY: &str = "entries:\n  - id: local-debug\n    spiffeId: spiffe://mesh-a.test/node/node-1/debug\n    dir: debug\n    ttl: 1h\n";

#[test]
fn local_entries_are_issued_only_when_enforcement_is_disabled() {
    // DISABLED: the agent's own entry inside its trust domain is issued next to the holder's.
    let disabled = holder_config("1h", "").replace(
        "enforceAccessControl: ENABLED",
        "enforceAccessControl: DISABLED",
    );
    assert!(
        disabled.contains("DISABLED"),
        "the example config changed shape"
    );
    let ca = CaHolder::start(&disabled).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, LOCAL_ENTRY).expect("agent");
    let debug = agent.volume_dir().join("debug");
    let pair = wait_pair(&agent, &debug, "the local entry issued", |_| true).expect("issued");
    assert_eq!(pair.spiffe_id, "spiffe://mesh-a.test/node/node-1/debug");
    wait_pair(
        &agent,
        &agent.volume_dir().join("web"),
        "web issued",
        |_| true,
    )
    .expect("web");
    drop(agent);
    drop(ca);

    // ENABLED: the same config gets the holder's entry only.
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, LOCAL_ENTRY).expect("agent");
    agent
        .wait_for_event("meshcert_agent::rotator", "ready")
        .expect("ready");
    assert!(agent.volume_dir().join("web/svid.pem").exists());
    assert!(!agent.volume_dir().join("debug").exists());
}

#[test]
fn rotation_hooks_run_and_a_failing_hook_does_not_block_rotation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let marker = tmp.path().join("rotated");
    let hooked = format!(
        "  - id: hooked\n    spiffeId: spiffe://mesh-a.test/hooked\n    nodes: [{NODE}]\n    ttl: 3s\n    dir: hooked\n"
    );
    let failing = format!(
        "  - id: failing\n    spiffeId: spiffe://mesh-a.test/failing\n    nodes: [{NODE}]\n    ttl: 3s\n    dir: failing\n"
    );
    // Hooks are the node's configuration: by folder and by entry id.
    let hooks = format!(
        "hooks:\n  - dir: hooked\n    command: [\"sh\", \"-c\", \"echo $MESHCERT_SVID_DIR >> {}\"]\n  - entry: failing\n    command: [\"false\"]\n",
        marker.display()
    );
    let ca = CaHolder::start(&holder_config("1h", &format!("{hooked}{failing}"))).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, &hooks).expect("agent");
    wait_until("the hook ran three times", WAIT, || {
        std::fs::read_to_string(&marker)
            .map(|t| t.lines().count() >= 3)
            .unwrap_or(false)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let text = std::fs::read_to_string(&marker).expect("marker");
    assert!(text.lines().all(|l| l.ends_with("/hooked")), "{text}");

    let failing = agent.volume_dir().join("failing");
    let first = wait_pair(&agent, &failing, "failing issued", |_| true).expect("issued");
    let second = wait_pair(&agent, &failing, "failing rotated", |p| {
        p.serial != first.serial
    })
    .expect("rotation goes on");
    wait_pair(&agent, &failing, "failing rotated again", |p| {
        p.serial != first.serial && p.serial != second.serial
    })
    .expect("rotation goes on");
    assert!(
        meshcert_tests::log_has_event(&agent.log(), "meshcert_agent", "rotation hook failed"),
        "{}",
        tail(&agent.log())
    );
}

#[test]
fn a_gateway_under_limited_trust_gets_a_second_svid_to_the_shared_root() {
    let config = holder_config("1h", "")
        .replace("  shared: {}\n", "  limited: {}\n")
        .replace("    dir: web\n", "    dir: web\n    gateway: true\n");
    assert!(
        config.contains("limited: {}") && config.contains("gateway: true"),
        "the example config changed shape"
    );
    let ca = CaHolder::start(&config).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "").expect("agent");
    let web = agent.volume_dir().join("web");
    agent.wait_for_file(&web.join("svid.pem")).expect("issued");
    // svid.pem appears last: every other file is there by then.
    assert!(web.join("gateway-svid.pem").exists());
    let pair = read_pair(&web).expect("pair").expect("present");
    // Same key, same ID, a chain to the shared root instead of the mesh's root.
    let key = std::fs::read(web.join("svid.key")).expect("key");
    let gateway = pair_of(
        &std::fs::read(web.join("gateway-svid.pem")).expect("pem"),
        &key,
    )
    .expect("the gateway SVID matches the key");
    assert_eq!(gateway.spiffe_id, pair.spiffe_id);
    assert_ne!(gateway.serial, pair.serial);
    let mesh_root = std::fs::read(web.join("bundle.pem")).expect("bundle");
    let shared_root = std::fs::read(web.join("gateway-bundle.pem")).expect("shared root");
    assert_ne!(mesh_root, shared_root);
    for (chain, root) in [
        (&gateway.chain, web.join("gateway-bundle.pem")),
        (&pair.chain, web.join("bundle.pem")),
    ] {
        let out = openssl_verify(chain, &root);
        assert!(
            out.status.success(),
            "openssl verify against {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_join_token_file_is_read_once_and_may_go_away() {
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let tmp = tempfile::tempdir().expect("tempdir");
    let token_file = tmp.path().join("join-token");
    std::fs::write(
        &token_file,
        format!("{}\n", ca.token(NODE, MESH).expect("token")),
    )
    .expect("write");
    let file = token_file.display().to_string();
    let mut agent = Agent::spawn_with_env(
        &ca,
        NODE,
        MESH,
        "",
        None,
        &[("MESHCERT_JOIN_TOKEN_FILE", file.as_str())],
    )
    .expect("spawn");
    agent
        .wait_joined()
        .expect("joined with the token from the file");
    agent
        .wait_for_event("meshcert_agent::rotator", "ready")
        .expect("ready");
    // Provisioning removes the used token: restarts go on with the node identity.
    std::fs::remove_file(&token_file).expect("remove");
    agent.restart().expect("restarts without the file");
    wait_until("ready again", WAIT, || {
        agent.log().matches("rotator: ready").count() >= 2
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    assert!(agent.try_exit().expect("status").is_none());
}

/// How many times the agent's log says `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Under `umask 077` (the shipped unit's `UMask=0077`) every file and folder still gets its
/// exact mode, and a volume nobody touches is never rewritten: the agent's periodic check
/// (every 5 s) finds it as it left it.
#[test]
fn under_umask_077_modes_are_exact_and_an_idle_volume_is_never_rewritten() {
    let config = holder_config("1h", &entry_yaml("db", NODE, "1h"))
        .replacen(
            "      type: generic\n",
            "      type: generic\n    - name: mesh-b\n      trustDomain: mesh-b.test\n      type: generic\n",
            1,
        )
        .replace("  shared: {}\n", "  shared: {}\n  federation: {mode: PERMISSIVE}\n");
    assert!(config.contains("mesh-b.test") && config.contains("PERMISSIVE"));
    let ca = CaHolder::start(&config).expect("holder");
    let token = ca.token(NODE, MESH).expect("token");
    let mut agent = Agent::spawn(&ca, NODE, MESH, "", None).expect("agent");
    agent
        .relaunch_with_umask(0o077, Some(&token))
        .expect("umask 077");
    agent.wait_joined().expect("joined");
    let web = agent.volume_dir().join("web");
    let db = agent.volume_dir().join("db");
    wait_pair(&agent, &web, "web issued", |_| true).expect("web");
    wait_pair(&agent, &db, "db issued", |_| true).expect("db");
    let pid = agent.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Umask:\t0077"),
        "the agent runs under umask 077"
    );
    assert!(
        std::fs::read_dir(web.join("federated"))
            .expect("federated")
            .count()
            > 0,
        "mesh-b's bundle is there to check"
    );
    assert_modes(&agent, &web);

    // Three periodic checks of the whole volume after both installs: none restores anything.
    let checks = count(&agent.log(), "volume checked");
    wait_until("three more checks of the volume", WAIT, || {
        count(&agent.log(), "volume checked") >= checks + 3
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let log = agent.log();
    assert_eq!(
        count(&log, "folder restored from memory"),
        0,
        "an untouched volume was rewritten; log:\n{}",
        tail(&log)
    );
    assert_modes(&agent, &web);
}

/// `--join-token` on the command line (as the harness passes it) is gone from
/// `/proc/<pid>/cmdline` once the agent runs, also while it cannot reach the holder.
#[test]
fn the_join_token_is_not_in_the_command_line_once_the_agent_runs() {
    let mut ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let token = ca.token(NODE, MESH).expect("token");
    // The holder is down: the agent keeps retrying with its token.
    ca.kill9();
    let agent = Agent::spawn(&ca, NODE, MESH, "", Some(&token)).expect("agent");
    agent
        .wait_for_event("meshcert_agent::daemon", "listening")
        .expect("the agent listens");
    let pid = agent.pid().expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let text = String::from_utf8_lossy(&cmdline);
    assert!(!text.contains(&token), "the token is in argv: {text:?}");
    assert!(!text.contains("--join-token"), "{text:?}");
    assert!(
        text.contains("run\0--config"),
        "the other arguments stay: {text:?}"
    );
    // Readable only by the agent's user and root: its environment.
    assert!(environ(pid).contains(&format!("MESHCERT_JOIN_TOKEN={token}")));
    let meta = std::fs::metadata(format!("/proc/{pid}/environ")).expect("environ");
    assert_eq!(meta.mode() & 0o077, 0, "environ is private");
}

/// Sends `POST <path>` with a JSON body over the holder's admin socket; status and body.
fn admin_post(socket: &Path, path: &str, body: &serde_json::Value) -> (u16, String) {
    use std::io::Write as _;
    let body = body.to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
    stream
        .set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, answer)
}

/// A hook in an entry created through the holder's admin API never runs on the node (the
/// holder refuses it, or the agent strips it and says so in its status); a hook from the
/// agent's own config runs, with an empty environment (but its folder) and no capability.
#[test]
fn only_hooks_of_the_agents_config_run_and_without_environment_or_capabilities() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let planted = tmp.path().join("planted-by-the-holder");
    let env_out = tmp.path().join("env");
    let status_out = tmp.path().join("status");
    let config_ran = tmp.path().join("config-hook-ran");
    let ca = CaHolder::start(&holder_config("1h", "")).expect("holder");
    let (code, answer) = admin_post(
        &ca.admin_socket(),
        "/v1/entries",
        &serde_json::json!({
            "id": "hooked",
            "spiffeId": "spiffe://mesh-a.test/hooked",
            "nodes": [NODE],
            "ttl": "1h",
            "dir": "hooked",
            "hook": {"command": ["/bin/sh", "-c", format!("touch {}", planted.display())]},
        }),
    );
    let accepted = (200..300).contains(&code);
    assert!(
        accepted || (400..500).contains(&code),
        "the holder answers or refuses: {answer}"
    );
    let agent_config = format!(
        "hooks:\n  - dir: web\n    command: [\"/bin/sh\", \"-c\", \"cat /proc/$$/environ > {env}; cat /proc/$$/status > {status}\"]\n  - entry: hooked\n    command: [\"/bin/sh\", \"-c\", \"touch {ran}\"]\n",
        env = env_out.display(),
        status = status_out.display(),
        ran = config_ran.display(),
    );
    let agent = Agent::start(&ca, NODE, MESH, &agent_config).expect("agent");
    let web = agent.volume_dir().join("web");
    wait_pair(&agent, &web, "web issued", |_| true).expect("web");
    wait_until("the web hook wrote its status", WAIT, || {
        std::fs::read_to_string(&status_out).is_ok_and(|s| s.contains("CapAmb"))
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    let env = std::fs::read(&env_out).expect("env");
    let vars: Vec<String> = env
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(vars, [format!("MESHCERT_SVID_DIR={}", web.display())]);
    let status = std::fs::read_to_string(&status_out).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("missing")
            .to_owned()
    };
    for name in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(name), "0000000000000000", "{name} of the hook");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks a root agent's hook's bounding set and must run as root"
    );
    assert_eq!(field("CapBnd:"), "0000000000000000", "a root agent's hook");

    if accepted {
        // The entry is served, its hook phase ran (the config's hook for it), and the
        // holder's command did not.
        let hooked = agent.volume_dir().join("hooked");
        wait_pair(&agent, &hooked, "hooked issued", |_| true).expect("hooked");
        wait_until("the config's hook of `hooked` ran", WAIT, || {
            config_ran.exists()
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
        let status = agent.status_json().expect("status");
        let warnings = status["warnings"].to_string();
        assert!(
            warnings.contains("hooked") && warnings.contains("hook"),
            "the status says the holder's hook was ignored: {status}"
        );
        assert!(
            meshcert_tests::log_has_event(
                &agent.log(),
                "meshcert_agent",
                "the holder's entry carries a hook: ignored (hooks are node configuration, set in the agent's config)",
            ),
            "{}",
            tail(&agent.log())
        );
    }
    assert!(!planted.exists(), "the holder's hook ran on the node");
}
