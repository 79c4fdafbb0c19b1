//! The datastore tests every back end passes: each test is a function of a `&dyn Store`, run
//! once on SQLite in a temporary folder and once on a throwaway PostgreSQL database
//! ([`throwaway_pg`](super::throwaway_pg)).

use std::sync::{Arc, Mutex, Weak};

use meshcert_protocol::Entry;

use super::throwaway_pg::Cluster;
use super::{
    Issuance, KubernetesNodeOutcome, NodeRecord, PostgresStore, Pruned, SqliteStore, Store,
    TokenOutcome, TokenRecord,
};

/// A store under test and what keeps it alive.
pub(crate) struct Fixture {
    pub(crate) store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _cluster: Option<Arc<Cluster>>,
}

pub(crate) fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("db")).expect("open"));
    Fixture {
        store,
        _dir: Some(dir),
        _cluster: None,
    }
}

/// The cluster the tests running now share; started by the first, stopped after the last.
pub(crate) fn cluster() -> Arc<Cluster> {
    static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = shared.upgrade() {
        return c;
    }
    let c = Arc::new(Cluster::start());
    *shared = Arc::downgrade(&c);
    c
}

/// A fresh database on the shared cluster.
pub(crate) fn postgres_database() -> (Arc<Cluster>, String) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let cluster = cluster();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let url = cluster.create_database(&format!("t{n}"));
    (cluster, url)
}

pub(crate) fn postgres() -> Fixture {
    let (cluster, url) = postgres_database();
    let store = Arc::new(PostgresStore::open(&url).expect("open"));
    Fixture {
        store,
        _dir: None,
        _cluster: Some(cluster),
    }
}

/// Instantiates each listed test for SQLite and PostgreSQL.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $name() { super::$name(&*super::sqlite().store) })*
        }
        mod on_postgres {
            $(#[test] fn $name() { let f = super::postgres(); super::$name(&*f.store) })*
        }
    };
}

both_backends!(
    tokens_are_consumed_once,
    kubernetes_nodes_attest_again_but_never_take_another_nodes_name,
    the_bundle_version_grows_only_when_the_content_changes,
    issuances_keep_the_local_marker,
    pruning_removes_what_expired_before_the_cut_and_keeps_the_count,
    entries_are_found_by_id_and_by_spiffe_id,
    reports_replace_the_previous_one,
    documents_are_written_only_over_the_revision_read,
    every_write_nodes_sync_grows_the_change_version,
);

fn id(n: &str, m: &str) -> String {
    format!("spiffe://{m}.test/meshcert/node/{n}")
}

fn token(hash: &str, expires_at: u64) -> TokenRecord {
    TokenRecord {
        hash: hash.into(),
        node: "node-1".into(),
        mesh: "mesh-a".into(),
        expires_at,
    }
}

fn tokens_are_consumed_once(s: &dyn Store) {
    s.create_token(&token("h", 100)).expect("create");
    s.create_token(&token("old", 10)).expect("create");
    assert_eq!(
        s.consume_token("nope", 50, &id).expect("q"),
        TokenOutcome::Unknown
    );
    assert_eq!(
        s.consume_token("old", 50, &id).expect("q"),
        TokenOutcome::Expired
    );
    assert_eq!(
        s.consume_token("h", 50, &id).expect("q"),
        TokenOutcome::Consumed {
            node: "node-1".into(),
            mesh: "mesh-a".into()
        }
    );
    assert_eq!(
        s.consume_token("h", 51, &id).expect("q"),
        TokenOutcome::Used
    );
    assert_eq!(s.token_used("h").expect("q"), Some(true));
    let n = s.node("node-1").expect("q").expect("registered");
    assert_eq!(n.spiffe_id, "spiffe://mesh-a.test/meshcert/node/node-1");
    assert!(!n.banned);
    assert!(s.ban_node("node-1").expect("ban"));
    assert!(s.node("node-1").expect("q").expect("n").banned);
    assert!(!s.ban_node("ghost").expect("ban"));
    assert_eq!(s.nodes().expect("nodes").len(), 1);
}

fn kubernetes_nodes_attest_again_but_never_take_another_nodes_name(s: &dyn Store) {
    let record = |name: &str, cluster: &str, mesh: &str| NodeRecord {
        name: name.into(),
        mesh: mesh.into(),
        spiffe_id: format!("spiffe://{mesh}.test/meshcert/node/{name}"),
        first_seen: 10,
        banned: false,
        cluster: Some(cluster.into()),
    };
    let east = record("east.w1", "east", "mesh-a");
    assert_eq!(
        s.attest_kubernetes_node(&east).expect("q"),
        KubernetesNodeOutcome::Registered
    );
    assert_eq!(
        s.attest_kubernetes_node(&east).expect("again"),
        KubernetesNodeOutcome::Registered
    );
    let n = s.node("east.w1").expect("q").expect("registered");
    assert_eq!(n.cluster.as_deref(), Some("east"));
    assert_eq!(
        s.attest_kubernetes_node(&record("east.w1", "west", "mesh-a"))
            .expect("q"),
        KubernetesNodeOutcome::Taken {
            cluster: Some("east".into()),
            mesh: "mesh-a".into()
        }
    );
    s.create_token(&TokenRecord {
        node: "vm-1".into(),
        ..token("h", 100)
    })
    .expect("token");
    s.consume_token("h", 50, &id).expect("join");
    assert!(matches!(
        s.attest_kubernetes_node(&record("vm-1", "east", "mesh-a"))
            .expect("q"),
        KubernetesNodeOutcome::Taken { cluster: None, .. }
    ));
    assert!(s.ban_node("east.w1").expect("ban"));
    assert_eq!(
        s.attest_kubernetes_node(&east).expect("q"),
        KubernetesNodeOutcome::Banned
    );
}

fn the_bundle_version_grows_only_when_the_content_changes(s: &dyn Store) {
    assert_eq!(s.settle_bundle_version("a").expect("v"), 1);
    assert_eq!(s.settle_bundle_version("a").expect("v"), 1);
    assert_eq!(s.settle_bundle_version("b").expect("v"), 2);
    assert_eq!(s.settle_bundle_version("b").expect("v"), 2);
    assert_eq!(s.settle_bundle_version("a").expect("v"), 3);
}

fn issuances_keep_the_local_marker(s: &dyn Store) {
    let i = Issuance {
        serial: "01".into(),
        spiffe_id: "spiffe://a.test/x".into(),
        node: "n".into(),
        not_after: 10,
        issued_at: 1,
        local: true,
    };
    s.record_issuances(std::slice::from_ref(&i))
        .expect("record");
    assert_eq!(s.issuances().expect("list"), vec![i]);
    assert_eq!(s.issuance_count().expect("count"), 1);
}

fn pruning_removes_what_expired_before_the_cut_and_keeps_the_count(s: &dyn Store) {
    let issued = |serial: &str, not_after: u64| Issuance {
        serial: serial.into(),
        spiffe_id: "spiffe://a.test/x".into(),
        node: "n".into(),
        not_after,
        issued_at: 1,
        local: false,
    };
    s.record_issuances(&[issued("01", 100), issued("02", 200), issued("03", 300)])
        .expect("record");
    s.create_token(&token("spent", 150)).expect("token");
    s.create_token(&token("fresh", 500)).expect("token");
    assert!(matches!(
        s.consume_token("spent", 120, &id).expect("q"),
        TokenOutcome::Consumed { .. }
    ));
    assert_eq!(s.issuance_count().expect("count"), 3);
    assert_eq!(
        s.prune(250).expect("prune"),
        Pruned {
            issuances: 2,
            tokens: 1
        }
    );
    let left: Vec<String> = s
        .issuances()
        .expect("list")
        .into_iter()
        .map(|i| i.serial)
        .collect();
    assert_eq!(left, vec!["03".to_owned()]);
    assert_eq!(
        s.issuance_count().expect("count"),
        3,
        "pruned issuances stay counted"
    );
    assert_eq!(s.token_used("spent").expect("q"), None);
    assert_eq!(s.token_used("fresh").expect("q"), Some(false));
    assert_eq!(s.prune(250).expect("again"), Pruned::default());
    s.record_issuances(&[issued("04", 100)]).expect("record");
    s.prune(250).expect("prune");
    assert_eq!(
        s.issuance_count().expect("count"),
        4,
        "the pruned count adds up"
    );
}

fn entries_are_found_by_id_and_by_spiffe_id(s: &dyn Store) {
    let e: Entry = serde_json::from_value(serde_json::json!({
        "id": "pay", "spiffeId": "spiffe://a.test/pay", "nodes": ["n"], "dir": "pay"
    }))
    .expect("entry");
    s.insert_entry(&e).expect("insert");
    assert!(matches!(
        s.insert_entry(&e),
        Err(super::StoreError::Exists(_))
    ));
    assert_eq!(s.entry("pay").expect("q"), Some(e.clone()));
    assert_eq!(s.entries().expect("q"), vec![e]);
    assert_eq!(s.entry("nope").expect("q"), None);
    assert!(s.registers("spiffe://a.test/pay").expect("q"));
    assert!(!s.registers("spiffe://a.test/pay/x").expect("q"));
    assert!(s.delete_entry("pay").expect("delete"));
    assert!(!s.delete_entry("pay").expect("delete"));
    assert!(!s.registers("spiffe://a.test/pay").expect("q"));
}

fn reports_replace_the_previous_one(s: &dyn Store) {
    let report = |at: u64| super::StoredReport {
        node: "n".into(),
        report: serde_json::from_value(serde_json::json!({"bundleVersion": 1, "identities": []}))
            .expect("report"),
        received_at: at,
    };
    s.put_report(&report(1)).expect("put");
    s.put_report(&report(2)).expect("put");
    let all = s.reports().expect("reports");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].received_at, 2);
}

fn documents_are_written_only_over_the_revision_read(s: &dyn Store) {
    assert_eq!(s.load_document("root").expect("load"), None);
    assert_eq!(s.store_document("root", 0, b"one").expect("store"), Some(1));
    assert_eq!(
        s.store_document("root", 0, b"two").expect("store"),
        None,
        "already there"
    );
    assert_eq!(s.store_document("root", 1, b"two").expect("store"), Some(2));
    assert_eq!(
        s.store_document("root", 1, b"three").expect("store"),
        None,
        "stale revision"
    );
    assert_eq!(
        s.load_document("root").expect("load"),
        Some((2, b"two".to_vec()))
    );
    assert_eq!(s.store_document("ghost", 3, b"x").expect("store"), None);
}

fn every_write_nodes_sync_grows_the_change_version(s: &dyn Store) {
    let changes = s.changes();
    let version = || *changes.borrow();
    let mut last = version();
    let mut grew = |what: &str, expected: bool| {
        let now = version();
        assert_eq!(now > last, expected, "{what}: {last} → {now}");
        last = now;
    };
    let e: Entry = serde_json::from_value(serde_json::json!({
        "id": "pay", "spiffeId": "spiffe://a.test/pay", "nodes": ["n"], "dir": "pay"
    }))
    .expect("entry");
    s.insert_entry(&e).expect("insert");
    grew("an entry created", true);
    assert!(s.insert_entry(&e).is_err());
    grew("an entry refused", false);
    assert!(s.delete_entry("pay").expect("delete"));
    grew("an entry deleted", true);
    assert!(!s.delete_entry("pay").expect("delete"));
    grew("no entry deleted", false);
    s.create_token(&token("h", 100)).expect("token");
    s.consume_token("h", 50, &id).expect("join");
    grew("a node joined", false);
    assert!(s.ban_node("node-1").expect("ban"));
    grew("a node banned", true);
    assert_eq!(s.store_document("rotation", 0, b"x").expect("doc"), Some(1));
    grew("a document written", true);
    assert_eq!(s.store_document("rotation", 0, b"y").expect("doc"), None);
    grew("a document refused", false);
    s.record_issuances(&[]).expect("nothing");
    grew("issuances", false);
}

/// Two replicas on one database: an entry created through one moves the other's change
/// version (through its notification session).
#[test]
fn a_change_through_one_replica_is_seen_by_the_others() {
    let (_cluster, url) = postgres_database();
    let a = PostgresStore::open(&url).expect("open a");
    let b = PostgresStore::open(&url).expect("open b");
    let mut seen = b.changes();
    let before = *seen.borrow_and_update();
    let e: Entry = serde_json::from_value(serde_json::json!({
        "id": "pay", "spiffeId": "spiffe://a.test/pay", "nodes": ["n"], "dir": "pay"
    }))
    .expect("entry");
    a.insert_entry(&e).expect("insert through a");
    let target = *a.changes().borrow();
    assert!(target > before);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            seen.wait_for(|v| *v >= target),
        )
        .await
        .expect("b sees the change")
        .expect("b follows");
    });
    // A store opened later starts at the stored version.
    let c = PostgresStore::open(&url).expect("open c");
    assert_eq!(*c.changes().borrow(), target);
}

/// Replicas started at the same instant: every one opens, the schema is migrated once.
#[test]
fn replicas_opening_together_migrate_once() {
    let (_cluster, url) = postgres_database();
    let barrier = Arc::new(std::sync::Barrier::new(6));
    let opened: Vec<PostgresStore> = (0..6)
        .map(|_| {
            let (url, barrier) = (url.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                PostgresStore::open(&url)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread").expect("open"))
        .collect();
    let expected = i32::try_from(super::postgres::MIGRATIONS.len()).expect("small");
    for store in &opened {
        assert_eq!(
            super::postgres::schema_version(store).expect("version"),
            expected
        );
    }
    // Once migrated, opening again runs nothing and changes nothing.
    let again = PostgresStore::open(&url).expect("reopen");
    assert_eq!(
        super::postgres::schema_version(&again).expect("version"),
        expected
    );
}

/// Two replicas consume the same token at once: exactly one of them succeeds.
#[test]
fn a_token_presented_to_two_replicas_at_once_is_consumed_once() {
    let (_cluster, url) = postgres_database();
    let replicas: Vec<Arc<PostgresStore>> = (0..2)
        .map(|_| Arc::new(PostgresStore::open(&url).expect("open")))
        .collect();
    for round in 0..20 {
        let hash = format!("token-{round}");
        replicas[0]
            .create_token(&token(&hash, u64::MAX / 2))
            .expect("create");
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let outcomes: Vec<TokenOutcome> = (0..4)
            .map(|i| {
                let (store, barrier, hash) = (
                    Arc::clone(&replicas[i % 2]),
                    Arc::clone(&barrier),
                    hash.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    store.consume_token(&hash, 10, &id).expect("consume")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let consumed = outcomes
            .iter()
            .filter(|o| matches!(o, TokenOutcome::Consumed { .. }))
            .count();
        assert_eq!(consumed, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, TokenOutcome::Consumed { .. } | TokenOutcome::Used)),
            "{outcomes:?}"
        );
    }
}

/// Both replicas settle the same bundle version for the same roots, whichever comes first.
#[test]
fn replicas_settle_one_bundle_version() {
    let (_cluster, url) = postgres_database();
    let versions: Vec<u64> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                PostgresStore::open(&url)
                    .expect("open")
                    .settle_bundle_version("roots-1")
                    .expect("settle")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(versions, vec![1; 4]);
}

/// The database restarts: a call meanwhile fails with a retryable error, and the same call
/// succeeds once it is back (the pool reconnects).
#[test]
fn a_database_restart_fails_calls_retryably_then_they_succeed() {
    let cluster = Cluster::start();
    let url = cluster.create_database("restart");
    let store = PostgresStore::open(&url).expect("open");
    store.create_token(&token("before", 100)).expect("create");
    cluster.stop();
    let err = store.token_used("before").expect_err("database down");
    assert!(err.is_retryable(), "{err}");
    cluster.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match store.token_used("before") {
            Ok(used) => {
                assert_eq!(
                    used,
                    Some(false),
                    "the committed token survived the restart"
                );
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "never reconnected: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// `sslmode=verify-full`: the store connects over TLS (rustls), verifying the server against
/// `sslrootcert`; a root that did not sign the server's certificate is refused.
#[test]
fn tls_to_the_database_verifies_the_server() {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let cluster = Cluster::start_tls(&server.pem(), &server_key.serialize_pem());
    cluster.psql("CREATE DATABASE tls");
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("db-ca.pem");
    std::fs::write(&root, ca.pem()).expect("write");
    let store = PostgresStore::open(&cluster.tcp_url("tls", &root)).expect("TLS connection");
    store
        .create_token(&token("t", 100))
        .expect("a query over TLS");
    let ssl = cluster.psql(
        "SELECT bool_or(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = 'tls'",
    );
    assert_eq!(ssl, "t", "the store's connections use TLS");
    let other_key = rcgen::KeyPair::generate().expect("key");
    let other = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .self_signed(&other_key)
        .expect("other");
    let wrong = dir.path().join("other.pem");
    std::fs::write(&wrong, other.pem()).expect("write");
    PostgresStore::open(&cluster.tcp_url("tls", &wrong)).expect_err("an unknown server is refused");
}
