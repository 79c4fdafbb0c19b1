//! Operating the agent the way operators do: scraped by Prometheus, probed by Kubernetes,
//! supervised by systemd (`NOTIFY_SOCKET` pointing at a datagram socket the test owns), and
//! logging JSON lines for a collector.
//!
//! The plain systemd lifecycles are elsewhere and not repeated here: the agent's READY,
//! RELOADING with MONOTONIC_USEC, READY, STOPPING and exit 0 in
//! `agent::systemd_hears_ready_reloading_and_stopping`, the holder's in
//! `ca::systemd_hears_ready_then_stopping` and
//! `virtualmesh::systemd_hears_reloading_with_monotonic_usec_then_ready`.

use std::fs::File;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};
use nix::sys::signal::Signal;

const NODE: &str = "node-1";
const MESH: &str = "mesh-a";
/// The labels of the example entry `web` in the agent's per-identity metrics.
const WEB: &str = r#"{spiffe_id="spiffe://mesh-a.test/web",entry_id="web"}"#;

/// The example holder config with `web`'s TTL set to `ttl`.
fn holder_config(ttl: &str) -> String {
    let text = EXAMPLE_CONFIG.replace(
        "    ttl: 1h\n    dir: web\n",
        &format!("    ttl: {ttl}\n    dir: web\n"),
    );
    assert!(
        text.contains(&format!("ttl: {ttl}")),
        "the example config changed shape"
    );
    text
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as f64
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One HTTP/1.1 exchange (`Connection: close`): the response head and body.
fn exchange(mut stream: impl std::io::Read + std::io::Write, path: &str) -> (String, String) {
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

/// `GET /metrics` from the plaintext listener, as Prometheus scrapes it.
fn scrape(address: &str) -> String {
    let stream = std::net::TcpStream::connect(address).expect("connect to metricsListen");
    stream
        .set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    let (head, body) = exchange(stream, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}

/// `GET path` on the agent's admin socket.
fn admin_get(socket: &Path, path: &str) -> (String, String) {
    let stream = UnixStream::connect(socket).expect("connect to the admin socket");
    stream
        .set_read_timeout(Some(meshcert_tests::COMMAND_TIMEOUT))
        .expect("read timeout");
    exchange(stream, path)
}

/// The value of the sample `name` + `labels` (`""` for none) in an exposition.
fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{labels} ");
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a number"))
}

#[test]
fn metrics_show_each_identity_expiry_rotations_and_a_holder_outage() {
    const TTL: f64 = 4.0;
    let mut ca = CaHolder::start(&holder_config("4s")).expect("holder");
    let agent = Agent::start(&ca, NODE, MESH, "metricsListen: 127.0.0.1:0\n").expect("agent");
    agent
        .wait_for_file(&agent.volume_dir().join("web/svid.pem"))
        .expect("issued");

    // Port 0 picks a free port; the status tells which.
    let status = agent.status_json().expect("status");
    let address = status["metricsAddress"]
        .as_str()
        .unwrap_or_else(|| panic!("no metricsAddress in {status}"))
        .to_owned();
    assert!(
        address.starts_with("127.0.0.1:") && !address.ends_with(":0"),
        "{address}"
    );

    // The per-identity expiry gauge appears once the SVID is installed.
    let mut text = String::new();
    wait_until("the expiry gauge of web", WAIT, || {
        text = scrape(&address);
        sample(&text, "meshcert_agent_svid_expiry_seconds", WEB).is_some()
    })
    .unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let t0 = now_unix();
    let left0 = sample(&text, "meshcert_agent_svid_expiry_seconds", WEB).expect("gauge");
    // Never more than the TTL left (whenever the scrape ran: under load the 4 s SVID may be
    // near its end, so no lower bound; the expiry moving later is asserted below).
    assert!(left0 <= TTL + 1.0, "{left0} s left:\n{text}");
    let rotations0 = sample(&text, "meshcert_agent_rotations_total", WEB).unwrap_or(0.0);
    for (name, check) in [
        ("meshcert_agent_ca_connected", 1.0),
        ("meshcert_agent_bundle_version", 1.0),
        ("meshcert_agent_signing_duration_seconds_count", 1.0),
    ] {
        let v = sample(&text, name, "").unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert!(v >= check, "{name} = {v}:\n{text}");
    }
    let node_left = sample(&text, "meshcert_agent_node_svid_expiry_seconds", "").expect("node");
    assert!(node_left > 0.0, "{text}");

    // The same metrics on the admin socket, for a node-local scraper without a port.
    let (head, body) = admin_get(&agent.admin_socket(), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        sample(&body, "meshcert_agent_svid_expiry_seconds", WEB).is_some(),
        "{body}"
    );

    // Rotations move the counter, and the expiry moves later with the new SVIDs (the holder
    // backdates by 10 s, so a 4 s SVID is due at once and the agent rotates back to back).
    let expiry0 = t0 + left0;
    let mut expiry1 = expiry0;
    wait_until("rotations and a later expiry", WAIT, || {
        text = scrape(&address);
        let t = now_unix();
        let rotated =
            sample(&text, "meshcert_agent_rotations_total", WEB).unwrap_or(0.0) >= rotations0 + 2.0;
        if let Some(left) = sample(&text, "meshcert_agent_svid_expiry_seconds", WEB) {
            expiry1 = t + left;
        }
        rotated && expiry1 > expiry0
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: expiry {expiry0} then {expiry1}:\n{text}\nagent log:\n{}",
            tail(&agent.log())
        )
    });
    assert_eq!(
        sample(&text, "meshcert_agent_rotation_failures_total", WEB),
        None,
        "no failures while the holder answers:\n{text}"
    );

    // The holder goes away: it shows as disconnected, since when; a holder outage is not a
    // failure of the identity (nothing is backed off, see the outage tests).
    ca.kill9();
    let killed = now_unix();
    wait_until("the outage shown", WAIT, || {
        text = scrape(&address);
        sample(&text, "meshcert_agent_ca_connected", "") == Some(0.0)
            && sample(&text, "meshcert_agent_ca_unreachable_since_seconds", "")
                .is_some_and(|t| t >= killed - 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{text}\nagent log:\n{}", tail(&agent.log())));
}

/// `meshcert-agent status --check <check>` against `socket`.
fn probe(socket: &Path, check: &str) -> Output {
    meshcert_tests::output_within(
        Command::new(meshcert_tests::bin_path("meshcert-agent"))
            .args(["status", "--check", check, "--admin-socket"])
            .arg(socket),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs")
}

#[test]
fn probes_tell_a_live_agent_from_a_ready_one() {
    let mut ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let token = ca.token(NODE, MESH).expect("token");
    // The holder is down while the agent starts: alive, not ready.
    ca.kill9();
    let mut agent = Agent::spawn(
        &ca,
        NODE,
        MESH,
        "rotation:\n  backoffMax: 2s\n",
        Some(&token),
    )
    .expect("agent");
    let socket = agent.admin_socket();
    wait_until("the admin socket", WAIT, || socket.exists())
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    let live = probe(&socket, "healthz");
    assert_eq!(live.status.code(), Some(0), "{live:?}");
    assert_eq!(String::from_utf8_lossy(&live.stdout), "ok\n");
    let ready = probe(&socket, "readyz");
    assert_eq!(ready.status.code(), Some(1), "{ready:?}");
    assert_eq!(
        String::from_utf8_lossy(&ready.stdout),
        "not ready: the node has no SVID yet (not joined)\n"
    );

    // The holder is back: the agent joins, issues, and turns ready.
    ca.restart().expect("holder restarts on its port");
    agent
        .wait_for_file(&agent.volume_dir().join("web/svid.pem"))
        .expect("issued");
    wait_until("readyz passes", WAIT, || {
        probe(&socket, "readyz").status.code() == Some(0)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    // Nobody behind the socket: the probe fails and says why on stderr.
    assert_eq!(agent.terminate().expect("stops").code(), Some(0));
    let gone = probe(&socket, "healthz");
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("admin socket"),
        "{gone:?}"
    );
}

/// Everything systemd has been told so far, in order.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits until a message containing `what` arrives after message number `after`; its index.
    fn wait_for(&mut self, what: &str, after: usize) -> usize {
        let found = |seen: &[String]| {
            seen.iter()
                .enumerate()
                .skip(after)
                .find(|(_, m)| m.contains(what))
                .map(|(i, _)| i)
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = found(&self.seen) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after message {after}: {:?}",
                self.seen
            );
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

/// The `MONOTONIC_USEC=` value of a notification.
fn monotonic_usec(message: &str) -> u64 {
    message
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {message:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number")
}

#[test]
fn a_broken_reload_still_tells_systemd_ready_and_keeps_serving() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("notify.sock");
    let mut notify = Notifications::bind(&path);
    let token = ca.token(NODE, MESH).expect("token");
    let notify_socket = path.display().to_string();
    let mut agent = Agent::spawn_with_env(
        &ca,
        NODE,
        MESH,
        "",
        Some(&token),
        &[("NOTIFY_SOCKET", notify_socket.as_str())],
    )
    .expect("agent");
    let ready = notify.wait_for("READY=1", 0);
    let pair = agent.volume_dir().join("web/svid.pem");
    assert!(pair.exists(), "READY before the SVID is on disk");
    let before = std::fs::read(&pair).expect("read the SVID");

    // A broken edit, then SIGHUP (twice): each reload is RELOADING=1 with a later
    // MONOTONIC_USEC, then READY=1 again, or systemd would wait in "reloading" forever.
    let config = std::fs::read_to_string(agent.config_path()).expect("config");
    std::fs::write(
        agent.config_path(),
        format!("{config}rotation: {{fraction: 2}}\n"),
    )
    .expect("break the config");
    let mut after = ready + 1;
    let mut stamps = Vec::new();
    for _ in 0..2 {
        agent.signal(Signal::SIGHUP).expect("SIGHUP");
        let reloading = notify.wait_for("RELOADING=1", after);
        stamps.push(monotonic_usec(&notify.seen[reloading]));
        after = notify.wait_for("READY=1", reloading + 1) + 1;
    }
    assert!(stamps[0] > 0 && stamps[1] > stamps[0], "{stamps:?}");
    assert!(
        meshcert_tests::log_has_event(
            &agent.log(),
            "meshcert_agent",
            "the new configuration is invalid; keeping the running one",
        ),
        "log:\n{}",
        tail(&agent.log())
    );
    assert!(agent.try_exit().expect("status").is_none(), "still running");
    assert_eq!(
        probe(&agent.admin_socket(), "readyz").status.code(),
        Some(0)
    );
    assert_eq!(std::fs::read(&pair).expect("read the SVID"), before);

    agent.signal(Signal::SIGTERM).expect("SIGTERM");
    notify.wait_for("STOPPING=1", after);
    assert_eq!(agent.wait_exit(WAIT).expect("exits").code(), Some(0));
}

/// Every line of `log` as a JSON object (panics on the first line that is not one).
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\nlog:\n{log}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "no timestamp or level: {l}"
            );
            assert!(v["fields"]["message"].is_string(), "no message: {l}");
            v
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line_and_text_is_the_default() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let token = ca.token(NODE, MESH).expect("token");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let config = root.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "caAddress: {}\ncaServerName: localhost\ntrustBundle: {}\nnodeName: {NODE}\nmesh: {MESH}\n\
             stateDir: {}\nvolumeDir: {}\nworkloadSocket: {}\nadminSocket: {}\n",
            ca.addr(),
            ca.bundle_pem_path().display(),
            root.join("state").display(),
            root.join("svids").display(),
            root.join("workload.sock").display(),
            root.join("admin.sock").display(),
        ),
    )
    .expect("write the config");
    let log_path = root.join("agent.log");
    let agent = |args: &[&str], stderr: Stdio| {
        let mut cmd = Command::new(meshcert_tests::bin_path("meshcert-agent"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("MESHCERT_JOIN_TOKEN")
            .env_remove("MESHCERT_JOIN_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        cmd
    };
    let config_arg = config.display().to_string();
    let token_arg = format!("--join-token={token}");
    let mut running = meshcert_tests::ChildGuard::spawn(&mut agent(
        &[
            "run",
            "--log-format",
            "json",
            "--config",
            &config_arg,
            &token_arg,
        ],
        Stdio::from(File::create(&log_path).expect("log file")),
    ))
    .expect("start the agent");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let svid = root.join("svids/web/svid.pem");
    wait_until("the SVID", WAIT, || svid.exists())
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(running.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = running
        .wait_within(meshcert_tests::COMMAND_TIMEOUT)
        .expect("exits");
    assert_eq!(status.code(), Some(0), "log:\n{}", log());

    let lines = json_lines(&log());
    let installed = lines
        .iter()
        .find(|v| v["fields"]["message"] == "SVID installed");
    let installed = installed.unwrap_or_else(|| panic!("no install logged:\n{}", log()));
    assert_eq!(installed["level"], "INFO");
    assert_eq!(installed["fields"]["spiffe_id"], "spiffe://mesh-a.test/web");
    assert!(lines.iter().any(|v| v["fields"]["message"] == "stopped"));

    // An invalid config: exit 78 either way, for people by default, JSON on request.
    let bad = root.join("bad.yaml");
    std::fs::write(&bad, "caAddress: nope\n").expect("write");
    let bad_arg = bad.display().to_string();
    let text = meshcert_tests::output_within(
        &mut agent(&["run", "--config", &bad_arg], Stdio::piped()),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(text.status.code(), Some(78), "{text:?}");
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.contains("ERROR") && stderr.contains("caAddress"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "text logs by default:\n{stderr}"
    );
    let json = meshcert_tests::output_within(
        &mut agent(
            &["--log-format", "json", "run", "--config", &bad_arg],
            Stdio::piped(),
        ),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("runs");
    assert_eq!(json.status.code(), Some(78), "{json:?}");
    let lines = json_lines(&String::from_utf8_lossy(&json.stderr));
    assert!(
        lines.iter().any(|v| v["level"] == "ERROR"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("caAddress"))),
        "{lines:?}"
    );
}

const DAY: u64 = 86400;

/// Facts of a DER certificate: (serial hex, not-before, not-after) in Unix seconds.
fn cert_facts(der: &[u8]) -> (String, u64, u64) {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    let at = |t: i64| u64::try_from(t).expect("after 1970");
    (
        c.raw_serial_as_string(),
        at(c.validity().not_before.timestamp()),
        at(c.validity().not_after.timestamp()),
    )
}

/// Joins `node` at the holder's time (`offset` ahead of the real clock): its mTLS identity.
fn join_at(ca: &CaHolder, node: &str, offset: Duration) -> meshcert_tests::ca::ClientIdentity {
    use meshcert_protocol::api::{AttestRequest, NodeSvidResponse};
    use meshcert_tests::pki::{csr, p256};
    let key = p256();
    let req = AttestRequest {
        token: ca.token(node, MESH).expect("token"),
        csr: csr(&key, &[]),
    };
    let body = serde_json::to_vec(&req).expect("json");
    let a = ca
        .https_at("POST", "/v1/attest", Some(&body), None, offset)
        .expect("attest");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: NodeSvidResponse = serde_json::from_slice(&a.body).expect("answer");
    meshcert_tests::ca::ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    }
}

/// Renews the node SVID the way an agent does, at the holder's time.
fn renew_at(
    ca: &CaHolder,
    node: &meshcert_tests::ca::ClientIdentity,
    offset: Duration,
) -> meshcert_tests::ca::ClientIdentity {
    use meshcert_protocol::api::{NodeSvidResponse, RenewRequest};
    use meshcert_tests::pki::{csr, p256};
    let key = p256();
    let body = serde_json::to_vec(&RenewRequest {
        csr: csr(&key, &[]),
    })
    .expect("json");
    let a = ca
        .https_at("POST", "/v1/node/renew", Some(&body), Some(node), offset)
        .unwrap_or_else(|e| panic!("renew at +{}d: {e}\n{}", offset.as_secs() / DAY, ca.log()));
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let resp: NodeSvidResponse = serde_json::from_slice(&a.body).expect("answer");
    meshcert_tests::ca::ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    }
}

#[test]
fn the_holder_renews_its_server_certificate_at_half_life_and_nodes_keep_syncing_past_day_90() {
    // Only the holder's wall clock moves (libfaketime); the test's client is a node living at
    // the holder's time: it verifies the server certificate at that time and renews its node
    // SVID (30 days here) at every step, as an agent would.
    let config = EXAMPLE_CONFIG
        .replace("ttlDays: 30", "ttlDays: 400")
        .replace(
            "  heartbeat: 30s\n",
            "  heartbeat: 30s\n  nodeSvidTtl: 30d\n  metricsListen: 127.0.0.1:0\n",
        );
    assert!(
        config.contains("nodeSvidTtl"),
        "the example config changed shape"
    );
    let ca = CaHolder::start_with_fake_clock(&config).expect("holder");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", ca.pid().expect("pid")))
        .unwrap_or_default();
    assert!(
        maps.contains("libfaketime"),
        "libfaketime is not loaded into the holder"
    );
    let metrics = ca.status().expect("status")["metricsAddress"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let mut node = join_at(&ca, NODE, Duration::ZERO);
    let a = ca
        .https_at("GET", "/v1/sync", None, Some(&node), Duration::ZERO)
        .expect("sync");
    assert_eq!(a.status, 200);
    let first = cert_facts(&a.server_cert);
    let life = first.2 - first.1;
    assert!(life >= 89 * DAY, "a 90-day server certificate: {first:?}");
    let status = ca.status().expect("status");
    let shown = &status["certificateStatus"]["serverCertificate"];
    assert_eq!(
        shown["notAfter"]
            .as_str()
            .map(|t| humantime::parse_rfc3339(t).expect("rfc3339")),
        Some(UNIX_EPOCH + Duration::from_secs(first.2)),
        "{status:#}"
    );
    assert_eq!(
        sample(
            &scrape(&metrics),
            "meshcert_ca_server_certificate_expiry_timestamp_seconds",
            ""
        ),
        Some(first.2 as f64)
    );

    let half = life / 2;
    let mut renewed = None;
    for offset in [
        14 * DAY,
        28 * DAY,
        42 * DAY,
        half + 60,
        56 * DAY,
        70 * DAY,
        84 * DAY,
        91 * DAY,
        100 * DAY,
    ] {
        ca.set_clock_offset(offset)
            .expect("move the holder's clock");
        let shift = Duration::from_secs(offset);
        let holder_now = now_unix() as u64 + offset;
        // The holder's renewal check (every few seconds) has caught up with the jump: no
        // intermediate is past half-life, nor the server certificate.
        ca.wait_for_status("renewals caught up", |s| {
            let c = &s["certificateStatus"];
            let end = |v: &serde_json::Value| {
                v.as_str()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs())
            };
            let renew_at = end(&c["serverCertificate"]["renewAt"]);
            c["intermediates"].as_array().is_some_and(|l| {
                l.iter()
                    .all(|i| end(&i["notAfter"]) > holder_now + 15 * DAY - 60)
            }) && renew_at > holder_now
        })
        .unwrap_or_else(|e| panic!("+{}d: {e}", offset / DAY));
        node = renew_at(&ca, &node, shift);
        let a = ca
            .https_at("GET", "/v1/sync", None, Some(&node), shift)
            .unwrap_or_else(|e| panic!("sync at +{}d: {e}", offset / DAY));
        assert_eq!(a.status, 200, "sync at +{}d", offset / DAY);
        let served = cert_facts(&a.server_cert);
        if offset < half {
            assert_eq!(
                served.0,
                first.0,
                "renewed before half-life (+{}d)",
                offset / DAY
            );
        } else {
            assert_ne!(
                served.0,
                first.0,
                "the first certificate at +{}d",
                offset / DAY
            );
            assert!(
                served.2 > holder_now + 45 * DAY - 60,
                "{served:?} at +{}d",
                offset / DAY
            );
            renewed.get_or_insert(served.clone());
        }
        let exposed = sample(
            &scrape(&metrics),
            "meshcert_ca_server_certificate_expiry_timestamp_seconds",
            "",
        );
        assert_eq!(exposed, Some(served.2 as f64), "+{}d", offset / DAY);
    }
    // Renewed at half-life: within minutes of the holder's time once half of the life had
    // passed, not later.
    let (_, renewed_from, _) = renewed.expect("renewed");
    assert!(
        renewed_from <= first.1 + half + 10 * 60,
        "renewed {}s after half-life",
        renewed_from.saturating_sub(first.1 + half)
    );
    assert!(
        meshcert_tests::log_has_event(&ca.log(), "meshcert_ca", "server certificate renewed"),
        "{}",
        tail(&ca.log())
    );
    let status = ca.status().expect("status");
    assert_eq!(
        status["certificateStatus"]["state"], "ACCEPTED",
        "{status:#}"
    );
}

#[test]
fn expired_issuances_are_pruned_past_the_retention_and_still_counted() {
    let config =
        EXAMPLE_CONFIG.replace("  heartbeat: 30s\n", "  heartbeat: 30s\n  retention: 1d\n");
    assert!(
        config.contains("retention"),
        "the example config changed shape"
    );
    let mut ca = CaHolder::start_with_fake_clock(&config).expect("holder");
    let _node = join_at(&ca, NODE, Duration::ZERO);
    let _other = join_at(&ca, "node-2", Duration::ZERO);
    let listed = |ca: &CaHolder| {
        let out = ca.ctl(&["issuances", "-o", "json"]).expect("ctl");
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        list.as_array().map_or(0, Vec::len)
    };
    assert_eq!(listed(&ca), 2);
    // Two days on, the node SVIDs (24 h) are still within a day of retention: kept.
    ca.set_clock_offset(DAY + 3600).expect("clock");
    ca.restart().expect("restart");
    assert_eq!(listed(&ca), 2, "{}", tail(&ca.log()));
    // Past expiry plus the retention: pruned at start, still counted in svidsIssued.
    ca.set_clock_offset(2 * DAY + 3600).expect("clock");
    ca.restart().expect("restart");
    wait_until("the expired issuances pruned", WAIT, || listed(&ca) == 0)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&ca.log())));
    assert_eq!(
        ca.status().expect("status")["certificateStatus"]["svidsIssued"],
        2
    );
    assert!(
        meshcert_tests::log_has_event(&ca.log(), "meshcert_ca", "pruned expired records"),
        "{}",
        tail(&ca.log())
    );
}
