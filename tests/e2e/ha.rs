//! High availability end to end: real `meshcert-ca` replicas on one throwaway PostgreSQL
//! cluster (started per test, `initdb` + `pg_ctl` as an unprivileged user). Any replica serves
//! any call; a token is used once across replicas; a replica killed mid-storm loses no
//! acknowledged issuance and the agent rotates through the survivor; a database restart fails
//! calls retryably, then they succeed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshcert_protocol::api::{
    ApiError, AttestRequest, CsrRequest, ErrorCode, NodeSvidResponse, SignOutcome, SignRequest,
    SignResponse, SyncResponse,
};
use meshcert_tests::agent::{Agent, WAIT, wait_until};
use meshcert_tests::ca::{CaHolder, ClientIdentity, EXAMPLE_CONFIG, HttpAnswer};
use meshcert_tests::pki::{csr, p256};
use meshcert_tests::postgres::{Cluster, replica_config, write_kek};

mod keys;

const MESH: &str = "mesh-a";

/// A PostgreSQL cluster with one database and a key-encryption key: what replicas share.
struct Shared {
    pg: Cluster,
    url: String,
    keys: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        let pg = Cluster::start();
        let url = pg.create_database("meshcert");
        let keys = tempfile::tempdir().expect("tmp");
        write_kek(&keys.path().join("kek")).expect("kek");
        Shared { pg, url, keys }
    }

    fn config(&self, entries: &str) -> String {
        replica_config(
            &format!("{EXAMPLE_CONFIG}{entries}"),
            &self.url,
            &self.keys.path().join("kek"),
        )
    }

    /// Starts `n` replicas at the same instant.
    fn replicas(&self, n: usize, entries: &str) -> Vec<CaHolder> {
        let config = self.config(entries);
        std::thread::scope(|s| {
            let starting: Vec<_> = (0..n)
                .map(|_| s.spawn(|| CaHolder::start(&config)))
                .collect();
            starting
                .into_iter()
                .map(|t| t.join().expect("thread").expect("replica starts"))
                .collect()
        })
    }
}

/// An entry for `node` with `ttl`, selected by this process's uid.
fn entry_yaml(id: &str, node: &str, ttl: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!(
        "  - id: {id}\n    spiffeId: spiffe://mesh-a.test/{id}\n    nodes: [{node}]\n    selectors: [\"unix:uid:{uid}\"]\n    ttl: {ttl}\n    dir: {id}\n"
    )
}

fn body<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialise")
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

/// Attests through `ca` with `token`; the node's identity on success.
fn attest(ca: &CaHolder, token: &str) -> Result<ClientIdentity, ApiError> {
    let key = p256();
    let req = AttestRequest {
        token: token.to_owned(),
        csr: csr(&key, &[]),
    };
    let a = ca
        .https("POST", "/v1/attest", Some(&body(&req)), None)
        .expect("attest call");
    if a.status != 200 {
        return Err(api_error(&a));
    }
    let resp: NodeSvidResponse = serde_json::from_slice(&a.body).expect("node SVID answer");
    Ok(ClientIdentity {
        chain: resp.svid.chain.iter().map(|d| d.0.clone()).collect(),
        key_pkcs8: key.serialize_der(),
    })
}

/// Signs one CSR for `entry` through `ca`; the issued chain (leaf first).
fn sign_chain(ca: &CaHolder, node: &ClientIdentity, entry: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let id = format!("spiffe://mesh-a.test/{entry}");
    let req = SignRequest {
        csrs: vec![CsrRequest {
            entry_id: entry.into(),
            csr: csr(&p256(), &[&id]),
            local: None,
        }],
    };
    let a = ca.https("POST", "/v1/sign", Some(&body(&req)), Some(node))?;
    anyhow::ensure!(a.status == 200, "{:?}", api_error(&a));
    let signed: SignResponse = serde_json::from_slice(&a.body)?;
    let Some(SignOutcome::Issued { svid, .. }) = signed.results.first().map(|r| &r.outcome) else {
        anyhow::bail!("refused: {:?}", signed.results);
    };
    Ok(svid.chain.iter().map(|d| d.0.clone()).collect())
}

/// Signs one CSR for `entry` through `ca`; the issued serial (lowercase hex).
fn sign(ca: &CaHolder, node: &ClientIdentity, entry: &str) -> anyhow::Result<String> {
    let chain = sign_chain(ca, node, entry)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0])?;
    Ok(cert.raw_serial_as_string().replace(':', "").to_lowercase())
}

/// Every serial the replica's datastore recorded.
fn recorded_serials(ca: &CaHolder) -> BTreeSet<String> {
    let out = ca.ctl(&["issuances", "-o", "json"]).expect("issuances");
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    list.as_array()
        .expect("a list")
        .iter()
        .filter_map(|i| {
            i["serial"]
                .as_str()
                .map(|s| s.trim_start_matches('0').to_owned())
        })
        .collect()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[test]
fn replicas_started_at_once_migrate_once_and_share_one_root() {
    let shared = Shared::new();
    let replicas = shared.replicas(3, "");
    let version = shared
        .pg
        .psql_in("meshcert", "SELECT version FROM schema_version");
    assert_eq!(version, "1", "one migration, run once");
    let rows = shared
        .pg
        .psql_in("meshcert", "SELECT COUNT(*) FROM schema_version");
    assert_eq!(rows, "1");
    let roots: Vec<Vec<u8>> = replicas
        .iter()
        .map(|r| std::fs::read(r.bundle_pem_path()).expect("root"))
        .collect();
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "one root for all replicas"
    );
    let sealed = shared.pg.psql_in(
        "meshcert",
        "SELECT position('PRIVATE KEY'::bytea IN value) FROM documents WHERE name = 'builtin-root'",
    );
    assert_eq!(
        sealed, "0",
        "the database never holds the root key in clear"
    );
}

#[test]
fn a_node_joins_through_one_replica_and_syncs_and_signs_through_the_other() {
    let shared = Shared::new();
    let replicas = shared.replicas(2, "");
    let (a, b) = (&replicas[0], &replicas[1]);
    let token = a.token("node-1", MESH).expect("token");
    let node = attest(a, &token).expect("joined through A");
    // B accepts a node SVID that A's own intermediate signed.
    let answer = b.https("GET", "/v1/sync", None, Some(&node)).expect("sync");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let sync: SyncResponse = serde_json::from_slice(&answer.body).expect("sync answer");
    assert_eq!(sync.node, "node-1");
    assert_eq!(sync.entries.len(), 1);
    let serial = sign(b, &node, "web").expect("signed through B");
    assert!(
        recorded_serials(a).contains(serial.trim_start_matches('0')),
        "A sees B's issuance"
    );
    // The node, its issuance and the bundle version read the same from either replica.
    let status = |ca: &CaHolder| {
        let s = ca.status().expect("status");
        (s["bundleVersion"].clone(), s["nodes"].clone())
    };
    assert_eq!(status(a), status(b));
    assert_eq!(recorded_serials(a), recorded_serials(b));
    // Banned through B: refused by A.
    let out = b.ctl(&["node", "ban", "node-1"]).expect("ban");
    assert!(out.status.success(), "{out:?}");
    let answer = a.https("GET", "/v1/sync", None, Some(&node)).expect("sync");
    assert_eq!(api_error(&answer).code, ErrorCode::NodeBanned);
}

#[test]
fn one_token_presented_to_both_replicas_at_once_is_accepted_once() {
    let shared = Shared::new();
    let replicas = shared.replicas(2, "");
    for round in 0..5 {
        let node = format!("node-{round}");
        let token = replicas[0].token(&node, MESH).expect("token");
        let outcomes: Vec<Result<ClientIdentity, ApiError>> = std::thread::scope(|s| {
            let calls: Vec<_> = replicas
                .iter()
                .map(|r| s.spawn(|| attest(r, &token)))
                .collect();
            calls
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect()
        });
        let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(accepted, 1, "round {round}");
        for o in &outcomes {
            if let Err(e) = o {
                assert_eq!(e.code, ErrorCode::TokenUsed, "{}", e.message);
            }
        }
    }
}

#[test]
fn a_replica_killed_during_a_signing_storm_loses_nothing_acknowledged() {
    let shared = Shared::new();
    let entries: String = (0..3)
        .map(|i| entry_yaml(&format!("svc-{i}"), "ha-1", "12s"))
        .chain(std::iter::once(entry_yaml("storm", "storm-1", "1h")))
        .collect();
    let mut replicas = shared.replicas(2, &entries);
    // The agent lists both replicas, the first one first: it talks to the one killed below.
    let agent_addresses = format!(
        "caAddress: \"{},{}\"\n",
        replicas[0].addr(),
        replicas[1].addr()
    );
    let token = replicas[0].token("ha-1", MESH).expect("token");
    let mut agent =
        Agent::spawn(&replicas[0], "ha-1", MESH, "", Some(&token)).expect("spawn the agent");
    agent
        .wait_joined()
        .expect("joined through the first replica");
    let config = std::fs::read_to_string(agent.config_path()).expect("config");
    let config: String = config
        .lines()
        .map(|l| {
            if l.starts_with("caAddress:") {
                agent_addresses.clone()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(agent.config_path(), config).expect("config");
    agent.restart().expect("restart with both addresses");
    agent.wait_joined().expect("joined");
    let serials = |agent: &Agent| -> BTreeSet<String> {
        let status = agent.status_json().unwrap_or_default();
        status["identities"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|i| i["serial"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("three entries issued", WAIT, || serials(&agent).len() >= 3)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", tail(&agent.log())));

    // The storm: a second node signs as fast as it can through the first replica.
    let storm_token = replicas[0].token("storm-1", MESH).expect("token");
    let storm_node = attest(&replicas[0], &storm_token).expect("storm node joins");
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let storm = {
            let (first, acknowledged, stop) = (&replicas[0], &acknowledged, &stop);
            let node = storm_node.clone();
            s.spawn(move || {
                let mut failures = 0;
                while !stop.load(Ordering::SeqCst) && failures < 3 {
                    match sign(first, &node, "storm") {
                        Ok(serial) => acknowledged.lock().expect("lock").push(serial),
                        Err(_) => failures += 1,
                    }
                }
            })
        };
        wait_until("a storm under way", WAIT, || {
            acknowledged.lock().expect("lock").len() >= 20
        })
        .expect("the storm signs");
        let pid = replicas[0].pid().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        stop.store(true, Ordering::SeqCst);
        storm.join().expect("storm thread");
    });
    replicas[0].kill9();
    let acknowledged = acknowledged.lock().expect("lock").clone();
    let recorded = recorded_serials(&replicas[1]);
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|s| !recorded.contains(s.trim_start_matches('0')))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged issuances lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    // The agent's identities keep rotating through the survivor.
    let before = serials(&agent);
    let mut seen = BTreeSet::new();
    wait_until(
        "every entry rotated through the survivor",
        Duration::from_secs(90),
        || {
            seen.extend(serials(&agent).difference(&before).cloned());
            seen.len() >= 3
        },
    )
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", tail(&agent.log())));
    let survivor = recorded_serials(&replicas[1]);
    for serial in &seen {
        assert!(
            survivor.contains(serial.trim_start_matches('0')),
            "{serial} was signed by the survivor and recorded"
        );
    }
}

#[test]
fn a_database_restart_fails_calls_retryably_and_they_succeed_on_retry() {
    let shared = Shared::new();
    let replicas = shared.replicas(1, "");
    let ca = &replicas[0];
    shared.pg.stop();
    let Err(err) = attest(ca, "not-a-token") else {
        panic!("joined with no database");
    };
    assert_eq!(err.code, ErrorCode::Unavailable, "{}", err.message);
    assert!(err.code.is_retryable());
    shared.pg.restart();
    // The same call, retried, reaches the database again: now refused for what it is.
    let mut last = None;
    wait_until("the holder reconnects", WAIT, || {
        let Err(e) = attest(ca, "not-a-token") else {
            panic!("joined with an unknown token");
        };
        let done = e.code == ErrorCode::InvalidToken;
        last = Some(e);
        done
    })
    .unwrap_or_else(|e| panic!("{e}: {last:?}; log:\n{}", tail(&ca.log())));
    let token = ca.token("node-1", MESH).expect("token after the restart");
    attest(ca, &token).expect("joins after the restart");
}

/// Pushed changes across replicas: an agent watches replica B only, with its interval sync an
/// hour away, so only a push can deliver; entries created and deleted through replica A reach
/// it (the change version lives in the shared datastore, and B follows it).
#[test]
fn an_entry_created_through_one_replica_reaches_an_agent_watching_the_other() {
    let shared = Shared::new();
    let replicas = shared.replicas(2, &entry_yaml("seed", "push-1", "1h"));
    let (a, b) = (&replicas[0], &replicas[1]);
    let agent = Agent::start(b, "push-1", MESH, "syncInterval: 1h\n").expect("joins through B");
    let volume = agent.volume_dir();
    agent
        .wait_for_file(&volume.join("seed").join("svid.pem"))
        .expect("the seed entry is issued through B");

    let uid = nix::unistd::geteuid().as_raw().to_string();
    let out = a
        .ctl(&[
            "entry",
            "create",
            "--id",
            "pushed",
            "--spiffe-id",
            "spiffe://mesh-a.test/pushed",
            "--node",
            "push-1",
            "--selector",
            &format!("unix:uid:{uid}"),
            "--dir",
            "pushed",
        ])
        .expect("entry create through A");
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_for_file(&volume.join("pushed").join("svid.pem"))
        .unwrap_or_else(|e| {
            panic!(
                "{e}; agent log:\n{}\nreplica B log:\n{}",
                tail(&agent.log()),
                tail(&b.log())
            )
        });

    let out = a
        .ctl(&["entry", "delete", "pushed"])
        .expect("entry delete through A");
    assert!(out.status.success(), "{out:?}");
    wait_until("the deleted entry's folder removed", WAIT, || {
        !volume.join("pushed").exists()
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", tail(&agent.log())));
    assert!(
        volume.join("seed").join("svid.pem").exists(),
        "the other entry stays"
    );
}
