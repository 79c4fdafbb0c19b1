//! Root rotation without downtime, driven by the fleet's acknowledgements.
//!
//! A rotation goes through three phases, each persisted as one document of the datastore
//! ([`DOCUMENT`], written with compare-and-swap) before the holder acts on it, so a holder
//! killed in any phase resumes it:
//!
//! 1. **PREPARED**: the next root exists (generated, or a staged provided root copied into
//!    `<stateDir>/rotation/<fingerprint>.pem|.key`, and on PostgreSQL sealed into the datastore
//!    for the other replicas, `crate::sealed`); it joins every bundle while the current root
//!    keeps signing.
//! 2. **ACTIVE**, once every node that was not already stale when the rotation started reports
//!    the bundle version that first carried the next root (or, after `ackTimeout`, at least
//!    `minShare` of them do; the others are named as left behind): intermediates are issued
//!    under the next root, which signs from now on; agents re-issue every SVID that does not
//!    chain to it, spread over `window` (the sync answer carries the moment and the window).
//!    The API's server certificate stays under the previous root, so a node that missed the
//!    bundle can still reach the holder and catch up.
//! 3. **RETIRED**, once no SVID any node reports was issued before the activation and the
//!    longest TTL the holder signs (`retireAfter`) has passed since it: the previous root
//!    leaves the bundles, and the next root is the root from then on (the document's
//!    `current`, which replaces the configured root as long as the configuration names the
//!    root it replaced).
//!
//! The phase machine is pure ([`assess`]: facts and settings in, the step out); this module
//! also holds its persistence and the holder-side driver ([`tick`], [`rotate`], [`abort`],
//! [`status`]). Builtin roots start a rotation on their own at `autoAt` of their life.
//!
//! Under limited trust each mesh's own root rotates the same way ([`Scope::Mesh`]), with its
//! own document (`root-rotation/<mesh>`): only that mesh's nodes gate it and re-issue, and
//! only that mesh's bundle changes. Scopes are independent: the shared root and any mesh root
//! may rotate at the same time.
//!
//! One file past 600 lines on purpose: the document, the machine that reads it and the driver
//! that writes it change together, and every write goes through the same compare-and-swap.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::authority::{SigningCa, fingerprint, rfc3339, unix};
use crate::config::RootSource;
use crate::holder::Holder;
use crate::store::{Store, StoreError};

/// The datastore document holding the rotation state.
pub const DOCUMENT: &str = "root-rotation";
/// The folder (under the state folder) holding roots introduced by rotations.
pub const FOLDER: &str = "rotation";

/// Which root a rotation replaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The virtual mesh's shared root.
    Shared,
    /// A mesh's own root under limited trust.
    Mesh(String),
}

impl Scope {
    /// The datastore document holding this scope's state: [`DOCUMENT`], or
    /// `root-rotation/<mesh>`.
    pub fn document(&self) -> String {
        match self {
            Self::Shared => DOCUMENT.to_owned(),
            Self::Mesh(m) => format!("{DOCUMENT}/{m}"),
        }
    }

    /// The mesh, for a mesh's own root.
    pub fn mesh(&self) -> Option<&str> {
        match self {
            Self::Shared => None,
            Self::Mesh(m) => Some(m),
        }
    }

    /// Every scope of a configuration: the shared root, then each mesh's own root (limited
    /// trust).
    pub fn all(config: &crate::config::Config) -> Vec<Scope> {
        std::iter::once(Scope::Shared)
            .chain(config.mesh_roots.keys().cloned().map(Scope::Mesh))
            .collect()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shared => f.write_str("shared root"),
            Self::Mesh(m) => write!(f, "mesh `{m}` root"),
        }
    }
}

/// Millionths: a share written as `5/6`, `90%` or `0.9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(pub u32);

impl Share {
    /// The whole.
    pub const ALL: Share = Share(1_000_000);

    /// Parses `a/b`, `NN%` or a decimal between 0 and 1.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let value = if let Some((a, b)) = t.split_once('/') {
            let a: f64 = a.trim().parse().map_err(|_| format!("`{t}` is not a/b"))?;
            let b: f64 = b.trim().parse().map_err(|_| format!("`{t}` is not a/b"))?;
            if b == 0.0 {
                return Err(format!("`{t}` divides by zero"));
            }
            a / b
        } else if let Some(p) = t.strip_suffix('%') {
            p.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{t}` is not a percentage"))?
                / 100.0
        } else {
            t.parse().map_err(|_| format!("`{t}` is not a share"))?
        };
        if !(0.0..=1.0).contains(&value) {
            return Err(format!("`{t}` is not between 0 and 1"));
        }
        // In range [0, 1] by the check above: the cast cannot overflow.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Share((value * 1_000_000.0).round() as u32))
    }

    /// Whether `part` of `whole` reaches this share.
    pub fn reached(self, part: usize, whole: usize) -> bool {
        whole == 0 || (part as u128) * 1_000_000 >= u128::from(self.0) * whole as u128
    }

    /// `d` scaled by this share.
    pub fn of(self, d: Duration) -> Duration {
        d.mul_f64(f64::from(self.0) / 1_000_000.0)
    }
}

/// `holder.rootRotation` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSettings {
    ack_timeout: Option<String>,
    min_share: Option<String>,
    window: Option<String>,
    auto_at: Option<String>,
    retire_after: Option<String>,
}

/// `holder.rootRotation`: how rotations progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long PREPARED waits for every node before `min_share` is enough (default 1 h).
    pub ack_timeout: Duration,
    /// The share of nodes that must have acknowledged after `ack_timeout` (default 90%).
    pub min_share: Share,
    /// The window agents spread their re-issuance over after activation (default 10 min).
    pub window: Duration,
    /// When a builtin root starts its rotation: this share of its life (default 5/6; 0: never).
    pub auto_at: Share,
    /// How long after activation the previous root may leave the bundles at the earliest
    /// (default: the longest TTL the holder signs, workload or node SVID).
    pub retire_after: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(3600),
            min_share: Share(900_000),
            window: Duration::from_secs(600),
            auto_at: Share(833_333),
            retire_after: None,
        }
    }
}

impl Settings {
    /// Validates `holder.rootRotation`; problems are `(field path, message)`.
    pub fn from_raw(raw: Option<RawSettings>) -> Result<Self, Vec<(String, String)>> {
        let raw = raw.unwrap_or_default();
        let mut problems = Vec::new();
        let d = Settings::default();
        let mut duration = |v: Option<String>, name: &str, default: Duration| match v {
            None => default,
            Some(t) => match meshcert_protocol::duration::parse(&t) {
                Ok(x) if !x.is_zero() => x,
                Ok(_) => {
                    problems.push((
                        format!("holder.rootRotation.{name}"),
                        "must be longer than zero".into(),
                    ));
                    default
                }
                Err(e) => {
                    problems.push((format!("holder.rootRotation.{name}"), e.to_string()));
                    default
                }
            },
        };
        let ack_timeout = duration(raw.ack_timeout, "ackTimeout", d.ack_timeout);
        let window = duration(raw.window, "window", d.window);
        let retire_after = raw
            .retire_after
            .map(|t| duration(Some(t), "retireAfter", Duration::ZERO));
        let mut share = |v: Option<String>, name: &str, default: Share| match v {
            None => default,
            Some(t) => Share::parse(&t).unwrap_or_else(|e| {
                problems.push((format!("holder.rootRotation.{name}"), e));
                default
            }),
        };
        let min_share = share(raw.min_share, "minShare", d.min_share);
        let auto_at = share(raw.auto_at, "autoAt", d.auto_at);
        if problems.is_empty() {
            Ok(Self {
                ack_timeout,
                min_share,
                window,
                auto_at,
                retire_after,
            })
        } else {
            Err(problems)
        }
    }
}

/// A rotation's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// The next root is in the bundles; the current one signs.
    Prepared,
    /// The next root signs; both are in the bundles.
    Active,
    /// Finished: the previous root left the bundles.
    Retired,
    /// Given up before activation: the next root left the bundles.
    Aborted,
}

/// A rotation under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InProgress {
    /// PREPARED or ACTIVE.
    pub phase: Phase,
    /// The next root's fingerprint (files `rotation/<fingerprint>.pem|.key`).
    pub next: String,
    /// The fingerprint of the root being replaced.
    pub previous: String,
    /// Why it started (`operator`, `automatic`).
    pub reason: String,
    /// When it started, Unix seconds.
    pub started_at: u64,
    /// The first bundle version that carries the next root (set once that bundle serves).
    #[serde(default)]
    pub prepared_version: Option<u64>,
    /// When the next root started signing, Unix seconds.
    #[serde(default)]
    pub activated_at: Option<u64>,
    /// The nodes that had not acknowledged the bundle when activation went ahead without them.
    #[serde(default)]
    pub left_behind: Vec<String>,
}

/// A rotation that ended (for status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    /// RETIRED or ABORTED.
    pub phase: Phase,
    /// The root it introduced.
    pub next: String,
    /// The root it replaced (or kept, when aborted).
    pub previous: String,
    /// When it ended, Unix seconds.
    pub at: u64,
    /// The nodes left behind at activation.
    #[serde(default)]
    pub left_behind: Vec<String>,
}

/// The persisted rotation state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationDoc {
    /// The root a finished rotation put in place of the configured one (fingerprint).
    #[serde(default)]
    pub current: Option<String>,
    /// The configured root `current` replaces: when the configuration names another root, the
    /// configuration wins.
    #[serde(default)]
    pub replaced: Option<String>,
    /// The rotation under way.
    #[serde(default)]
    pub rotation: Option<InProgress>,
    /// The last rotation that ended.
    #[serde(default)]
    pub last: Option<Finished>,
}

/// The roots the authority loads, from the rotation state.
#[derive(Debug, Clone, Default)]
pub struct RootPlan {
    /// The root in place of the configured one when its fingerprint is the first element.
    pub base: Option<(String, RootSource)>,
    /// The next root of a rotation under way.
    pub next: Option<RootSource>,
    /// Whether the next root signs (ACTIVE).
    pub next_signs: bool,
    /// Under limited trust, each mesh root's own plan (absent: no rotation of it).
    pub meshes: std::collections::BTreeMap<String, RootPlan>,
}

/// The files of a root introduced by a rotation.
pub fn root_files(state_dir: &Path, fp: &str) -> RootSource {
    let dir = state_dir.join(FOLDER);
    RootSource::Provided {
        cert_file: dir.join(format!("{fp}.pem")),
        key_file: dir.join(format!("{fp}.key")),
    }
}

/// Reads the shared root's rotation state and its revision (0: none yet).
pub fn load(store: &dyn Store) -> Result<(u64, RotationDoc), StoreError> {
    load_scope(store, &Scope::Shared)
}

/// Reads a scope's rotation state and its revision (0: none yet).
pub fn load_scope(store: &dyn Store, scope: &Scope) -> Result<(u64, RotationDoc), StoreError> {
    match store.load_document(&scope.document())? {
        None => Ok((0, RotationDoc::default())),
        Some((rev, bytes)) => serde_json::from_slice(&bytes)
            .map(|d| (rev, d))
            .map_err(|e| StoreError::Corrupt {
                what: "root rotation document",
                reason: e.to_string(),
            }),
    }
}

/// While the shared root's rotation, or that of `mesh`'s own root, is ACTIVE, what the sync
/// answer tells a node of `mesh` (`None`: the public bundle): the roots that sign now (the
/// shared root and, under limited trust, every mesh root) and the window to re-issue over,
/// from the latest activation. A node of another mesh gets no hint from a mesh's rotation.
pub fn hint(
    serving: &crate::holder::Serving,
    mesh: Option<&str>,
) -> Option<meshcert_protocol::api::RotationHint> {
    let (authority, config) = (&serving.authority, &serving.config);
    let own = mesh.and_then(|m| serving.mesh_rotations.get(m));
    let activated_at = std::iter::once(&serving.rotation)
        .chain(own)
        .filter_map(|d| d.rotation.as_ref().filter(|r| r.phase == Phase::Active))
        .map(|r| r.activated_at.unwrap_or(r.started_at))
        .max()?;
    let mut roots = vec![meshcert_protocol::api::Der(authority.root().der.clone())];
    roots.extend(
        config
            .meshes
            .iter()
            .filter_map(|m| authority.mesh_root(&m.name))
            .map(|r| meshcert_protocol::api::Der(r.der.clone())),
    );
    Some(meshcert_protocol::api::RotationHint {
        active_roots: roots,
        activated_at,
        window_secs: config.holder.root_rotation.window.as_secs(),
    })
}

/// During a rotation, the admin bundle (what new agents trust the holder and the mesh with):
/// every shared root, the one that signs the API's server certificate first; for a mesh with
/// its own root, that mesh's roots, the signing one first. `None` outside a rotation.
pub fn bundle_pem(serving: &crate::holder::Serving, mesh: Option<&str>) -> Option<String> {
    let a = &serving.authority;
    if let Some(m) = mesh.filter(|m| a.mesh_root(m).is_some()) {
        let roots = a.trust_roots(m);
        return (roots.len() > 1).then(|| roots.iter().map(|r| r.pem()).collect());
    }
    if a.next_root().is_none() && a.previous_root().is_none() {
        return None;
    }
    let server = a.server_root();
    let mut pem = server.pem();
    for r in a.shared_roots() {
        if r.der != server.der {
            pem.push_str(&r.pem());
        }
    }
    Some(pem)
}

/// What the authority loads for this state.
pub fn plan(doc: &RotationDoc, state_dir: &Path) -> RootPlan {
    RootPlan {
        base: doc
            .current
            .as_ref()
            .zip(doc.replaced.as_ref())
            .map(|(c, r)| (r.clone(), root_files(state_dir, c))),
        next: doc
            .rotation
            .as_ref()
            .map(|r| root_files(state_dir, &r.next)),
        next_signs: doc
            .rotation
            .as_ref()
            .is_some_and(|r| r.phase == Phase::Active),
        meshes: std::collections::BTreeMap::new(),
    }
}

/// What the authority loads: the shared root's [`plan`] with each mesh root's.
pub fn plans(
    shared: &RotationDoc,
    meshes: &std::collections::BTreeMap<String, RotationDoc>,
    state_dir: &Path,
) -> RootPlan {
    RootPlan {
        meshes: meshes
            .iter()
            .map(|(m, d)| (m.clone(), plan(d, state_dir)))
            .collect(),
        ..plan(shared, state_dir)
    }
}

/// One node, as the phase machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Its name.
    pub name: String,
    /// Banned nodes do not count.
    pub banned: bool,
    /// When it was last heard from (or first seen), Unix seconds.
    pub last_seen: u64,
    /// The bundle version it last reported.
    pub bundle_version: Option<u64>,
    /// Unexpired SVIDs it reports.
    pub svids: usize,
    /// Of those, the ones issued before the activation (chained to the previous root).
    pub old_svids: usize,
}

/// What the machine decides from.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Now, Unix seconds.
    pub now: u64,
    /// Every node.
    pub nodes: Vec<NodeFacts>,
    /// Silence after which a node is stale (three heartbeats).
    pub stale_after: Duration,
    /// The longest TTL the holder signs (the default of `retireAfter`).
    pub longest_ttl: Duration,
}

/// The next step of a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Step {
    /// Nothing to do yet.
    #[default]
    Wait,
    /// Start signing with the next root; `left_behind` did not acknowledge.
    Activate {
        /// Nodes that had not acknowledged.
        left_behind: Vec<String>,
    },
    /// The previous root leaves the bundles.
    Retire,
}

/// The machine's reading of a rotation: its step and the counts status shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assessment {
    /// What to do now.
    #[serde(skip)]
    pub step: Step,
    /// Nodes expected to acknowledge (not banned, not stale when the rotation started).
    pub expected: usize,
    /// Of those, the ones reporting the prepared bundle version or a later one.
    pub acknowledged: usize,
    /// Expected nodes that have not acknowledged.
    pub pending: Vec<String>,
    /// Unexpired SVIDs reported.
    pub svids: usize,
    /// Of those, issued under the next root (after activation).
    pub reissued: usize,
    /// What keeps the next step from happening, in words.
    pub blocked_by: Option<String>,
}

/// Decides a rotation's next step at `facts.now`; pure.
pub fn assess(r: &InProgress, facts: &Facts, settings: &Settings) -> Assessment {
    let svids: usize = facts.nodes.iter().map(|n| n.svids).sum();
    let old: usize = facts.nodes.iter().map(|n| n.old_svids).sum();
    let since = r.started_at.saturating_sub(facts.stale_after.as_secs());
    let expected: Vec<&NodeFacts> = facts
        .nodes
        .iter()
        .filter(|n| !n.banned && n.last_seen >= since)
        .collect();
    let acked = |n: &&NodeFacts| {
        r.prepared_version
            .is_some_and(|v| n.bundle_version.is_some_and(|b| b >= v))
    };
    let pending: Vec<String> = expected
        .iter()
        .filter(|n| !acked(n))
        .map(|n| n.name.clone())
        .collect();
    let mut a = Assessment {
        step: Step::Wait,
        expected: expected.len(),
        acknowledged: expected.len() - pending.len(),
        pending,
        svids,
        reissued: if r.phase == Phase::Active {
            svids - old
        } else {
            0
        },
        blocked_by: None,
    };
    match r.phase {
        Phase::Prepared => prepared_step(r, facts, settings, &mut a),
        Phase::Active => active_step(r, facts, settings, old, &mut a),
        Phase::Retired | Phase::Aborted => {}
    }
    a
}

fn prepared_step(r: &InProgress, facts: &Facts, settings: &Settings, a: &mut Assessment) {
    if r.prepared_version.is_none() {
        a.blocked_by = Some("the bundle with the next root is not serving yet".into());
        return;
    }
    if a.pending.is_empty() {
        a.step = Step::Activate {
            left_behind: Vec::new(),
        };
        return;
    }
    let deadline = r.started_at + settings.ack_timeout.as_secs();
    if facts.now >= deadline && settings.min_share.reached(a.acknowledged, a.expected) {
        a.step = Step::Activate {
            left_behind: a.pending.clone(),
        };
        return;
    }
    a.blocked_by = Some(if facts.now < deadline {
        format!(
            "{} of {} nodes have not acknowledged the bundle with the next root ({}); waiting for all of them until {} (holder.rootRotation.ackTimeout)",
            a.pending.len(),
            a.expected,
            a.pending.join(", "),
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(deadline)),
        )
    } else {
        format!(
            "{} of {} nodes acknowledged the bundle with the next root, below holder.rootRotation.minShare; waiting for {}",
            a.acknowledged,
            a.expected,
            a.pending.join(", "),
        )
    });
}

fn active_step(r: &InProgress, facts: &Facts, settings: &Settings, old: usize, a: &mut Assessment) {
    let activated = r.activated_at.unwrap_or(r.started_at);
    let after = settings.retire_after.unwrap_or(facts.longest_ttl);
    let earliest = activated + after.as_secs();
    let mut blocked = Vec::new();
    if old > 0 {
        let nodes: Vec<&str> = facts
            .nodes
            .iter()
            .filter(|n| n.old_svids > 0)
            .map(|n| n.name.as_str())
            .collect();
        blocked.push(format!(
            "{old} reported SVIDs still chain to the previous root (on {})",
            nodes.join(", ")
        ));
    }
    if facts.now < earliest {
        blocked.push(format!(
            "the longest TTL has not passed since activation (until {}, holder.rootRotation.retireAfter)",
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(earliest))
        ));
    }
    if blocked.is_empty() {
        a.step = Step::Retire;
    } else {
        a.blocked_by = Some(blocked.join("; "));
    }
}

/// Whether a builtin root valid from `not_before` to `not_after` is due to start its rotation at
/// `now` (`auto_at` of its life has passed; never when `auto_at` is 0).
pub fn auto_due(
    not_before: SystemTime,
    not_after: SystemTime,
    auto_at: Share,
    now: SystemTime,
) -> bool {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    auto_at.0 > 0 && now >= not_before + auto_at.of(life)
}

/// Why a rotation command or step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The next root cannot be made, read or written.
    #[error(transparent)]
    Authority(#[from] crate::authority::AuthorityError),
    /// The holder cannot serve the new state.
    #[error(transparent)]
    Holder(#[from] crate::holder::HolderError),
    /// Another writer changed the state first (a replica, or a concurrent command).
    #[error("the rotation state changed meanwhile; try again")]
    Conflict,
    /// A refusal with its stable code.
    #[error("{0}")]
    Refused(ApiError),
}

impl RotationError {
    /// The answer to the operator.
    pub fn into_api(self) -> ApiError {
        match self {
            Self::Refused(e) => e,
            Self::Conflict => ApiError::new(ErrorCode::Unavailable, self.to_string()),
            other => {
                tracing::error!(error = %other, "root rotation failed");
                ApiError::new(
                    ErrorCode::Internal,
                    format!("root rotation failed: {other}"),
                )
            }
        }
    }
}

/// Serialises the holder's own rotation steps (commands and ticks).
static STEPS: Mutex<()> = Mutex::new(());

fn save(
    store: &dyn Store,
    scope: &Scope,
    rev: u64,
    doc: &RotationDoc,
) -> Result<u64, RotationError> {
    let bytes = serde_json::to_vec(doc).map_err(|e| StoreError::Corrupt {
        what: "root rotation document",
        reason: e.to_string(),
    })?;
    store
        .store_document(&scope.document(), rev, &bytes)?
        .ok_or(RotationError::Conflict)
}

/// The state `serving` was opened with for `scope`.
fn served_doc(serving: &crate::holder::Serving, scope: &Scope) -> RotationDoc {
    match scope.mesh() {
        None => serving.rotation.clone(),
        Some(m) => serving.mesh_rotations.get(m).cloned().unwrap_or_default(),
    }
}

/// The root of `scope` that signs now; refused for a mesh without its own root.
fn scope_root<'a>(
    serving: &'a crate::holder::Serving,
    scope: &Scope,
) -> Result<&'a SigningCa, RotationError> {
    match scope.mesh() {
        None => Ok(serving.authority.root()),
        Some(m) => serving.authority.mesh_root(m).ok_or_else(|| {
            RotationError::Refused(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "mesh `{m}` has no root of its own: only under limited trust does a mesh root rotate (the shared root rotates without --mesh)"
                ),
            ))
        }),
    }
}

/// How `scope`'s root is configured.
fn scope_source<'a>(serving: &'a crate::holder::Serving, scope: &Scope) -> &'a RootSource {
    scope
        .mesh()
        .and_then(|m| serving.config.mesh_roots.get(m))
        .unwrap_or(&serving.config.root)
}

/// Serves the persisted state: reopens the authority and renews the API's TLS settings.
fn serve_state(holder: &Holder, now: SystemTime) -> Result<(), RotationError> {
    holder.reopen(now)?;
    match crate::server::tls_config(holder, now) {
        Ok(tls) => holder.set_tls(tls),
        Err(e) => {
            tracing::error!(error = %e, "cannot renew the TLS configuration after a rotation step")
        }
    }
    Ok(())
}

/// A staged root given to `root rotate --cert --key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Staged {
    /// The certificate (PEM file on the holder's machine).
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
}

/// `meshcert-ca root rotate [--mesh NAME]`: prepares the next root of `scope` (generated, or
/// `staged`) and puts it in the bundles that hold that root. Refused while a rotation of the
/// scope is under way, and for a staged root the holder already uses anywhere.
pub fn rotate(
    holder: &Holder,
    scope: &Scope,
    staged: Option<&Staged>,
    reason: &str,
    now: SystemTime,
) -> Result<(), RotationError> {
    let _guard = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (rev, mut doc) = load_scope(holder.store.as_ref(), scope)?;
    if let Some(r) = &doc.rotation {
        return Err(RotationError::Refused(ApiError::new(
            ErrorCode::RotationInProgress,
            format!(
                "a rotation of the {scope} is already {:?} (next root {}); finish or abort it first",
                r.phase, r.next
            ),
        )));
    }
    let serving = holder.serving();
    let current = scope_root(&serving, scope)?;
    let next = prepare_root(&serving, holder.store.as_ref(), scope, staged, now)?;
    if in_use(&serving).contains(&next) {
        return Err(RotationError::Refused(ApiError::new(
            ErrorCode::BadRoot,
            "the staged root is already one of the holder's roots; a rotation needs a different one (under limited trust every mesh and the shared root each need their own)",
        )));
    }
    doc.rotation = Some(InProgress {
        phase: Phase::Prepared,
        next: next.clone(),
        previous: current.fingerprint(),
        reason: reason.to_owned(),
        started_at: unix(now),
        prepared_version: None,
        activated_at: None,
        left_behind: Vec::new(),
    });
    drop(serving);
    let rev = save(holder.store.as_ref(), scope, rev, &doc)?;
    tracing::info!(scope = %scope, next = %next, reason, "root rotation PREPARED: the next root joins the bundles");
    serve_state(holder, now)?;
    record_prepared_version(holder, scope, rev, doc)
}

/// The fingerprints of every root the holder serves: shared and per mesh, signing, next and
/// previous.
fn in_use(serving: &crate::holder::Serving) -> Vec<String> {
    let a = &serving.authority;
    let mut out: Vec<String> = a.shared_roots().iter().map(|r| r.fingerprint()).collect();
    for m in a.meshes() {
        if a.mesh_root(&m.name).is_some() {
            out.extend(a.trust_roots(&m.name).iter().map(|r| r.fingerprint()));
        }
    }
    out
}

/// Once the bundle with the next root serves, records its version (what nodes acknowledge).
fn record_prepared_version(
    holder: &Holder,
    scope: &Scope,
    rev: u64,
    mut doc: RotationDoc,
) -> Result<(), RotationError> {
    let version = holder.serving().bundle_version;
    if let Some(r) = doc.rotation.as_mut()
        && r.prepared_version.is_none()
    {
        r.prepared_version = Some(version);
        save(holder.store.as_ref(), scope, rev, &doc)?;
        tracing::info!(
            scope = %scope,
            bundle_version = version,
            "the bundle with the next root serves"
        );
    }
    Ok(())
}

/// Makes the next root's files: a copy of the staged root, or a new one with the builtin
/// parameters (those of the configuration when the root is builtin); returns its fingerprint.
/// Replicas sharing a datastore receive it sealed before the rotation names it
/// ([`crate::sealed::share_rotation_roots`]).
fn prepare_root(
    serving: &crate::holder::Serving,
    store: &dyn Store,
    scope: &Scope,
    staged: Option<&Staged>,
    now: SystemTime,
) -> Result<String, RotationError> {
    let dir = &serving.config.holder.state_dir;
    crate::authority::create_dir(&dir.join(FOLDER))?;
    let bad = |e: crate::authority::AuthorityError| {
        RotationError::Refused(ApiError::new(ErrorCode::BadRoot, e.to_string()))
    };
    let ca: SigningCa = match staged {
        Some(s) => crate::authority::load_root(
            &RootSource::Provided {
                cert_file: s.cert_file.clone(),
                key_file: s.key_file.clone(),
            },
            now,
        )
        .map_err(bad)?,
        None => {
            let current = scope_root(serving, scope)?;
            let (rsa_bits, ttl_days, org_name) = match scope_source(serving, scope) {
                RootSource::Builtin {
                    ttl_days,
                    rsa_bits,
                    org_name,
                } => (*rsa_bits, *ttl_days, org_name.clone()),
                RootSource::Provided { .. } => {
                    let bits = u32::try_from(crate::authority::key_bits(current)).unwrap_or(4096);
                    let bits = if [2048, 3072, 4096].contains(&bits) {
                        bits
                    } else {
                        4096
                    };
                    (bits, 365, crate::authority::org_of(current))
                }
            };
            crate::authority::generate_root(
                &common_name(serving, scope),
                &org_name,
                rsa_bits,
                ttl_days,
                now,
            )?
        }
    };
    let fp = fingerprint(&ca.der);
    crate::authority::persist_root(&ca, &root_files(dir, &fp))?;
    crate::sealed::share_rotation_roots(&serving.config, store)
        .map_err(crate::holder::HolderError::from)?;
    Ok(fp)
}

/// The common name of `scope`'s generated roots (as the authority names configured ones).
fn common_name(serving: &crate::holder::Serving, scope: &Scope) -> String {
    match scope.mesh() {
        None => serving.config.display_name.clone(),
        Some(m) => format!("{} mesh {m}", serving.config.display_name),
    }
}

/// `meshcert-ca root abort [--mesh NAME]`: before ACTIVE, the next root leaves the bundles and
/// the current root stays. Refused once the next root signs.
pub fn abort(holder: &Holder, scope: &Scope, now: SystemTime) -> Result<(), RotationError> {
    let _guard = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (rev, mut doc) = load_scope(holder.store.as_ref(), scope)?;
    let Some(r) = doc.rotation.take() else {
        return Err(RotationError::Refused(ApiError::new(
            ErrorCode::NoRotation,
            "no rotation is under way",
        )));
    };
    if r.phase != Phase::Prepared {
        return Err(RotationError::Refused(ApiError::new(
            ErrorCode::RotationActive,
            "the next root already signs (ACTIVE): a rotation can be aborted only while PREPARED; let it finish",
        )));
    }
    doc.last = Some(Finished {
        phase: Phase::Aborted,
        next: r.next.clone(),
        previous: r.previous,
        at: unix(now),
        left_behind: Vec::new(),
    });
    save(holder.store.as_ref(), scope, rev, &doc)?;
    tracing::info!(scope = %scope, next = %r.next, "root rotation ABORTED: the next root leaves the bundles");
    serve_state(holder, now)
}

/// The facts the machine needs, from the datastore: every node for the shared root, the
/// mesh's nodes only for a mesh's own root.
fn facts(
    holder: &Holder,
    scope: &Scope,
    activated_at: Option<u64>,
    now: SystemTime,
) -> Result<Facts, StoreError> {
    let config = holder.config();
    let nodes = holder.store.nodes()?;
    let reports = holder.store.reports()?;
    let now_s = unix(now);
    // Serials issued from the activation on chain to the next root.
    let new_serials: std::collections::HashSet<String> = match activated_at {
        Some(at) => holder
            .store
            .issuances()?
            .into_iter()
            .filter(|i| i.issued_at >= at)
            .map(|i| i.serial)
            .collect(),
        None => std::collections::HashSet::new(),
    };
    let nodes = scope_facts(scope, &nodes, &reports, activated_at, &new_serials, now_s);
    Ok(Facts {
        now: now_s,
        nodes,
        stale_after: config.holder.heartbeat * crate::status::STALE_HEARTBEATS,
        longest_ttl: config.holder.svid_max_ttl.max(config.holder.node_svid_ttl),
    })
}

/// The facts of the nodes that count for `scope`, pure: every node for the shared root, the
/// mesh's own nodes for a mesh root.
pub fn scope_facts(
    scope: &Scope,
    nodes: &[crate::store::NodeRecord],
    reports: &[crate::store::StoredReport],
    activated_at: Option<u64>,
    new_serials: &std::collections::HashSet<String>,
    now: u64,
) -> Vec<NodeFacts> {
    nodes
        .iter()
        .filter(|n| scope.mesh().is_none_or(|m| n.mesh == m))
        .map(|n| {
            let report = reports.iter().find(|r| r.node == n.name);
            node_facts(n, report, activated_at, new_serials, now)
        })
        .collect()
}

/// One node's facts from its latest report, pure: its unexpired SVIDs (every identity's and
/// its node SVID) and, once the next root signs, those not issued since (`new_serials`).
pub fn node_facts(
    node: &crate::store::NodeRecord,
    report: Option<&crate::store::StoredReport>,
    activated_at: Option<u64>,
    new_serials: &std::collections::HashSet<String>,
    now: u64,
) -> NodeFacts {
    let live: Vec<&str> = report
        .map(|r| {
            let identities = r.report.identities.iter().filter_map(|i| {
                i.serial
                    .as_deref()
                    .filter(|_| i.not_after.is_some_and(|t| t > now))
            });
            let node_svid = r
                .report
                .node_svid
                .as_ref()
                .filter(|s| s.not_after > now)
                .map(|s| &*s.serial);
            identities.chain(node_svid).collect()
        })
        .unwrap_or_default();
    let old = live
        .iter()
        .filter(|s| activated_at.is_some() && !new_serials.contains(**s))
        .count();
    NodeFacts {
        name: node.name.clone(),
        banned: node.banned,
        last_seen: report.map_or(node.first_seen, |r| r.received_at),
        bundle_version: report.map(|r| r.report.bundle_version),
        svids: live.len(),
        old_svids: old,
    }
}

/// One round of the driver (every few seconds), for every scope: records the prepared bundle
/// version, activates, retires, or starts a builtin root's rotation when it is due. Every
/// scope is tried; the first failure is returned.
pub fn tick(holder: &Holder, now: SystemTime) -> Result<(), RotationError> {
    let mut first = Ok(());
    for scope in Scope::all(&holder.config()) {
        let r = tick_scope(holder, &scope, now);
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// One round of the driver for one scope.
pub fn tick_scope(holder: &Holder, scope: &Scope, now: SystemTime) -> Result<(), RotationError> {
    let (rev, doc) = {
        let _guard = STEPS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        load_scope(holder.store.as_ref(), scope)?
    };
    let settings = holder.config().holder.root_rotation;
    let Some(r) = doc.rotation.clone() else {
        if served_doc(&holder.serving(), scope) != doc {
            // Retired or aborted by another replica: serve that first.
            let _guard = STEPS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return serve_state(holder, now);
        }
        let serving = holder.serving();
        let Ok(root) = scope_root(&serving, scope) else {
            return Ok(());
        };
        let builtin = matches!(scope_source(&serving, scope), RootSource::Builtin { .. });
        if builtin && auto_due(root.not_before, root.not_after, settings.auto_at, now) {
            drop(serving);
            tracing::info!(
                scope = %scope,
                "the builtin root reached holder.rootRotation.autoAt of its life; starting its rotation"
            );
            return rotate(holder, scope, None, "automatic", now);
        }
        return Ok(());
    };
    let _guard = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if served_doc(&holder.serving(), scope)
        .rotation
        .as_ref()
        .map(|s| s.phase)
        != Some(r.phase)
    {
        // A step persisted by another replica: serve it first.
        serve_state(holder, now)?;
    }
    if r.prepared_version.is_none() {
        return record_prepared_version(holder, scope, rev, doc);
    }
    let facts = facts(holder, scope, r.activated_at, now)?;
    match assess(&r, &facts, &settings).step {
        Step::Wait => Ok(()),
        Step::Activate { left_behind } => activate(holder, scope, rev, doc, left_behind, now),
        Step::Retire => retire(holder, scope, rev, doc, now),
    }
}

/// [`tick`], with each scope's failure logged (and retried at the next round).
pub fn tick_logged(holder: &Holder, now: SystemTime) {
    for scope in Scope::all(&holder.config()) {
        if let Err(e) = tick_scope(holder, &scope, now) {
            tracing::error!(scope = %scope, error = %e, "root rotation step failed; retrying");
        }
    }
}

fn activate(
    holder: &Holder,
    scope: &Scope,
    rev: u64,
    mut doc: RotationDoc,
    left_behind: Vec<String>,
    now: SystemTime,
) -> Result<(), RotationError> {
    let Some(r) = doc.rotation.as_mut() else {
        return Ok(());
    };
    // Issuances from this second on are the next root's: signing switches once it has begun.
    let at = unix(now) + 1;
    r.phase = Phase::Active;
    r.activated_at = Some(at);
    r.left_behind.clone_from(&left_behind);
    let next = r.next.clone();
    save(holder.store.as_ref(), scope, rev, &doc)?;
    let start = std::time::UNIX_EPOCH + Duration::from_secs(at);
    if let Ok(wait) = start.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    if left_behind.is_empty() {
        tracing::info!(scope = %scope, next = %next, "root rotation ACTIVE: every node acknowledged; the next root signs");
    } else {
        tracing::warn!(scope = %scope, next = %next, left_behind = ?left_behind, "root rotation ACTIVE after holder.rootRotation.ackTimeout; these nodes had not acknowledged");
    }
    serve_state(holder, start.max(now))
}

fn retire(
    holder: &Holder,
    scope: &Scope,
    rev: u64,
    mut doc: RotationDoc,
    now: SystemTime,
) -> Result<(), RotationError> {
    let Some(r) = doc.rotation.take() else {
        return Ok(());
    };
    let serving = holder.serving();
    let configured = match scope.mesh() {
        None => Some(serving.authority.configured_fingerprint()),
        Some(m) => serving.authority.mesh_configured_fingerprint(m),
    }
    .unwrap_or_default()
    .to_owned();
    drop(serving);
    doc.current = Some(r.next.clone());
    doc.replaced = Some(configured);
    doc.last = Some(Finished {
        phase: Phase::Retired,
        next: r.next.clone(),
        previous: r.previous.clone(),
        at: unix(now),
        left_behind: r.left_behind,
    });
    save(holder.store.as_ref(), scope, rev, &doc)?;
    tracing::info!(scope = %scope, next = %r.next, previous = %r.previous, "root rotation RETIRED: the previous root left the bundles");
    serve_state(holder, now)
}

/// `meshcert-ca root status`: the rotation state in JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// The mesh whose own root this is (limited trust); absent for the shared root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// `IDLE`, `PREPARED` or `ACTIVE`.
    pub phase: String,
    /// The root that signs now (fingerprint) and its expiry.
    pub signing_root: String,
    /// Its end of validity.
    pub signing_root_not_after: String,
    /// The rotation under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation: Option<InProgress>,
    /// Counts and what blocks the next step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Assessment>,
    /// The last rotation that ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Finished>,
    /// When a builtin root starts its rotation on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub automatic_at: Option<String>,
    /// With the shared root under limited trust: the phase of each mesh root's rotation
    /// (`meshcert-ca root status --mesh NAME` shows one).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub meshes: std::collections::BTreeMap<String, String>,
}

fn phase_name(doc: &RotationDoc) -> String {
    doc.rotation
        .as_ref()
        .map_or("IDLE".into(), |r| format!("{:?}", r.phase).to_uppercase())
}

/// A scope's rotation status at `now`.
pub fn status(
    holder: &Holder,
    scope: &Scope,
    now: SystemTime,
) -> Result<RotationStatus, RotationError> {
    let (_, doc) = load_scope(holder.store.as_ref(), scope)?;
    let serving = holder.serving();
    let root = scope_root(&serving, scope)?;
    let settings = &serving.config.holder.root_rotation;
    let progress = match &doc.rotation {
        Some(r) => Some(assess(
            r,
            &facts(holder, scope, r.activated_at, now)?,
            settings,
        )),
        None => None,
    };
    let mut meshes = std::collections::BTreeMap::new();
    if *scope == Scope::Shared {
        for m in serving.config.mesh_roots.keys() {
            let (_, d) = load_scope(holder.store.as_ref(), &Scope::Mesh(m.clone()))?;
            meshes.insert(m.clone(), phase_name(&d));
        }
    }
    let builtin = matches!(scope_source(&serving, scope), RootSource::Builtin { .. });
    let life = root
        .not_after
        .duration_since(root.not_before)
        .unwrap_or_default();
    Ok(RotationStatus {
        mesh: scope.mesh().map(str::to_owned),
        phase: phase_name(&doc),
        signing_root: root.fingerprint(),
        signing_root_not_after: rfc3339(root.not_after),
        rotation: doc.rotation.clone(),
        progress,
        last: doc.last.clone(),
        automatic_at: (builtin && settings.auto_at.0 > 0)
            .then(|| rfc3339(root.not_before + settings.auto_at.of(life))),
        meshes,
    })
}

/// The table form of [`RotationStatus`].
pub fn render(s: &RotationStatus) -> String {
    let mut out = s
        .mesh
        .as_ref()
        .map(|m| format!("mesh: {m}\n"))
        .unwrap_or_default();
    out.push_str(&format!(
        "phase: {}\nsigning root: {} (until {})\n",
        s.phase, s.signing_root, s.signing_root_not_after
    ));
    if let Some(r) = &s.rotation {
        out.push_str(&format!(
            "next root: {}\nprevious root: {}\nstarted: {} ({})\n",
            r.next,
            r.previous,
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(r.started_at)),
            r.reason
        ));
        if let Some(v) = r.prepared_version {
            out.push_str(&format!("bundle version with the next root: v{v}\n"));
        }
        if !r.left_behind.is_empty() {
            out.push_str(&format!(
                "left behind at activation: {}\n",
                r.left_behind.join(", ")
            ));
        }
    }
    if let Some(p) = &s.progress {
        out.push_str(&format!(
            "acknowledged: {}/{}\nre-issued: {}/{}\n",
            p.acknowledged, p.expected, p.reissued, p.svids
        ));
        if let Some(b) = &p.blocked_by {
            out.push_str(&format!("blocked by: {b}\n"));
        }
    }
    if let Some(l) = &s.last {
        out.push_str(&format!(
            "last rotation: {:?} at {} ({} → {})\n",
            l.phase,
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(l.at)),
            l.previous,
            l.next
        ));
        if !l.left_behind.is_empty() {
            out.push_str(&format!("  left behind: {}\n", l.left_behind.join(", ")));
        }
    }
    if let Some(a) = &s.automatic_at {
        out.push_str(&format!("automatic rotation at: {a}\n"));
    }
    for (m, phase) in &s.meshes {
        out.push_str(&format!("mesh {m} root: {phase}\n"));
    }
    out
}

/// Serves the rotation state the datastore holds when this replica serves another one (a step
/// persisted by another replica, or by this one a moment ago): called at each move of the
/// datastore's change version, before watching agents are told (`crate::push::follow`). Waits
/// for a step of this replica under way, so the step is served when this returns.
pub fn follow(holder: &Holder, now: SystemTime) {
    let _guard = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let doc = match load(holder.store.as_ref()) {
        Ok((_, doc)) => doc,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the root rotation state; the next round retries");
            return;
        }
    };
    let serving = holder.serving();
    let stale = match (&doc.rotation, &serving.rotation.rotation) {
        (Some(stored), Some(served)) => stored.phase != served.phase || stored.next != served.next,
        (None, None) => doc != serving.rotation,
        _ => true,
    };
    drop(serving);
    if stale && let Err(e) = serve_state(holder, now) {
        tracing::error!(error = %e, "cannot serve the root rotation step another replica persisted; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn node(name: &str, seen: u64, version: Option<u64>) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            banned: false,
            last_seen: seen,
            bundle_version: version,
            svids: 0,
            old_svids: 0,
        }
    }

    fn prepared() -> InProgress {
        InProgress {
            phase: Phase::Prepared,
            next: "n".into(),
            previous: "p".into(),
            reason: "operator".into(),
            started_at: T0,
            prepared_version: Some(5),
            activated_at: None,
            left_behind: Vec::new(),
        }
    }

    fn facts(now: u64, nodes: Vec<NodeFacts>) -> Facts {
        Facts {
            now,
            nodes,
            stale_after: Duration::from_secs(90),
            longest_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn shares_parse_in_three_forms() {
        assert_eq!(Share::parse("5/6"), Ok(Share(833_333)));
        assert_eq!(Share::parse("90%"), Ok(Share(900_000)));
        assert_eq!(Share::parse("0.5"), Ok(Share(500_000)));
        assert!(Share::parse("7/6").is_err());
        assert!(Share::parse("x").is_err());
        assert!(Share(900_000).reached(9, 10));
        assert!(!Share(900_000).reached(8, 10));
        assert!(Share::ALL.reached(0, 0));
    }

    #[test]
    fn activation_waits_for_every_node_that_was_live_at_the_start() {
        let s = Settings::default();
        let r = prepared();
        // b acknowledged, a still holds v4; c was stale before the rotation started.
        let nodes = vec![
            node("a", T0, Some(4)),
            node("b", T0, Some(5)),
            node("c", T0 - 1000, Some(1)),
        ];
        let a = assess(&r, &facts(T0 + 10, nodes.clone()), &s);
        assert_eq!(a.step, Step::Wait);
        assert_eq!((a.acknowledged, a.expected), (1, 2));
        assert_eq!(a.pending, vec!["a".to_string()]);
        assert!(
            a.blocked_by.as_deref().is_some_and(|b| b.contains("a")),
            "{a:?}"
        );
        let mut nodes = nodes;
        nodes[0].bundle_version = Some(6);
        let a = assess(&r, &facts(T0 + 20, nodes), &s);
        assert_eq!(
            a.step,
            Step::Activate {
                left_behind: vec![]
            }
        );
    }

    #[test]
    fn after_the_timeout_the_minimum_share_activates_and_names_who_was_left_behind() {
        let s = Settings {
            ack_timeout: Duration::from_secs(60),
            min_share: Share(500_000),
            ..Settings::default()
        };
        let r = prepared();
        let nodes = vec![node("a", T0, Some(4)), node("b", T0, Some(5))];
        assert_eq!(
            assess(&r, &facts(T0 + 59, nodes.clone()), &s).step,
            Step::Wait
        );
        assert_eq!(
            assess(&r, &facts(T0 + 60, nodes.clone()), &s).step,
            Step::Activate {
                left_behind: vec!["a".into()]
            }
        );
        let strict = Settings {
            min_share: Share::ALL,
            ..s
        };
        let a = assess(&r, &facts(T0 + 600, nodes), &strict);
        assert_eq!(a.step, Step::Wait);
        assert!(a.blocked_by.is_some_and(|b| b.contains("minShare")));
    }

    #[test]
    fn nothing_activates_before_the_prepared_bundle_serves() {
        let r = InProgress {
            prepared_version: None,
            ..prepared()
        };
        let a = assess(&r, &facts(T0 + 99_999, vec![]), &Settings::default());
        assert_eq!(a.step, Step::Wait);
    }

    #[test]
    fn retirement_waits_for_old_svids_and_the_longest_ttl() {
        let s = Settings {
            retire_after: Some(Duration::from_secs(100)),
            ..Settings::default()
        };
        let r = InProgress {
            phase: Phase::Active,
            activated_at: Some(T0 + 10),
            ..prepared()
        };
        let mut n = node("a", T0, Some(6));
        n.svids = 3;
        n.old_svids = 1;
        let a = assess(&r, &facts(T0 + 200, vec![n.clone()]), &s);
        assert_eq!(a.step, Step::Wait);
        assert_eq!(a.reissued, 2);
        assert!(
            a.blocked_by
                .is_some_and(|b| b.contains("previous root (on a)"))
        );
        n.old_svids = 0;
        assert_eq!(
            assess(&r, &facts(T0 + 109, vec![n.clone()]), &s).step,
            Step::Wait
        );
        assert_eq!(assess(&r, &facts(T0 + 110, vec![n]), &s).step, Step::Retire);
    }

    fn record(name: &str, mesh: &str) -> crate::store::NodeRecord {
        crate::store::NodeRecord {
            name: name.into(),
            mesh: mesh.into(),
            spiffe_id: format!("spiffe://{mesh}.test/meshcert/node/{name}"),
            first_seen: T0 - 10,
            banned: false,
            cluster: None,
        }
    }

    /// A report of bundle `version`, one workload SVID and the node SVID, by serial.
    fn report(node: &str, version: u64, svid: &str, node_svid: &str) -> crate::store::StoredReport {
        use meshcert_protocol::{CertState, IdentityReport, NodeReport, NodeSvidReport};
        crate::store::StoredReport {
            node: node.into(),
            report: NodeReport {
                bundle_version: version,
                enforcement: None,
                identities: vec![IdentityReport {
                    entry_id: "web".into(),
                    spiffe_id: meshcert_protocol::SpiffeId::new("spiffe://a.test/web").expect("id"),
                    state: CertState::Issued,
                    serial: Some(svid.into()),
                    not_after: Some(T0 + 3600),
                    next_rotation: None,
                    last_error: None,
                    attempts: 0,
                }]
                .into(),
                node_svid: Some(NodeSvidReport {
                    serial: node_svid.into(),
                    not_before: T0 - 10,
                    not_after: T0 + 3600,
                }),
            },
            received_at: T0,
        }
    }

    #[test]
    fn a_mesh_root_rotation_is_gated_on_that_mesh_s_nodes_only() {
        let s = Settings::default();
        let r = prepared();
        let nodes = [record("a1", "mesh-a"), record("b1", "mesh-b")];
        // a1 acknowledged (v5); b1 of the other mesh never did.
        let reports = [report("a1", 5, "s1", "n1"), report("b1", 4, "s2", "n2")];
        let none = std::collections::HashSet::new();
        let scope = Scope::Mesh("mesh-a".into());
        let mesh_a = scope_facts(&scope, &nodes, &reports, None, &none, T0 + 10);
        assert_eq!(mesh_a.len(), 1);
        assert_eq!(
            assess(&r, &facts(T0 + 10, mesh_a), &s).step,
            Step::Activate {
                left_behind: vec![]
            }
        );
        // The shared root counts every node: b1 holds it back.
        let all = scope_facts(&Scope::Shared, &nodes, &reports, None, &none, T0 + 10);
        assert_eq!(assess(&r, &facts(T0 + 10, all), &s).step, Step::Wait);
        assert_eq!(scope.document(), "root-rotation/mesh-a");
        assert_eq!(Scope::Shared.document(), DOCUMENT);
    }

    #[test]
    fn retirement_waits_for_a_node_svid_still_under_the_previous_root() {
        let s = Settings {
            retire_after: Some(Duration::from_secs(1)),
            ..Settings::default()
        };
        let r = InProgress {
            phase: Phase::Active,
            activated_at: Some(T0 + 1),
            ..prepared()
        };
        let nodes = [record("a1", "mesh-a")];
        let scope = Scope::Mesh("mesh-a".into());
        // The workload SVID was re-issued after the activation; the node SVID was not.
        let new: std::collections::HashSet<String> = ["s-new".to_owned()].into();
        let reports = [report("a1", 5, "s-new", "n-old")];
        let f = scope_facts(&scope, &nodes, &reports, Some(T0 + 1), &new, T0 + 100);
        assert_eq!((f[0].svids, f[0].old_svids), (2, 1));
        let a = assess(&r, &facts(T0 + 100, f), &s);
        assert_eq!(a.step, Step::Wait);
        assert!(
            a.blocked_by.as_deref().is_some_and(|b| b.contains("on a1")),
            "{a:?}"
        );
        // Renewed: the node SVID is under the next root too.
        let new: std::collections::HashSet<String> =
            ["s-new".to_owned(), "n-new".to_owned()].into();
        let reports = [report("a1", 5, "s-new", "n-new")];
        let f = scope_facts(&scope, &nodes, &reports, Some(T0 + 1), &new, T0 + 100);
        assert_eq!(assess(&r, &facts(T0 + 100, f), &s).step, Step::Retire);
    }

    #[test]
    fn builtin_roots_rotate_at_their_share_of_life() {
        let nb = std::time::UNIX_EPOCH + Duration::from_secs(T0);
        let na = nb + Duration::from_secs(600);
        let at = Share(833_333);
        assert!(!auto_due(nb, na, at, nb + Duration::from_secs(499)));
        assert!(auto_due(nb, na, at, nb + Duration::from_secs(500)));
        assert!(!auto_due(nb, na, Share(0), na));
    }

    #[test]
    fn the_plan_follows_the_document() {
        let dir = Path::new("/s");
        let mut doc = RotationDoc::default();
        let p = plan(&doc, dir);
        assert!(p.base.is_none() && p.next.is_none());
        doc.rotation = Some(prepared());
        let p = plan(&doc, dir);
        assert!(!p.next_signs);
        assert!(
            matches!(p.next, Some(RootSource::Provided { cert_file, .. }) if cert_file == Path::new("/s/rotation/n.pem"))
        );
        doc.rotation.as_mut().expect("set").phase = Phase::Active;
        assert!(plan(&doc, dir).next_signs);
        doc.rotation = None;
        doc.current = Some("n".into());
        doc.replaced = Some("c".into());
        let p = plan(&doc, dir);
        assert!(matches!(p.base, Some((r, _)) if r == "c"));
    }
}
