//! Fault injection, end to end: the holder killed with -9 in a signing storm, the agent killed
//! with -9 during hundreds of rotations, a full volume, a wall clock jumping forward, corrupted
//! state files, and arbitrary bytes thrown at every request decoder. Each test checks what an
//! operator would check afterwards: what was acknowledged is recorded, what is on disk is a
//! valid pair, errors name their cause, and the processes carry on without help.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshcert_protocol::api::{AttestRequest, Der, NodeSvidResponse};
use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, ClientIdentity, EXAMPLE_CONFIG};
use meshcert_tests::oracle::{self, At, SvidFiles};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const MESH: &str = "mesh-a";
/// Agent settings for fault tests: quick retries so recovery is seen within a test.
const QUICK_RETRY: &str = "syncInterval: 2s\nrotation: {backoffInitial: 100ms, backoffMax: 1s}\n";

/// The example holder config plus `entries` (YAML list items).
fn config_with(entries: &str) -> String {
    format!("{EXAMPLE_CONFIG}{entries}")
}

/// An entry for `node`, selected by this process's uid (so the Workload API serves it to us).
fn entry_yaml(id: &str, node: &str, ttl: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        "  - id: {id}\n    spiffeId: spiffe://mesh-a.test/{id}\n    nodes: [{node}]\n    selectors: [\"unix:uid:{uid}\"]\n    ttl: {ttl}\n    dir: {id}\n"
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A pseudo-random number below `n` (varied kill moments without a random crate).
fn random_below(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    nanos
        .wrapping_mul(6_364_136_223_846_793_005)
        .rotate_left(17)
        % n.max(1)
}

/// What is installed in one entry folder, read the way a careful application reads it: one
/// open of `..data`, then `svid.pem`, `svid.key` and `bundle.pem` inside that one folder.
#[derive(Debug, Clone)]
struct Installed {
    serial: String,
    not_after: SystemTime,
}

/// Reads and checks the pair of `entry` with the tests' own oracle (openssl, x509-parser),
/// not the agent's: the key matches the leaf, the leaf carries exactly `id`, and the chain
/// verifies against `bundle.pem` of the same data folder at the leaf's own issue time (so a
/// short-lived SVID that expired meanwhile still counts as a valid pair).
fn installed_pair(entry: &Path, id: &str) -> anyhow::Result<Installed> {
    let dir = File::open(entry.join("..data"))
        .map_err(|e| anyhow::anyhow!("{}/..data: {e}", entry.display()))?;
    let read = |name: &str| -> anyhow::Result<Vec<u8>> {
        let fd = openat(
            &dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| anyhow::anyhow!("{}/..data/{name}: {e}", entry.display()))?;
        let mut bytes = Vec::new();
        File::from(fd).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let (chain_pem, key_pem, bundle_pem) =
        (read("svid.pem")?, read("svid.key")?, read("bundle.pem")?);
    let files = SvidFiles {
        chain_pem: &chain_pem,
        key_pem: &key_pem,
        bundle_pem: &bundle_pem,
    };
    let judged = oracle::judge_svid(&files, id, At::Issued)?;
    Ok(Installed {
        serial: judged.serial,
        not_after: judged.not_after,
    })
}

/// Serials of every `SVID installed` line of an agent's (text) log.
fn installed_serials(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter(|l| l.contains("SVID installed"))
        .filter_map(|l| {
            let rest = &l[l.find(" serial=")? + " serial=".len()..];
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// Every serial the holder has recorded (`meshcert-ca issuances -o json`).
fn recorded_serials(ca: &CaHolder) -> anyhow::Result<BTreeSet<String>> {
    let out = ca.ctl(&["issuances", "-o", "json"])?;
    anyhow::ensure!(
        out.status.success(),
        "issuances: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("issuances is not a list: {list}"))?
        .iter()
        .filter_map(|i| i["serial"].as_str().map(str::to_owned))
        .collect())
}

fn svids_issued(ca: &CaHolder) -> u64 {
    ca.ctl(&["status", "-o", "json"])
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|s| s["certificateStatus"]["svidsIssued"].as_u64())
        .unwrap_or(0)
}

/// A node CSR (no SAN) and its PKCS#8 key.
fn node_csr() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr");
    (csr.der().to_vec(), key.serialize_der())
}

/// `POST /v1/attest` with `token` and a fresh node key.
fn attest(ca: &CaHolder, token: &str) -> anyhow::Result<(u16, serde_json::Value, Vec<u8>)> {
    let (csr, key) = node_csr();
    let body = serde_json::to_vec(&AttestRequest {
        token: token.to_owned(),
        csr: Der(csr),
    })?;
    let answer = ca.https("POST", "/v1/attest", Some(&body), None)?;
    Ok((answer.status, answer.json()?, key))
}

#[test]
fn holder_killed_during_a_signing_storm_keeps_every_issuance_and_token_use() {
    const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
    let mut entries = String::new();
    for node in NODES {
        for i in 0..3 {
            entries.push_str(&entry_yaml(&format!("{node}-s{i}"), node, "3s"));
        }
    }
    let mut ca = CaHolder::start(&config_with(&entries)).expect("holder");
    let mut tokens = Vec::new();
    let mut agents = Vec::new();
    for node in NODES {
        let token = ca.token(node, MESH).expect("token");
        let mut agent = Agent::spawn(&ca, node, MESH, QUICK_RETRY, Some(&token)).expect("spawn");
        agent.wait_joined().expect("joined");
        tokens.push(token);
        agents.push(agent);
    }

    for round in 0..2 {
        // A storm is under way: every agent keeps rotating its 3-second SVIDs.
        let before: Vec<BTreeSet<String>> =
            agents.iter().map(|a| installed_serials(&a.log())).collect();
        for (agent, seen) in agents.iter().zip(&before) {
            wait_until("rotations in the storm", WAIT, || {
                installed_serials(&agent.log()).difference(seen).count() >= 5
            })
            .unwrap_or_else(|e| panic!("round {round}: {e}; log:\n{}", tail(&agent.log())));
        }
        // A random moment of the storm to kill at: the sleep is the point, not a wait.
        std::thread::sleep(Duration::from_millis(random_below(300)));
        ca.kill9();
        let at_kill: Vec<BTreeSet<String>> =
            agents.iter().map(|a| installed_serials(&a.log())).collect();
        // The holder stays down a moment while the agents keep calling (the point, not a wait).
        std::thread::sleep(Duration::from_millis(500));
        ca.restart().expect("the holder restarts on its datastore");

        // Every SVID an agent installed was acknowledged, so it must be on record.
        let recorded = recorded_serials(&ca).expect("issuances");
        for (agent, installed) in agents.iter().zip(&at_kill) {
            let missing: Vec<&String> = installed.difference(&recorded).collect();
            assert!(
                missing.is_empty(),
                "round {round}: {} installed {} serials the holder has no record of: {:?}",
                agent.node(),
                missing.len(),
                &missing[..missing.len().min(5)]
            );
        }
        // Every consumed join token is still consumed.
        for token in &tokens {
            let (status, body, _) = attest(&ca, token).expect("attest answer");
            assert_eq!(status, 401, "a used token was accepted again: {body}");
            assert_eq!(body["code"], "token_used", "{body}");
        }
        // The agents recover on their own: new SVIDs signed after the restart.
        for (agent, old) in agents.iter().zip(&at_kill) {
            wait_until("a new SVID after the holder restart", WAIT, || {
                installed_serials(&agent.log()).difference(old).count() > 0
            })
            .unwrap_or_else(|e| panic!("round {round}: {e}; log:\n{}", tail(&agent.log())));
        }
    }
    let mut agents = agents;
    for agent in &mut agents {
        assert!(agent.try_exit().expect("status").is_none(), "agent exited");
    }
}

#[test]
fn agent_killed_at_random_during_500_rotations_always_leaves_a_valid_pair() {
    const ROTATIONS: u64 = 500;
    /// Kills the test must make, whatever the rotation rate: each one is a check of every pair.
    const KILLS: u64 = 20;
    const ENTRIES: usize = 5;
    let ids: Vec<String> = (0..ENTRIES).map(|i| format!("k{i}")).collect();
    let entries: String = ids
        .iter()
        .map(|id| entry_yaml(id, "node-1", "3s"))
        .collect();
    let ca = CaHolder::start(&config_with(&entries)).expect("holder");
    let mut agent = Agent::start(&ca, "node-1", MESH, QUICK_RETRY).expect("agent");
    for id in &ids {
        agent
            .wait_for_file(&agent.volume_dir().join(id).join("..data"))
            .expect("first issue");
    }
    let start = svids_issued(&ca);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    while (svids_issued(&ca).saturating_sub(start) < ROTATIONS || kills < KILLS)
        && Instant::now() < deadline
    {
        // A random moment to kill at: the sleep is the point, not a wait for an effect.
        std::thread::sleep(Duration::from_millis(50 + random_below(450)));
        agent.kill9();
        kills += 1;
        for id in &ids {
            let entry = agent.volume_dir().join(id);
            if let Err(e) = installed_pair(&entry, &format!("spiffe://mesh-a.test/{id}")) {
                panic!(
                    "after kill {kills}: {} holds no valid pair: {e}; log:\n{}",
                    entry.display(),
                    tail(&agent.log())
                );
            }
        }
        agent.restart().expect("restart");
    }
    let rotations = svids_issued(&ca).saturating_sub(start);
    eprintln!("{rotations} rotations, {kills} kills, every pair valid after each kill");
    assert!(
        rotations >= ROTATIONS,
        "only {rotations} rotations in the time allowed ({kills} kills); log:\n{}",
        tail(&agent.log())
    );
    assert!(
        kills >= KILLS,
        "only {kills} kills in the time allowed ({rotations} rotations)"
    );
    // The restarted agent carries on rotating.
    let entry = agent.volume_dir().join(&ids[0]);
    let id = format!("spiffe://mesh-a.test/{}", ids[0]);
    let last = installed_pair(&entry, &id).expect("pair").serial;
    wait_until("a rotation after the last restart", WAIT, || {
        installed_pair(&entry, &id).is_ok_and(|p| p.serial != last)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
}

/// A tmpfs mounted for a test; unmounted (lazily, so open files cannot block it) when dropped.
struct Mount {
    path: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `size` on `path`, or says why it cannot.
    fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        let out = meshcert_tests::output_within(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(path),
            meshcert_tests::COMMAND_TIMEOUT,
        )
        .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount is not permitted here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount {
            path: path.to_owned(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = meshcert_tests::output_within(
            Command::new("umount").arg("-l").arg(&self.path),
            meshcert_tests::COMMAND_TIMEOUT,
        );
    }
}

/// Fills the file system holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 64 * 1024];
    // Bounded: the tmpfs is small.
    for _ in 0..10_000 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.flush();
    path
}

fn identity_of<'a>(status: &'a serde_json::Value, entry: &str) -> Option<&'a serde_json::Value> {
    status["identities"]
        .as_array()?
        .iter()
        .find(|i| i["entryId"] == entry)
}

/// The serial of the first SVID the Workload API gives this process.
fn workload_serial(socket: &Path) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client =
            spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display())).await?;
        let svid = client.fetch_x509_svid().await?;
        oracle::serial_hex(svid.leaf().as_bytes())
    })
}

#[test]
fn a_full_volume_keeps_the_previous_svid_served_and_reports_the_error() {
    let ca = CaHolder::start(&config_with(&entry_yaml("disk", "node-1", "30s"))).expect("holder");
    let mut agent = Agent::start(&ca, "node-1", MESH, QUICK_RETRY).expect("agent");
    agent
        .wait_for_file(&agent.volume_dir().join("disk/..data"))
        .expect("first issue");
    // Move the volume onto a small tmpfs: stop the agent, mount over the folder, restart.
    agent.kill9();
    // CI runs as root with `mount`; never a silent pass without them.
    let mount = Mount::tmpfs(&agent.volume_dir(), "2m")
        .unwrap_or_else(|reason| panic!("this test needs a tmpfs mount: {reason}"));
    agent.restart().expect("restart");
    let entry = agent.volume_dir().join("disk");
    let id = "spiffe://mesh-a.test/disk";
    agent
        .wait_for_file(&entry.join("..data"))
        .expect("issued into the tmpfs");
    let before = installed_pair(&entry, id).expect("a valid pair");

    let filler = fill(&mount.path);
    // The next rotation (due about 10 s after issue) fails for want of space.
    let mut failed = serde_json::Value::Null;
    wait_until(
        "the failed rotation in the agent's status",
        WAIT,
        || match agent.status_json() {
            Ok(s) => match identity_of(&s, "disk") {
                Some(i) if i["state"] == "FAILED" && i["lastError"].is_string() => {
                    failed = i.clone();
                    true
                }
                _ => false,
            },
            Err(_) => false,
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let error = failed["lastError"].as_str().unwrap_or_default();
    assert!(
        error.contains("space"),
        "the last error does not say the volume is full: {error}"
    );
    assert_eq!(
        failed["serial"].as_str(),
        Some(before.serial.as_str()),
        "the status still shows the served SVID: {failed}"
    );
    // The previous SVID is intact on disk and still served.
    let during = installed_pair(&entry, id).expect("the previous pair is intact");
    assert_eq!(during.serial, before.serial);
    assert!(during.not_after > SystemTime::now(), "still valid");
    let served = workload_serial(&agent.workload_socket()).expect("Workload API");
    assert_eq!(
        served, before.serial,
        "the Workload API serves the previous SVID"
    );
    // The error travels upward to the holder too.
    wait_until("FAILED in the holder's status", WAIT, || {
        ca.ctl(&["status", "-o", "json"])
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .is_some_and(|s| {
                s["certificateStatus"]["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["name"] == "node-1")
                    .any(|n| {
                        identity_of(n, "disk")
                            .is_some_and(|i| i["state"] == "FAILED" && i["lastError"].is_string())
                    })
            })
    })
    .unwrap_or_else(|e| panic!("{e}; holder log:\n{}", tail(&ca.log())));

    // Space returns: rotation resumes.
    std::fs::remove_file(&filler).expect("free the space");
    wait_until("a rotation once space returned", WAIT, || {
        installed_pair(&entry, id).is_ok_and(|p| p.serial != before.serial)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    agent.kill9();
    drop(mount);
}

/// The preloaded library that fakes the wall clock (Debian package `faketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// An agent whose wall clock is offset by the seconds written into a file (libfaketime);
/// its monotonic clock stays real.
struct FakeClockAgent {
    dir: tempfile::TempDir,
    child: Child,
}

impl FakeClockAgent {
    fn start(ca: &CaHolder, node: &str) -> anyhow::Result<FakeClockAgent> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::write(root.join("offset"), "+0\n")?;
        let config = format!(
            "caAddress: {addr}\ncaServerName: localhost\ntrustBundle: {bundle}\nnodeName: {node}\nmesh: {MESH}\n\
             stateDir: {state}\nvolumeDir: {volume}\nworkloadSocket: {workload}\nadminSocket: {admin}\n{QUICK_RETRY}",
            addr = ca.addr(),
            bundle = ca.bundle_pem_path().display(),
            state = root.join("state").display(),
            volume = root.join("svids").display(),
            workload = root.join("workload.sock").display(),
            admin = root.join("admin.sock").display(),
        );
        std::fs::write(root.join("agent.yaml"), config)?;
        let log = File::create(root.join("agent.log"))?;
        let child = Command::new(meshcert_tests::bin_path("meshcert-agent"))
            .arg("run")
            .arg("--config")
            .arg(root.join("agent.yaml"))
            .arg("--join-token")
            .arg(ca.token(node, MESH)?)
            .env("RUST_LOG", "info,meshcert_agent=debug")
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", root.join("offset"))
            .env("FAKETIME_NO_CACHE", "1")
            .env("DONT_FAKE_MONOTONIC", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("MESHCERT_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(FakeClockAgent { dir, child })
    }

    /// Moves the agent's wall clock `seconds` ahead of the real one.
    fn set_offset(&self, seconds: u64) -> anyhow::Result<()> {
        let tmp = self.dir.path().join("offset.tmp");
        std::fs::write(&tmp, format!("+{seconds}\n"))?;
        std::fs::rename(&tmp, self.dir.path().join("offset"))?;
        Ok(())
    }

    fn volume_dir(&self) -> PathBuf {
        self.dir.path().join("svids")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for FakeClockAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_clock_jump_past_half_life_rotates_at_once() {
    // CI installs libfaketime (.ci/run); never a silent pass without it.
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "this test needs {LIBFAKETIME} (apt-get install faketime)"
    );
    let ca = CaHolder::start(&config_with(&entry_yaml("clock", "node-1", "1h"))).expect("holder");
    let agent = FakeClockAgent::start(&ca, "node-1").expect("agent");
    let entry = agent.volume_dir().join("clock");
    let id = "spiffe://mesh-a.test/clock";
    wait_until("the first SVID", WAIT, || {
        installed_pair(&entry, id).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let first = installed_pair(&entry, id).expect("pair");
    let maps =
        std::fs::read_to_string(format!("/proc/{}/maps", agent.child.id())).unwrap_or_default();
    assert!(
        maps.contains("libfaketime"),
        "libfaketime is not loaded into the agent"
    );
    // Nothing is due for about half an hour: the SVID stays put on its own. This sleep is the
    // point (nothing happens while time passes), not a wait for an effect.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        installed_pair(&entry, id).expect("pair").serial,
        first.serial,
        "rotated although not due"
    );

    // 40 minutes ahead: past the half-life (30 min ± 6) of a 1-hour SVID, before its expiry.
    agent.set_offset(40 * 60).expect("jump");
    wait_until("a rotation after the clock jump", WAIT, || {
        installed_pair(&entry, id).is_ok_and(|p| p.serial != first.serial)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    agent.set_offset(0).expect("back");
}

/// Starts `meshcert-ca run` on `config` and waits (bounded) for it to exit on its own.
fn run_holder_expecting_failure(config: &Path) -> (Option<i32>, String) {
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-ca"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null()),
        WAIT,
    )
    .unwrap_or_else(|e| panic!("meshcert-ca kept running on a corrupted state folder: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

#[test]
fn a_corrupted_holder_datastore_or_key_is_named_and_never_reset() {
    for file in ["meshcert.db", "root.key"] {
        let mut ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
        ca.token("node-1", MESH).expect("a record in the datastore");
        ca.terminate().expect("stops");
        let path = ca.state_dir().join(file);
        assert!(path.exists(), "{} is not where expected", path.display());
        let garbage = b"this is not what meshcert wrote here\n".repeat(200);
        std::fs::write(&path, &garbage).expect("corrupt");

        let (code, stderr) = run_holder_expecting_failure(&ca.config_path());
        eprintln!("{file}: exit {code:?}: {}", tail(&stderr));
        assert!(
            matches!(code, Some(c) if c != 0),
            "{file}: exit code {code:?}; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(file),
            "{file}: the error does not name the file:\n{stderr}"
        );
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            garbage,
            "{file} was silently replaced"
        );
    }
}

#[test]
fn a_corrupted_agent_state_file_is_named_and_never_reset() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    for (node, file, fatal) in [
        ("node-k", "node.key", true),
        ("node-p", "node.pem", true),
        ("node-s", "last-sync.json", false),
    ] {
        let mut agent = Agent::start(&ca, node, MESH, "").expect("agent");
        let path = agent.state_dir().join(file);
        agent.wait_for_file(&path).expect("state written");
        agent.kill9();
        let garbage = b"\x00\x01 not a meshcert state file {\n".repeat(20);
        std::fs::write(&path, &garbage).expect("corrupt");
        agent.relaunch(None).expect("relaunch");
        if fatal {
            let status = agent.wait_exit(WAIT).expect("refuses to start");
            eprintln!(
                "{file}: {status}: {}",
                tail(&agent.log()).lines().last().unwrap_or_default()
            );
            assert_eq!(
                status.code(),
                Some(1),
                "{file}; log:\n{}",
                tail(&agent.log())
            );
            assert!(
                agent.log().contains(file),
                "{file}: the error does not name the file:\n{}",
                tail(&agent.log())
            );
            assert_eq!(
                std::fs::read(&path).expect("still there"),
                garbage,
                "{file} was silently replaced"
            );
        } else {
            // The last sync is a cache of what the holder says: the agent names it, says it
            // ignores it, and carries on with a fresh sync.
            wait_until("the ignored last sync in the log", WAIT, || {
                agent.log().lines().any(|l| {
                    l.contains(file)
                        && l.contains(" WARN ")
                        && meshcert_tests::log_has_event(
                            l,
                            "meshcert_agent",
                            "ignoring the last sync",
                        )
                })
            })
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
            assert!(agent.try_exit().expect("status").is_none(), "still running");
        }
    }
}

/// A proptest runner for `cases` cases that keeps failing cases: a failure's seed is written
/// to `tests/e2e/proptest-regressions/faults.txt` (commit it) and tried first on every run.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/faults.rs")),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::SourceParallel("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })
}

/// A node identity for mTLS calls, attested directly.
fn node_identity(ca: &CaHolder, node: &str) -> ClientIdentity {
    let token = ca.token(node, MESH).expect("token");
    let (status, body, key) = attest(ca, &token).expect("attest");
    assert_eq!(status, 200, "{body}");
    let answer: NodeSvidResponse = serde_json::from_value(body).expect("node SVID");
    ClientIdentity {
        chain: answer.svid.chain.into_iter().map(|d| d.0).collect(),
        key_pkcs8: key,
    }
}

/// Bodies for a JSON endpoint: arbitrary bytes, and JSON shaped like the real bodies with
/// arbitrary values.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    let text = "[ -~]{0,40}";
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..800),
        (text, text).prop_map(|(a, b)| format!("{{\"token\":\"{a}\",\"csr\":\"{b}\"}}").into_bytes()),
        (text, text).prop_map(|(a, b)| {
            format!("{{\"csrs\":[{{\"entryId\":\"{a}\",\"csr\":\"{b}\"}}]}}").into_bytes()
        }),
        (any::<i64>(), text).prop_map(|(v, s)| {
            format!("{{\"bundleVersion\":{v},\"identities\":[{{\"entryId\":\"{s}\",\"state\":\"{s}\"}}]}}")
                .into_bytes()
        }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
            let mut v = b"{\"csr\":\"".to_vec();
            v.extend(b);
            v
        }),
    ]
}

#[test]
fn arbitrary_bytes_into_every_holder_endpoint_get_a_clear_error() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let identity = node_identity(&ca, "node-1");
    let known_codes: BTreeSet<&str> = [
        "bad_request",
        "body_too_large",
        "batch_too_large",
        "bad_csr",
        "san_mismatch",
        "outside_trust_domain",
        "key_not_allowed",
        "unknown_entry",
        "not_assigned",
        "policy_denied",
        "invalid_token",
        "token_expired",
        "token_used",
        "wrong_mesh",
        "unauthenticated",
        "unknown_node",
        "node_banned",
        "not_found",
        "method_not_allowed",
    ]
    .into();
    for (method, path, mtls) in [
        ("POST", "/v1/attest", false),
        ("POST", "/v1/node/renew", true),
        ("POST", "/v1/sign", true),
        ("POST", "/v1/report", true),
        ("GET", "/v1/sync", true),
        ("POST", "/v1/no-such-endpoint", true),
    ] {
        let mut runner = runner(24);
        let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
        let result = runner.run(&bodies(), |body| {
            let answer = ca
                .https(method, path, Some(&body), mtls.then_some(&identity))
                .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            *statuses.borrow_mut().entry(answer.status).or_default() += 1;
            prop_assert!(
                answer.status < 500,
                "{method} {path}: HTTP {} for {:?}",
                answer.status,
                String::from_utf8_lossy(&body)
            );
            if answer.status >= 400 {
                let json = answer
                    .json()
                    .map_err(|e| TestCaseError::fail(format!("{method} {path}: {e}")))?;
                let code = json["code"].as_str().unwrap_or_default();
                prop_assert!(known_codes.contains(code), "{method} {path}: {json}");
                prop_assert!(
                    json["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{method} {path}: no message: {json}"
                );
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}; holder log:\n{}", tail(&ca.log()));
        }
        eprintln!("{method} {path}: HTTP statuses {:?}", statuses.borrow());
    }
    // Still up and serving.
    let answer = ca
        .https("GET", "/v1/sync", None, Some(&identity))
        .expect("sync");
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

/// The HTTP/2 frames of one gRPC call with `payload` as its request body, written by hand so
/// that any bytes can be sent (HPACK literals without Huffman coding).
fn grpc_call(path: &str, payload: &[u8]) -> Vec<u8> {
    fn frame(kind: u8, flags: u8, stream: u32, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).expect("small frame");
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(body);
        f
    }
    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        out.push(u8::try_from(name.len()).expect("short name"));
        out.extend(name.as_bytes());
        out.push(u8::try_from(value.len()).expect("short value"));
        out.extend(value.as_bytes());
    }
    let mut headers = vec![0x83, 0x86]; // :method POST, :scheme http
    headers.push(0x04); // :path, literal value
    headers.push(u8::try_from(path.len()).expect("short path"));
    headers.extend(path.as_bytes());
    literal(&mut headers, ":authority", "localhost");
    literal(&mut headers, "content-type", "application/grpc");
    literal(&mut headers, "te", "trailers");
    literal(&mut headers, "workload.spiffe.io", "true");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &headers)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, payload)); // DATA, END_STREAM
    out
}

/// What the server did with a call: answered on the stream, reset it, or closed the
/// connection. `None` when nothing happened within the patience.
fn server_reaction(stream: &mut UnixStream) -> Option<&'static str> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse whole frames from the start of `buf`.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = usize::from(buf[at]) << 16
                | usize::from(buf[at + 1]) << 8
                | usize::from(buf[at + 2]);
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            let stream_id =
                u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                    & 0x7fff_ffff;
            if buf.len() < at + 9 + len {
                break;
            }
            match (kind, stream_id) {
                (0x1, 1) => return Some("answered"),
                (0x3, 1) => return Some("reset"),
                (0x7, _) => return Some("goaway"),
                (0x4, 0) if flags & 0x1 == 0 => {
                    // Acknowledge the server's settings.
                    let _ = stream.write_all(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]);
                }
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
        match stream.read(&mut chunk) {
            Ok(0) => return Some("closed"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some("closed"),
            Err(_) => return None,
        }
    }
}

#[test]
fn arbitrary_bytes_into_the_workload_api_get_an_answer_and_break_nothing() {
    let ca = CaHolder::start(&config_with(&entry_yaml("me", "node-1", "1h"))).expect("holder");
    let mut agent = Agent::start(&ca, "node-1", MESH, "").expect("agent");
    agent
        .wait_for_file(&agent.volume_dir().join("me/..data"))
        .expect("issued");
    let socket = agent.workload_socket();
    // The install reaches the disk a moment before the snapshot is published: wait for it.
    let mut expected = None;
    wait_until("the SVID served before the garbage", WAIT, || {
        expected = workload_serial(&socket).ok();
        expected.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", tail(&agent.log())));
    let expected = expected.expect("served before the garbage");

    let paths = [
        "/SpiffeWorkloadAPI/FetchX509SVID",
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        "/SpiffeWorkloadAPI/FetchJWTBundles",
        "/SpiffeWorkloadAPI/ValidateJWTSVID",
        "/SpiffeWorkloadAPI/NoSuchMethod",
    ];
    for path in paths {
        let mut runner = runner(12);
        let payloads = prop_oneof![
            // A gRPC message frame with arbitrary protobuf bytes.
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|m| {
                let mut framed = vec![0u8];
                framed.extend(u32::try_from(m.len()).expect("small").to_be_bytes());
                framed.extend(m);
                framed
            }),
            // Arbitrary bytes where the frame should be.
            proptest::collection::vec(any::<u8>(), 0..300),
        ];
        let reactions = std::cell::RefCell::new(std::collections::BTreeMap::<&str, u32>::new());
        let result = runner.run(&payloads, |payload| {
            let mut stream = UnixStream::connect(&socket)
                .map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
            stream
                .write_all(&grpc_call(path, &payload))
                .map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
            let reaction = server_reaction(&mut stream);
            prop_assert!(reaction.is_some(), "{path}: no reaction to {payload:?}");
            *reactions
                .borrow_mut()
                .entry(reaction.unwrap_or_default())
                .or_default() += 1;
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}; agent log:\n{}", tail(&agent.log()));
        }
        eprintln!("{path}: {:?}", reactions.borrow());
    }
    // Bytes that are not even HTTP/2.
    let mut runner = runner(12);
    let result = runner.run(&proptest::collection::vec(any::<u8>(), 1..500), |bytes| {
        let mut stream = UnixStream::connect(&socket)
            .map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
        let _ = stream.write_all(&bytes);
        prop_assert!(
            server_reaction(&mut stream).is_some(),
            "no reaction to {bytes:?}"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}; agent log:\n{}", tail(&agent.log()));
    }

    // The agent is alive and serves a proper client as before (the garbage may have used up
    // this uid's rate allowance for a moment: retry within the patience).
    assert!(
        agent.try_exit().expect("status").is_none(),
        "the agent died"
    );
    let mut served = None;
    wait_until("a proper client served after the garbage", WAIT, || {
        served = workload_serial(&socket).ok();
        served.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", tail(&agent.log())));
    assert_eq!(served.as_deref(), Some(expected.as_str()));
}

/// Runs `script` with `sh -c` as `uid:gid`; whether it succeeded, and its stderr.
fn sh_as(uid: u32, gid: u32, script: &str) -> (bool, String) {
    use std::os::unix::process::CommandExt as _;
    let out = meshcert_tests::output_within(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null()),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The agent's peak resident memory (`VmHWM`), in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// As root (CI runs as root): the entry's owner cannot change its folder, which is the
/// agent's. Given a data folder of its own (the layout of earlier versions, which handed
/// data folders to owners), it plants a FIFO, a symlink to a file outside the volume and a
/// symlink to `/dev/zero` in it: the other entry keeps rotating on time, the file outside is
/// untouched, the agent's memory stays bounded, and the folder is restored.
#[test]
fn fifos_and_symlinks_planted_by_the_owner_stall_nothing_and_are_cleaned_up() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs a process as the entry's owner (uid 1000) and must run as root"
    );
    let (owner_uid, owner_gid) = (1000, 1000);
    // 20 s SVIDs (the holder backdates 10 s): due about 5 s after issue.
    let config = config_with(&entry_yaml("fast", "node-1", "20s")).replace(
        "    dir: web\n",
        &format!("    dir: web\n    owner: \"{owner_uid}:{owner_gid}\"\n"),
    );
    assert!(
        config.contains("owner: \"1000:1000\""),
        "the example changed shape"
    );
    let ca = CaHolder::start(&config).expect("holder");
    let agent = Agent::start(&ca, "node-1", MESH, QUICK_RETRY).expect("agent");
    let volume = agent.volume_dir();
    // The owner must reach its folder through the test's private folder.
    let top = volume.parent().expect("agent folder");
    std::fs::set_permissions(top, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let web = volume.join("web");
    let fast = volume.join("fast");
    agent.wait_for_file(&web.join("svid.pem")).expect("web");
    agent.wait_for_file(&fast.join("svid.pem")).expect("fast");

    // The folders are the agent's: the owner can read its key but change nothing.
    let (ok, _) = sh_as(
        owner_uid,
        owner_gid,
        &format!("cat {}/svid.key > /dev/null", web.display()),
    );
    assert!(ok, "the owner reads its key");
    for script in [
        format!("mkfifo {}/planted", web.display()),
        format!("mkfifo {}/..data/planted", web.display()),
        format!("chmod u+w {}/..data", web.display()),
    ] {
        let (ok, _) = sh_as(owner_uid, owner_gid, &script);
        assert!(!ok, "the owner could run `{script}`");
    }

    // The earlier layout: the served data folder is the owner's. Made beside the served one
    // (a copy handed to the owner, who plants in it), then swapped in with one rename.
    let served = std::fs::canonicalize(web.join("..data")).expect("data folder");
    let data = web.join("..2000_01_01_00_00_00.000000000");
    let outside_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        outside_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let outside = outside_dir.path().join("precious");
    std::fs::write(&outside, b"precious\n").expect("write");
    let before = std::fs::metadata(&outside).expect("meta");
    let (ok, err) = sh_as(
        0,
        0,
        &format!(
            "cp -a {served} {data} && chown -R {owner_uid}:{owner_gid} {data} && chmod 0750 {data}",
            served = served.display(),
            data = data.display()
        ),
    );
    assert!(ok, "{err}");
    let fast_before = installed_pair(&fast, "spiffe://mesh-a.test/fast").expect("fast");
    let (ok, err) = sh_as(
        owner_uid,
        owner_gid,
        &format!(
            "cd {data} && chmod u+w . && rm -f svid.pem svid.key bundle.pem && mkfifo svid.pem && ln -s {outside} svid.key && ln -s /dev/zero bundle.pem",
            data = data.display(),
            outside = outside.display()
        ),
    );
    assert!(ok, "the owner plants in its own folder: {err}");
    let (ok, err) = sh_as(
        0,
        0,
        &format!(
            "cd {web} && ln -s {name} ..data.planted && mv -T ..data.planted ..data",
            web = web.display(),
            name = data.file_name().expect("name").to_string_lossy()
        ),
    );
    assert!(ok, "{err}");

    // The other entry keeps rotating on time: twice more, each well before it expires.
    let mut serials = BTreeSet::from([fast_before.serial.clone()]);
    wait_until("fast rotated twice more", Duration::from_secs(40), || {
        if let Ok(p) = installed_pair(&fast, "spiffe://mesh-a.test/fast") {
            assert!(
                p.not_after > SystemTime::now(),
                "fast expired before it was rotated"
            );
            serials.insert(p.serial);
        }
        serials.len() >= 3
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    // The folder is restored into a data folder of the agent's, the planted one is gone.
    wait_until("web restored", WAIT, || {
        std::fs::canonicalize(web.join("..data")).is_ok_and(|d| {
            d != data
                && d != served
                && std::fs::symlink_metadata(d.join("svid.pem")).is_ok_and(|m| m.is_file())
                && std::fs::metadata(&d).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        })
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    installed_pair(&web, "spiffe://mesh-a.test/web").expect("a valid pair again");
    wait_until("the planted folder removed", WAIT, || !data.exists())
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    // The file outside the volume: same bytes, mode and owner.
    let after = std::fs::metadata(&outside).expect("still there");
    assert_eq!(std::fs::read(&outside).expect("read"), b"precious\n");
    assert_eq!(before.permissions(), after.permissions());
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&before),
        std::os::unix::fs::MetadataExt::uid(&after)
    );
    // A read of /dev/zero would have grown without end; a few tens of MB is the agent's size.
    let peak = peak_rss_kb(agent.pid().expect("running"));
    assert!(
        peak < 200 * 1024,
        "the agent's peak resident memory is {peak} kB"
    );
    println!("agent peak resident memory: {peak} kB");
}
