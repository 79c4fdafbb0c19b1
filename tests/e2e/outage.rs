//! Holder outages, end to end: a holder killed while its nodes' SVIDs expire, and what the
//! agents do meanwhile and at its return; a refusal of one entry, which must not look like an
//! outage; and several holder addresses, one of them dead.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};

const MESH: &str = "mesh-a";
/// How long the holder stays down.
const OUTAGE: Duration = Duration::from_secs(60);

/// An entry for `node` with `ttl`, selected by this process's uid.
fn entry_yaml(id: &str, node: &str, ttl: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        "  - id: {id}\n    spiffeId: spiffe://mesh-a.test/{id}\n    nodes: [{node}]\n    selectors: [\"unix:uid:{uid}\"]\n    ttl: {ttl}\n    dir: {id}\n"
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The agent's identities (`entryId` → serial, notAfter, state) from its status.
fn identities(agent: &Agent) -> Vec<(String, Option<String>, Option<u64>, String)> {
    let status = agent.status_json().unwrap_or_default();
    status["identities"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|i| {
                    (
                        i["entryId"].as_str().unwrap_or_default().to_owned(),
                        i["serial"].as_str().map(str::to_owned),
                        i["notAfter"].as_u64(),
                        i["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every one of the agent's `n` identities is ISSUED, valid now, and (when given) has
/// a serial other than those in `old`.
fn all_fresh(agent: &Agent, n: usize, old: &BTreeSet<String>) -> bool {
    let ids = identities(agent);
    ids.len() == n
        && ids.iter().all(|(_, serial, not_after, state)| {
            state == "ISSUED"
                && not_after.is_some_and(|t| t > now_unix())
                && serial.as_ref().is_some_and(|s| !old.contains(s))
        })
}

/// `GET path` on the agent's admin socket: the response head and body.
fn admin_get(socket: &Path, path: &str) -> (String, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the admin socket");
    stream
        .set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write the request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_owned(), body.to_owned())
}

/// A TCP forwarder to `upstream` that counts the connections it accepts: an oracle of how
/// often an agent contacts the holder, independent of the agent. While nothing listens
/// upstream, each connection is closed at once (the agent sees a failed TLS handshake).
struct CountingForwarder {
    address: String,
    accepted: Arc<AtomicU64>,
}

impl CountingForwarder {
    fn start(upstream: std::net::SocketAddr) -> CountingForwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        let address = listener.local_addr().expect("address").to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(upstream) else {
                        return;
                    };
                    let pipe = |mut from: TcpStream, mut to: TcpStream| {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    };
                    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                        (Ok(c), Ok(s)) => (c, s),
                        _ => return,
                    };
                    let up = std::thread::spawn(move || pipe(client, server));
                    pipe(s2, c2);
                    let _ = up.join();
                });
            }
        });
        CountingForwarder { address, accepted }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Replaces the agent's `caAddress` line with `address`.
fn set_ca_address(agent: &Agent, address: &str) {
    let path = agent.config_path();
    let text = std::fs::read_to_string(&path).expect("read the agent config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("caAddress:") {
                format!("caAddress: \"{address}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&path, text).expect("write the agent config");
}

#[test]
fn a_returning_holder_gets_every_expired_entry_renewed() {
    const ENTRIES: usize = 5;
    let mut entries = String::new();
    for i in 0..ENTRIES {
        entries.push_str(&entry_yaml(&format!("short-{i}"), "busy-1", "20s"));
    }
    entries.push_str(&entry_yaml("idle", "idle-1", "1h"));
    let mut ca = CaHolder::start(&format!("{EXAMPLE_CONFIG}{entries}")).expect("holder");
    // Default schedules: syncInterval 30 s, heartbeat 30 s, backoff 1 s to 2 min.
    let busy = Agent::start(&ca, "busy-1", MESH, "").expect("busy agent");
    // The idle agent reaches the holder through a counting forwarder.
    let mut idle = Agent::start(&ca, "idle-1", MESH, "").expect("idle agent");
    let forwarder = CountingForwarder::start(ca.addr());
    set_ca_address(&idle, &forwarder.address);
    idle.restart()
        .expect("idle agent restarts on the forwarder");
    wait_until("the busy agent's entries issued", WAIT, || {
        all_fresh(&busy, ENTRIES, &BTreeSet::new())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&busy.log())));
    wait_until(
        "the idle agent connected through the forwarder",
        WAIT,
        || {
            all_fresh(&idle, 1, &BTreeSet::new())
                && idle.status_json().is_ok_and(|s| s["caConnected"] == true)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&idle.log())));

    // The holder dies; the busy agent's 20 s SVIDs all expire during the outage.
    ca.kill9();
    let down_at = Instant::now();
    let idle_before = forwarder.accepted();
    let old: BTreeSet<String> = identities(&busy)
        .into_iter()
        .filter_map(|(_, serial, _, _)| serial)
        .collect();
    wait_until("every short SVID expired and listed", OUTAGE, || {
        busy.status_json().is_ok_and(|s| {
            s["caUnreachableSince"].is_u64()
                && s["expiredWhileUnreachable"]
                    .as_array()
                    .is_some_and(|l| l.len() == ENTRIES)
        })
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&busy.log())));
    // What an operator sees meanwhile: readiness, metrics, and the files kept as expired.
    let (head, body) = admin_get(&busy.admin_socket(), "/readyz");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}\n{body}");
    assert!(
        body.contains("the CA holder is unreachable since")
            && body.contains("expired meanwhile: spiffe://mesh-a.test/short-0"),
        "{body}"
    );
    let (_, metrics) = admin_get(&busy.admin_socket(), "/metrics");
    let expired = metrics
        .lines()
        .filter(|l| l.starts_with("meshcert_agent_svid_expired_while_ca_unreachable{"))
        .count();
    assert_eq!(expired, ENTRIES, "{metrics}");
    assert!(
        metrics.contains(
            "meshcert_agent_svid_expired_while_ca_unreachable{spiffe_id=\"spiffe://mesh-a.test/short-0\"} 1"
        ),
        "{metrics}"
    );
    let folder = busy.volume_dir().join("short-0");
    let state = std::fs::read_to_string(folder.join("state")).expect("the state file");
    assert!(state.starts_with("EXPIRED "), "{state}");
    assert!(folder.join("svid.pem").exists(), "the last files stay");
    let idle_status = idle.status_json().expect("idle status");
    assert!(
        idle_status["expiredWhileUnreachable"].is_null(),
        "{idle_status}"
    );

    // The rest of the outage: the holder stays down that long (the point, not a wait).
    std::thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
    let idle_calls = forwarder.accepted() - idle_before;
    ca.restart().expect("the holder returns on its state");
    let back_at = Instant::now();
    // How soon is a figure, not an assertion here (tests run beside others, under load): the
    // bench's recovery scenario measures it (`bench/src/recovery.rs`), and the probe schedule
    // (2 to 4 s) is a property test of `reachability.rs`. This test asserts that the agent
    // recovers by itself, with every entry.
    let fresh = wait_until("every entry fresh after the return", WAIT, || {
        all_fresh(&busy, ENTRIES, &old)
    });
    let took = back_at.elapsed();
    fresh.unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&busy.log())));
    eprintln!(
        "{ENTRIES} expired entries fresh {:.2} s after the holder's return; the idle agent \
         opened {idle_calls} connections during the {OUTAGE:?} outage",
        took.as_secs_f64()
    );
    // Its normal schedule over 60 s: at most three syncs, three heartbeats and three JWKS
    // polls (30 s each, one at each edge of the window); probing every few seconds would have
    // been 15 or more, and a JWKS poll retrying at its pre-join pace another 30.
    assert!(
        idle_calls <= 9,
        "the idle agent contacted the holder {idle_calls} times during the outage; log:\n{}",
        tail(&idle.log())
    );
    assert!(
        !folder.join("state").exists(),
        "the expired state is cleared"
    );
    let status = busy.status_json().expect("status");
    assert!(status["caUnreachableSince"].is_null(), "{status}");
}

#[test]
fn a_refused_entry_backs_off_alone_and_is_no_outage() {
    // Two holder entries rotating every few seconds, and an agent-local entry the holder
    // refuses (ENABLED enforcement: policy_denied).
    let entries = format!(
        "{}{}",
        entry_yaml("fast-a", "node-1", "12s"),
        entry_yaml("fast-b", "node-1", "12s")
    );
    let ca = CaHolder::start(&format!("{EXAMPLE_CONFIG}{entries}")).expect("holder");
    let local = "entries:\n- id: tool\n  spiffeId: spiffe://mesh-a.test/node/node-1/tool\n  dir: tool\n  ttl: 1h\n";
    let agent = Agent::start(&ca, "node-1", MESH, local).expect("agent");
    let refused = |agent: &Agent| {
        agent.status_json().is_ok_and(|s| {
            s["identities"].as_array().is_some_and(|l| {
                l.iter().any(|i| {
                    i["entryId"] == "tool"
                        && i["state"] == "FAILED"
                        && i["lastError"]
                            .as_str()
                            .is_some_and(|e| e.contains("refused by the holder"))
                })
            })
        })
    };
    wait_until("the local entry refused", WAIT, || refused(&agent))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let serials = |agent: &Agent| -> BTreeSet<String> {
        identities(agent)
            .into_iter()
            .filter(|(id, ..)| id.starts_with("fast-"))
            .filter_map(|(_, serial, ..)| serial)
            .collect()
    };
    let mut seen = serials(&agent);
    let first = seen.clone();
    // The others keep rotating: three new serials each (six in all) while the refusal stands.
    wait_until("the other entries keep rotating", WAIT, || {
        seen.extend(serials(&agent));
        seen.difference(&first).count() >= 6
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let status = agent.status_json().expect("status");
    assert!(refused(&agent), "{status}");
    assert!(
        status["caUnreachableSince"].is_null() && status["caConnected"] == true,
        "a refusal is not an outage: {status}"
    );
    assert!(!agent.volume_dir().join("tool/svid.pem").exists());
}

#[test]
fn a_dead_holder_address_sends_the_agent_to_the_next_one() {
    let ca = CaHolder::start(&format!(
        "{EXAMPLE_CONFIG}{}",
        entry_yaml("svc", "ha-1", "1h")
    ))
    .expect("holder");
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_address = dead.local_addr().expect("address").to_string();
    drop(dead);
    // No token: the first launch stops at once; the config then lists the dead address first.
    let mut agent = Agent::spawn(&ca, "ha-1", MESH, "", None).expect("spawn");
    agent.wait_exit(WAIT).expect("exits without a token");
    set_ca_address(&agent, &format!("{dead_address},{}", ca.addr()));
    let token = ca.token("ha-1", MESH).expect("token");
    agent.relaunch(Some(&token)).expect("relaunch");
    agent.wait_joined().expect("joins through the live address");
    wait_until("the entry issued", WAIT, || {
        all_fresh(&agent, 1, &BTreeSet::new())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));
    let status = agent.status_json().expect("status");
    assert!(
        status["caUnreachableSince"].is_null() && status["caConnected"] == true,
        "{status}"
    );
    assert_eq!(
        status["caAddress"],
        format!("{dead_address},{}", ca.addr()),
        "{status}"
    );
    // `check-config` reads the list back.
    let out = meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-agent"))
            .args(["check-config", "--config"])
            .arg(agent.config_path()),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert!(out.status.success(), "{out:?}");
}
