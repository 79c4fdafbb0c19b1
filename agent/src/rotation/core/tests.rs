//! Property tests of the core over random event sequences, played by a harness that answers
//! the core's actions the way the executor and a holder might (or stale, or twice), and
//! checks after every step what a user of the agent relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{ApiError, Bundles, Der, ErrorCode, SignOutcome, Svid, SyncResponse};
use meshcert_protocol::{Enforcement, Entry, SpiffeId, TrustDomain};
use proptest::prelude::*;

use super::*;
use crate::cache::Intermediates;
use crate::issuer::IssuerError;
use crate::keys::{KeyAlgorithm, PrivateKey};
use crate::node::RenewFailure;
use crate::rotation::installed::Installed;
use crate::rotation::testing::{TD, config, entry, entry_in};

const T0: Duration = Duration::from_secs(1_800_000_000);
/// Holder entries the syncs choose from: more than one batch.
const POOL: usize = SIGN_BATCH + 6;
const LOCAL: [&str; 2] = ["tool", "far"];

impl Core {
    /// What a user could see of one entry (and what a stale answer must not change).
    fn fingerprint(&self, id: &str) -> Option<String> {
        self.managed.get(id).map(|m| {
            format!(
                "{:?} {:?} {:?} {} {:?} {:?}",
                m.state,
                m.current.as_ref().map(|c| c.info.serial.clone()),
                m.schedule,
                m.denied,
                m.last_error,
                m.entry,
            )
        })
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

fn leaf(serial: &str, id: &SpiffeId, from: SystemTime, ttl: Duration) -> LeafInfo {
    LeafInfo {
        spiffe_id: id.clone(),
        serial: serial.into(),
        not_before: from,
        not_after: from + ttl,
        public_key: Vec::new(),
    }
}

/// One step of a random sequence.
#[derive(Debug, Clone)]
enum Op {
    /// Time passes; `check`: a volume check is due.
    Tick {
        secs: u64,
        check: bool,
    },
    SyncNow,
    /// The oldest sync in flight answers: `entries` of the pool, a mode, a bundle version;
    /// or the holder is down (`None`).
    SyncAnswer(Option<(usize, u8, u64)>),
    /// A signing request answers (`pick` chooses which, stale ones included): per entry an
    /// outcome, or the whole call fails (`down`).
    SignAnswer {
        pick: usize,
        outcomes: Vec<u8>,
        ttl: u64,
        down: bool,
        write_ok: bool,
    },
    RenewAnswer(bool),
    ProbeAnswer(bool),
    /// The config's local entries: both, or only `tool`.
    Reload(bool),
    Hook(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..400, any::<bool>()).prop_map(|(secs, check)| Op::Tick { secs, check }),
        1 => Just(Op::SyncNow),
        3 => proptest::option::weighted(0.8, (0..=POOL, 0u8..3, 1u64..3)).prop_map(Op::SyncAnswer),
        5 => (any::<usize>(), proptest::collection::vec(0u8..6, 0..POOL + 2), 1u64..3000, proptest::bool::weighted(0.1), proptest::bool::weighted(0.9))
            .prop_map(|(pick, outcomes, ttl, down, write_ok)| Op::SignAnswer { pick, outcomes, ttl, down, write_ok }),
        1 => any::<bool>().prop_map(Op::RenewAnswer),
        1 => any::<bool>().prop_map(Op::ProbeAnswer),
        1 => any::<bool>().prop_map(Op::Reload),
        1 => any::<bool>().prop_map(Op::Hook),
    ]
}

fn mode(m: u8) -> Enforcement {
    [
        Enforcement::Disabled,
        Enforcement::Enabled,
        Enforcement::MeshDefault,
    ][usize::from(m % 3)]
}

/// The harness: the core, and what the outside world knows.
struct World {
    core: Core,
    now: SystemTime,
    pool: Vec<Entry>,
    local: BTreeSet<String>,
    key: PrivateKey,
    intermediates: Intermediates,
    /// Signing requests sent and not answered yet, oldest first, and all requests ever sent.
    outstanding: Vec<(u64, Vec<String>)>,
    answered: Vec<(u64, Vec<String>)>,
    /// Per entry, the latest request that asked for it.
    latest: BTreeMap<String, u64>,
    /// Requests made stale from the outside (a mode change, a removal), per entry.
    voided: BTreeSet<(String, u64)>,
    /// The leaves the "holder" issued, by serial, and whether writing them succeeds.
    issued: BTreeMap<String, (LeafInfo, bool)>,
    renewing: bool,
    probing: bool,
    /// Syncs sent and not answered.
    syncs: usize,
    bundles: Option<u64>,
    enforcement: Enforcement,
    /// Local entries the holder refused by a local-entry rule, and the mode then.
    denied: BTreeMap<String, Enforcement>,
    reloaded_with_far: bool,
}

impl World {
    fn new(dir: &Path, seed: u64) -> Self {
        let mut config = config(dir);
        config.entries = vec![entry("tool"), entry_in("far", "mesh-b.test")];
        let node_id = SpiffeId::new(&format!("spiffe://{TD}/meshcert/node/n1")).expect("id");
        let node = leaf("0a", &node_id, at(0), Duration::from_secs(3600));
        let node = NodeCertificate {
            info: node,
            chain: Vec::new(),
        };
        let (core, actions) = Core::new(config, node, None, at(0), seed);
        let mut world = Self {
            core,
            now: at(0),
            pool: (0..POOL).map(|i| entry(&format!("e{i}"))).collect(),
            local: LOCAL.iter().map(|s| (*s).to_owned()).collect(),
            key: PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key"),
            intermediates: Intermediates::default(),
            outstanding: Vec::new(),
            answered: Vec::new(),
            latest: BTreeMap::new(),
            voided: BTreeSet::new(),
            issued: BTreeMap::new(),
            renewing: false,
            probing: false,
            syncs: 0,
            bundles: None,
            enforcement: Enforcement::MeshDefault,
            denied: BTreeMap::new(),
            reloaded_with_far: true,
        };
        world.perform(actions);
        world
    }

    fn bundles(version: u64) -> Bundles {
        Bundles {
            version,
            trust_domains: BTreeMap::from([(
                TrustDomain::new(TD).expect("td"),
                vec![Der(vec![1])],
            )]),
            shared_root: Vec::new(),
            rotation: None,
        }
    }

    fn handle(&mut self, event: Event) {
        let actions = self.core.handle(event, self.now);
        self.perform(actions);
    }

    /// Performs the actions as the executor would, checking each against the properties.
    fn perform(&mut self, actions: Vec<Action>) {
        let mut asked = BTreeSet::new();
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let follow = match action {
                Action::Sync => {
                    self.syncs += 1;
                    None
                }
                Action::Renew => {
                    self.renewing = true;
                    None
                }
                Action::Probe => {
                    self.probing = true;
                    None
                }
                Action::Sign { request, jobs } => {
                    self.sent(request, &jobs, &mut asked);
                    None
                }
                Action::Install { entry, request, .. } => Some(self.installed(&entry, request)),
                Action::Adopt { entry, request } => {
                    self.mark_latest(&entry.id, request, &mut asked);
                    Some(Event::Adopted {
                        entry_id: entry.id.clone(),
                        request,
                        found: None,
                    })
                }
                Action::Recheck => Some(Event::Unverifiable(Vec::new())),
                Action::Publish => {
                    let p = self.core.publication(self.now);
                    self.check_published(&p);
                    None
                }
                _ => None,
            };
            if let Some(event) = follow {
                let next = self.core.handle(event, self.now);
                for a in next.into_iter().rev() {
                    queue.push_front(a);
                }
            }
        }
    }

    fn mark_latest(&mut self, id: &str, request: u64, asked: &mut BTreeSet<String>) {
        // At most one request in flight per entry: one handling never asks twice for one
        // entry, and a new request makes every earlier one stale (checked when answered).
        assert!(asked.insert(id.to_owned()), "{id} asked for twice at once");
        self.latest.insert(id.to_owned(), request);
    }

    fn sent(&mut self, request: u64, jobs: &[(Arc<Entry>, bool)], asked: &mut BTreeSet<String>) {
        assert!(
            !jobs.is_empty() && jobs.len() <= SIGN_BATCH,
            "a batch of {}",
            jobs.len()
        );
        assert!(self.bundles.is_some(), "a batch sent before any bundle");
        for (e, local) in jobs {
            if *local {
                let denied = self.denied.get(&e.id);
                assert!(
                    denied.is_none_or(|m| *m != self.enforcement),
                    "{} asked again under the mode that refused it",
                    e.id
                );
            }
            self.mark_latest(&e.id, request, asked);
        }
        self.outstanding
            .push((request, jobs.iter().map(|(e, _)| e.id.clone()).collect()));
    }

    /// Whether an answer to `request` for `id` is current (not superseded nor voided).
    fn current(&self, id: &str, request: u64) -> bool {
        self.latest.get(id) == Some(&request) && !self.voided.contains(&(id.to_owned(), request))
    }

    fn installed(&mut self, entry: &Arc<Entry>, request: u64) -> Event {
        let serial = format!("{request:x}-{}", entry.id);
        match self.issued.get(&serial) {
            Some((_, false)) => Event::InstallFailed {
                entry_id: entry.id.clone(),
                request,
                error: "cannot install: the disk is full".into(),
            },
            Some((info, true)) => Event::Installed {
                entry_id: entry.id.clone(),
                request,
                installed: Installed::new(
                    &self.intermediates,
                    entry,
                    self.key.clone(),
                    (vec![serial.into_bytes()], info.clone()),
                    None,
                ),
            },
            None => panic!("an install of nothing the holder issued: {serial}"),
        }
    }

    fn check_published(&self, p: &Published) {
        for svid in &p.snapshot.svids {
            assert!(
                svid.not_after > self.now,
                "{} served expired",
                svid.entry.id
            );
            if self.local.contains(&svid.entry.id) {
                assert_eq!(
                    self.enforcement,
                    Enforcement::Disabled,
                    "local {} served under {:?}",
                    svid.entry.id,
                    self.enforcement
                );
                assert!(TrustDomain::new(TD).expect("td").contains(&svid.spiffe_id));
            }
        }
    }
}

impl World {
    fn spiffe_id(id: &str) -> SpiffeId {
        let td = if id == "far" { "mesh-b.test" } else { TD };
        SpiffeId::new(&format!("spiffe://{td}/{id}")).expect("id")
    }

    fn down() -> IssuerError {
        IssuerError::Http("connection refused".into())
    }

    /// The entries the node should now hold: voids the requests of those that went.
    fn wanted(&mut self, holder: usize) {
        let mut wanted: BTreeSet<String> =
            self.pool[..holder].iter().map(|e| e.id.clone()).collect();
        wanted.extend(self.local.iter().cloned());
        let gone: Vec<(String, u64)> = self
            .latest
            .iter()
            .filter(|(id, _)| !wanted.contains(*id))
            .map(|(id, r)| (id.clone(), *r))
            .collect();
        for (id, r) in gone {
            self.denied.remove(&id);
            self.voided.insert((id, r));
        }
    }

    fn new_mode(&mut self, next: Enforcement) {
        if next == self.enforcement {
            return;
        }
        self.enforcement = next;
        self.denied.clear();
        for id in &self.local {
            if let Some(r) = self.latest.get(id) {
                self.voided.insert((id.clone(), *r));
            }
        }
    }

    fn sync_answer(&mut self, answer: Option<(usize, u8, u64)>) {
        if self.syncs == 0 {
            return;
        }
        self.syncs -= 1;
        let Some((n, m, version)) = answer else {
            return self.handle(Event::Synced(Err(Self::down())));
        };
        let version = version.max(self.bundles.unwrap_or(0));
        self.bundles = Some(version);
        self.new_mode(mode(m));
        self.wanted(n);
        let response = SyncResponse {
            node: "n1".into(),
            mesh: "mesh-a".into(),
            trust_domain: TrustDomain::new(TD).expect("td"),
            enforcement: mode(m),
            entries: self.pool[..n].to_vec(),
            bundles: Self::bundles(version),
        };
        self.handle(Event::Synced(Ok(response)));
    }

    fn outcome(
        &mut self,
        request: u64,
        id: &str,
        pick: u8,
        ttl: u64,
        write_ok: bool,
    ) -> Option<SignOutcome> {
        let refused = |code| SignOutcome::Refused {
            error: ApiError::new(code, "by the table"),
        };
        match pick {
            0..=2 => {
                let serial = format!("{request:x}-{id}");
                let info = leaf(
                    &serial,
                    &Self::spiffe_id(id),
                    self.now,
                    Duration::from_secs(ttl),
                );
                self.issued.insert(serial.clone(), (info, write_ok));
                Some(SignOutcome::Issued {
                    svid: Svid {
                        spiffe_id: Self::spiffe_id(id),
                        chain: vec![Der(serial.into_bytes())],
                    },
                    gateway_svid: None,
                })
            }
            3 => Some(refused(ErrorCode::PolicyDenied)),
            4 => Some(refused(ErrorCode::NotAssigned)),
            _ => None,
        }
    }

    /// Answers one signing request, in flight or long answered (then stale: nothing of its
    /// entries may change).
    fn sign_answer(&mut self, pick: usize, outcomes: &[u8], ttl: u64, down: bool, write_ok: bool) {
        let all = self.outstanding.len() + self.answered.len();
        if all == 0 {
            return;
        }
        let i = pick % all;
        let (request, ids) = if i < self.outstanding.len() {
            let taken = self.outstanding.remove(i);
            self.answered.push(taken.clone());
            taken
        } else {
            self.answered[i - self.outstanding.len()].clone()
        };
        let stale: Vec<(String, Option<String>)> = ids
            .iter()
            .filter(|id| !self.current(id, request))
            .map(|id| (id.clone(), self.core.fingerprint(id)))
            .collect();
        let result = if down {
            Err(Self::down())
        } else {
            let mut results = Vec::new();
            for (k, id) in ids.iter().enumerate() {
                let pick = outcomes.get(k).copied().unwrap_or(0);
                if pick == 3 && self.local.contains(id) && self.current(id, request) {
                    self.denied.insert(id.clone(), self.enforcement);
                }
                if let Some(o) = self.outcome(request, id, pick, ttl, write_ok) {
                    results.push((id.clone(), self.key.clone(), o));
                }
            }
            Ok((results, Self::bundles(self.bundles.unwrap_or(1))))
        };
        // Answered: a second answer to it is stale.
        for id in &ids {
            self.voided.insert((id.clone(), request));
        }
        self.handle(Event::Signed {
            request,
            ids,
            result,
        });
        for (id, before) in stale {
            assert_eq!(
                self.core.fingerprint(&id),
                before,
                "a stale answer changed {id}"
            );
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Tick { secs, check } => {
                self.now += Duration::from_secs(secs);
                self.handle(Event::Tick {
                    check_volume: check,
                });
            }
            Op::SyncNow => self.handle(Event::SyncNow),
            Op::SyncAnswer(answer) => self.sync_answer(answer),
            Op::SignAnswer {
                pick,
                outcomes,
                ttl,
                down,
                write_ok,
            } => {
                self.sign_answer(pick, &outcomes, ttl, down, write_ok);
            }
            Op::RenewAnswer(ok) if self.renewing => {
                self.renewing = false;
                let id = SpiffeId::new(&format!("spiffe://{TD}/meshcert/node/n1")).expect("id");
                let result = if ok {
                    Ok(NodeCertificate {
                        info: leaf("0b", &id, self.now, Duration::from_secs(3600)),
                        chain: Vec::new(),
                    })
                } else {
                    Err(RenewFailure {
                        message: "down".into(),
                        holder_down: true,
                    })
                };
                self.handle(Event::Renewed(result));
            }
            Op::ProbeAnswer(ok) if self.probing => {
                self.probing = false;
                self.handle(Event::Probed(if ok { Ok(()) } else { Err(Self::down()) }));
            }
            Op::Reload(with_far) => self.reload(with_far),
            Op::Hook(failed) => self.handle(Event::HookDone {
                entry_id: "e0".into(),
                error: failed.then(|| "exit status 1".into()),
            }),
            Op::RenewAnswer(_) | Op::ProbeAnswer(_) => {}
        }
    }

    fn reload(&mut self, with_far: bool) {
        let mut config = self.core.config().clone();
        config.entries = vec![entry("tool")];
        self.local = BTreeSet::from(["tool".to_owned()]);
        if with_far {
            config.entries.push(entry_in("far", "mesh-b.test"));
            self.local.insert("far".into());
        }
        self.reloaded_with_far = with_far;
        let holder = self.core.holder_entries.len();
        self.wanted(holder);
        self.handle(Event::Reload(Box::new(config)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every step of a random sequence keeps the core's promises: at most one request in
    /// flight per entry, stale answers change nothing, a refused local entry is not asked
    /// again under the same mode, no local SVID served unless DISABLED, nothing expired
    /// served, batches within their size and never before bundles.
    #[test]
    fn random_sequences_keep_the_promises(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..80)) {
        let mut world = World::new(Path::new("/nonexistent"), seed);
        for op in ops {
            world.apply(op);
        }
    }
}

#[test]
fn the_report_carries_the_node_svid() {
    let mut world = World::new(Path::new("/nonexistent"), 1);
    let p = world.core.publication(world.now);
    let node = p.report.node_svid.expect("the node SVID is reported");
    assert_eq!(&*node.serial, "0a");
    let t0 = T0.as_secs();
    assert_eq!((node.not_before, node.not_after), (t0, t0 + 3600));
}
