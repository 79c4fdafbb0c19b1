//! The executor with a fake issuer, a recording installer over a tempdir volume, and a clock
//! that follows tokio's paused time: scenarios of hours run in milliseconds, with no sleep.
//!
//! The fake issuer signs what it is asked and refuses what the test tells it to: the answers
//! to local entries come from the table the test writes ([`LOCAL_DECISIONS`]), never from a
//! copy of the holder's policy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{
    ApiError, AttestRequest, Bundles, Der, ErrorCode, NodeSvidResponse, RenewRequest, SignOutcome,
    SignRequest, SignResponse, SignResult, Svid, SyncResponse,
};
use meshcert_protocol::{CertState, Enforcement, Entry, NodeReport, SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::cache::{AgentStatus, Cache, CacheWriter};
use crate::issuer::IssuerError;
use crate::keys::{KeyAlgorithm, PrivateKey};
use crate::rotation::clock::ManualClock;
use crate::rotation::installed::GATEWAY_HINT;
use crate::rotation::testing::{TD, config, entry};
use crate::svid::testca::TestCa;
use crate::volume::{Contents, OnDisk, VolumeError};
use crate::{csr, svid};

/// What the holder answers a local entry under each mode, as the test expects it: written
/// here, not derived from the agent's or the holder's rule. `None`: issued.
const LOCAL_DECISIONS: [(Enforcement, Option<ErrorCode>); 2] = [
    (Enforcement::Disabled, None),
    (Enforcement::Enabled, Some(ErrorCode::PolicyDenied)),
];

fn local_decision(mode: Enforcement) -> Option<ErrorCode> {
    LOCAL_DECISIONS
        .iter()
        .find(|(m, _)| *m == mode)
        .and_then(|(_, d)| *d)
}

struct FakeState {
    entries: Vec<Entry>,
    refuse: BTreeSet<String>,
    /// Entries whose SVID is signed by a CA outside the bundle (a check must fail).
    forge: BTreeSet<String>,
    down: bool,
    signed: u32,
    ttl: Duration,
    enforcement: Enforcement,
    /// How local entries are answered now (set by the test from [`LOCAL_DECISIONS`]).
    local_refusal: Option<ErrorCode>,
    local_requests: u32,
    rotated: bool,
    panics: u32,
    probes: u32,
    syncs: u32,
    unavailable: bool,
    /// Leaves issued from a CA in the bundle.
    good_leaves: BTreeSet<Vec<u8>>,
}

/// A holder in memory: signs with a test CA at the test's clock, can refuse or be "down".
struct FakeIssuer {
    ca: TestCa,
    rotated_ca: TestCa,
    shared: TestCa,
    outsider: TestCa,
    clock: ManualClock,
    state: Mutex<FakeState>,
}

impl FakeIssuer {
    fn new(entries: Vec<Entry>, clock: &ManualClock) -> Arc<Self> {
        Arc::new(Self {
            ca: TestCa::new(),
            rotated_ca: TestCa::new(),
            shared: TestCa::new(),
            outsider: TestCa::new(),
            clock: clock.clone(),
            state: Mutex::new(FakeState {
                entries,
                refuse: BTreeSet::new(),
                forge: BTreeSet::new(),
                down: false,
                signed: 0,
                ttl: Duration::from_secs(3600),
                enforcement: Enforcement::Enabled,
                local_refusal: local_decision(Enforcement::Enabled),
                local_requests: 0,
                rotated: false,
                panics: 0,
                probes: 0,
                syncs: 0,
                unavailable: false,
                good_leaves: BTreeSet::new(),
            }),
        })
    }
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().expect("lock"))
    }
    fn mesh_ca(&self) -> &TestCa {
        if self.with(|s| s.rotated) {
            &self.rotated_ca
        } else {
            &self.ca
        }
    }
    fn bundles(&self) -> Bundles {
        Bundles {
            version: if self.with(|s| s.rotated) { 2 } else { 1 },
            trust_domains: BTreeMap::from([(
                TrustDomain::new(TD).expect("td"),
                vec![Der(self.mesh_ca().root.clone())],
            )]),
            shared_root: vec![Der(self.shared.root.clone())],
            rotation: None,
        }
    }
    fn check_up(&self) -> Result<(), IssuerError> {
        let panic = self.with(|s| {
            let panic = s.panics > 0;
            s.panics = s.panics.saturating_sub(1);
            panic
        });
        assert!(!panic, "a bug in the task");
        if self.with(|s| s.down) {
            return Err(IssuerError::Http("connection refused".into()));
        }
        Ok(())
    }
    fn node_identity(&self) -> NodeIdentity {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
        let id = SpiffeId::new("spiffe://mesh-a.test/meshcert/node/n1").expect("id");
        let csr = csr::build(&key, None).expect("csr");
        let chain = self
            .ca
            .sign(&csr, &id, self.clock.now(), Duration::from_secs(86_400));
        NodeIdentity::new(key, chain).expect("node")
    }
    fn svid(&self, csr: &[u8], id: &SpiffeId, entry_id: &str) -> Svid {
        let (ttl, forged) = self.with(|s| (s.ttl, s.forge.contains(entry_id)));
        let ca = if forged {
            &self.outsider
        } else {
            self.mesh_ca()
        };
        let chain = ca.sign(csr, id, self.clock.now(), ttl);
        if !forged {
            self.with(|s| s.good_leaves.insert(chain[0].clone()));
        }
        Svid {
            spiffe_id: id.clone(),
            chain: chain.into_iter().map(Der).collect(),
        }
    }
    fn answer(&self, c: meshcert_protocol::api::CsrRequest) -> SignResult {
        let refused = |code, why: &str| SignOutcome::Refused {
            error: ApiError::new(code, why),
        };
        let outcome = if let Some(local) = &c.local {
            match self.with(|s| {
                s.local_requests += 1;
                s.local_refusal
            }) {
                None => SignOutcome::Issued {
                    svid: self.svid(&c.csr.0, &local.spiffe_id, &c.entry_id),
                    gateway_svid: None,
                },
                Some(code) => refused(code, "by the test's table"),
            }
        } else {
            let (entries, refuse) = self.with(|s| (s.entries.clone(), s.refuse.clone()));
            match entries.iter().find(|e| e.id == c.entry_id) {
                Some(e) if !refuse.contains(&e.id) => {
                    self.with(|s| s.signed += 1);
                    let gateway_svid = e.gateway.then(|| {
                        let ttl = self.with(|s| s.ttl);
                        let chain = self
                            .shared
                            .sign(&c.csr.0, &e.spiffe_id, self.clock.now(), ttl);
                        Svid {
                            spiffe_id: e.spiffe_id.clone(),
                            chain: chain.into_iter().map(Der).collect(),
                        }
                    });
                    SignOutcome::Issued {
                        svid: self.svid(&c.csr.0, &e.spiffe_id, &e.id),
                        gateway_svid,
                    }
                }
                _ => refused(ErrorCode::NotAssigned, "not yours"),
            }
        };
        SignResult {
            entry_id: c.entry_id,
            outcome,
        }
    }
}

impl Issuer for FakeIssuer {
    async fn attest(&self, _: AttestRequest) -> Result<NodeSvidResponse, IssuerError> {
        Err(IssuerError::Api(ApiError::new(
            ErrorCode::TokenUsed,
            "used",
        )))
    }
    async fn renew(&self, _: RenewRequest) -> Result<NodeSvidResponse, IssuerError> {
        Err(IssuerError::Api(ApiError::new(
            ErrorCode::Unavailable,
            "later",
        )))
    }
    async fn sync(&self) -> Result<SyncResponse, IssuerError> {
        self.with(|s| s.syncs += 1);
        self.check_up()?;
        Ok(SyncResponse {
            node: "n1".into(),
            mesh: "mesh-a".into(),
            trust_domain: TrustDomain::new(TD).expect("td"),
            enforcement: self.with(|s| s.enforcement),
            entries: self.with(|s| s.entries.clone()),
            bundles: self.bundles(),
        })
    }
    async fn sign(&self, request: SignRequest) -> Result<SignResponse, IssuerError> {
        self.check_up()?;
        if self.with(|s| s.unavailable) {
            return Err(IssuerError::Api(ApiError::new(
                ErrorCode::Unavailable,
                "the datastore is down",
            )));
        }
        let results = request.csrs.into_iter().map(|c| self.answer(c)).collect();
        Ok(SignResponse {
            results,
            bundles: self.bundles(),
        })
    }
    async fn report(&self, _: NodeReport) -> Result<(), IssuerError> {
        self.check_up()
    }
    async fn probe(&self) -> Result<(), IssuerError> {
        self.with(|s| s.probes += 1);
        self.check_up()
    }
    fn set_identity(&self, _: &[Vec<u8>], _: &PrivateKey) -> Result<(), IssuerError> {
        Ok(())
    }
}

/// What the installer saw.
#[derive(Default)]
struct Recorded {
    /// Every install: the folder and the leaf written.
    installs: Vec<(String, Vec<u8>)>,
    /// Writes fail (a full disk).
    fail_writes: bool,
}

/// The real volume in a tempdir, recording every install.
struct RecordingInstaller {
    volume: Volume,
    log: Arc<Mutex<Recorded>>,
}

impl Installer for RecordingInstaller {
    fn install(&self, dir: &str, c: &Contents<'_>, now: SystemTime) -> Result<(), VolumeError> {
        let mut log = self.log.lock().expect("lock");
        if log.fail_writes {
            return Err(VolumeError::Stalled("the disk is full".into()));
        }
        log.installs.push((dir.to_owned(), c.chain[0].clone()));
        self.volume.install(dir, c, now)
    }
    fn matches(&self, dir: &str, c: &Contents<'_>) -> bool {
        self.volume.matches(dir, c)
    }
    fn load(&self, dir: &str) -> Result<Option<OnDisk>, VolumeError> {
        self.volume.load(dir)
    }
    fn remove(&self, dir: &str) -> Result<(), VolumeError> {
        self.volume.remove(dir)
    }
    fn mark_expired(&self, dir: &str, not_after: SystemTime) -> Result<(), VolumeError> {
        self.volume.mark_expired(dir, not_after)
    }
    fn clear_expired(&self, dir: &str) -> Result<(), VolumeError> {
        self.volume.clear_expired(dir)
    }
    fn entry_path(&self, dir: &str) -> std::path::PathBuf {
        self.volume.entry_path(dir)
    }
}

struct Running {
    cache: Cache,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<usize>,
    installs: Arc<Mutex<Recorded>>,
    notified: Arc<Mutex<Vec<Notify>>>,
}

impl Running {
    async fn send(&self, command: Command) {
        self.commands.send(command).await.expect("send");
    }
    async fn stop(self) -> usize {
        self.stop.send(true).expect("stop");
        self.task.await.expect("stopped")
    }
}

fn start(fake: &Arc<FakeIssuer>, config: &Config, node: &NodeIdentity) -> Running {
    node::ensure_dir(&config.state_dir).expect("state");
    let writer = CacheWriter::new();
    let cache = writer.reader();
    let last = node::load_last_sync(&config.state_dir).expect("last sync");
    let installs = Arc::new(Mutex::new(Recorded::default()));
    let notified = Arc::new(Mutex::new(Vec::new()));
    let seen = notified.clone();
    let seams = Seams {
        issuer: fake.clone(),
        installer: RecordingInstaller {
            volume: Volume::new(&config.volume_dir),
            log: installs.clone(),
        },
        clock: fake.clock.clone(),
        notifier: Box::new(move |n: &Notify| seen.lock().expect("lock").push(n.clone())),
    };
    let changes = Arc::new(Changes::new());
    let rotator = Rotator::with_seams(seams, writer, config.clone(), node, last, changes);
    let (commands, rx) = mpsc::channel(8);
    let (stop, stop_rx) = watch::channel(false);
    let mut stop_rx2 = stop_rx.clone();
    let task = tokio::spawn(rotator.run(rx, async move {
        let _ = stop_rx2.wait_for(|s| *s).await;
    }));
    Running {
        cache,
        commands,
        stop,
        task,
        installs,
        notified,
    }
}

/// Waits (in tokio's paused time) until the status satisfies `f`.
async fn until(cache: &Cache, what: &str, f: impl Fn(&AgentStatus) -> bool) {
    let mut rx = cache.subscribe_status();
    let waited = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            if f(&rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "never reached: {what}; status {:?}",
        cache.status()
    );
}

fn all_issued(n: usize) -> impl Fn(&AgentStatus) -> bool {
    move |s| s.identities.len() == n && s.identities.iter().all(|i| i.state == CertState::Issued)
}

fn volume_has(config: &Config, dir: &str) -> bool {
    config.volume_dir.join(dir).join("..data").exists()
}

fn setup(entries: Vec<Entry>) -> (tempfile::TempDir, Config, Arc<FakeIssuer>, NodeIdentity) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config(tmp.path());
    let clock = ManualClock::new(SystemTime::now());
    let fake = FakeIssuer::new(entries, &clock);
    let node = fake.node_identity();
    (tmp, config, fake, node)
}

mod scenarios;
