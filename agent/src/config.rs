//! The agent's configuration: the YAML file (camelCase), command-line overrides for what differs
//! per node, defaults, and validation that lists every problem at once.
//!
//! Most settings are [`Config`] and take effect on reload. The listeners bound once at start
//! (`metricsListen`) are [`Listeners`]: a reload checks them but cannot move them, so changing
//! them needs a restart.
//!
//! One file on purpose: the file's serde shape, the overrides and the `resolve_*` step of each
//! setting read together as the configuration's schema; each function stays short.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcert_protocol::entry::valid_dir;
use meshcert_protocol::{Entry, Hook};
use serde::Deserialize;

use crate::keys::KeyAlgorithm;
use crate::svid;
use crate::sys;

/// Default state folder.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshcert-agent";
/// Default shared volume.
pub const DEFAULT_VOLUME_DIR: &str = "/run/meshcert/svids";
/// Default Workload API socket.
pub const DEFAULT_WORKLOAD_SOCKET: &str = "/run/meshcert/workload.sock";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/meshcert/admin.sock";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the YAML we take.
    #[error("the config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (field and line).
        message: String,
    },
    /// The values do not make a usable configuration.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The config file as written (every field optional, checked in [`resolve`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// The holder, `host:port`; its replicas as a list (or separated by commas).
    pub ca_address: Option<CaAddress>,
    /// The TLS name the holder's certificate carries.
    pub ca_server_name: Option<String>,
    /// PEM file with the root(s) the holder's certificate chains to.
    pub trust_bundle: Option<PathBuf>,
    /// This node's name.
    pub node_name: Option<String>,
    /// The mesh this node joins.
    pub mesh: Option<String>,
    /// Where the node identity lives.
    pub state_dir: Option<PathBuf>,
    /// The shared volume.
    pub volume_dir: Option<PathBuf>,
    /// The Workload API socket.
    pub workload_socket: Option<PathBuf>,
    /// The Workload API socket's mode, octal (`"0666"`).
    pub workload_socket_mode: Option<ModeText>,
    /// Workload API connections one uid may hold at once (256).
    pub workload_connections_per_uid: Option<usize>,
    /// The admin socket.
    pub admin_socket: Option<PathBuf>,
    /// Plaintext Prometheus listener (`GET /metrics`), `address:port`; off when absent.
    pub metrics_listen: Option<String>,
    /// Algorithm of every key the agent generates.
    pub key_algorithm: Option<KeyAlgorithm>,
    /// Rotation settings.
    #[serde(default)]
    pub rotation: RotationFile,
    /// How often to sync entries and bundles.
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub sync_interval: Option<Duration>,
    /// How often to report when nothing changed.
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub heartbeat: Option<Duration>,
    /// Whether to keep a long poll open so the holder's changes arrive at once (default true).
    #[serde(default)]
    pub watch_holder: Option<bool>,
    /// Agent-local entries (used only under DISABLED enforcement).
    #[serde(default)]
    pub entries: Vec<Entry>,
    /// Kubernetes: attestation with the pod's service-account token.
    pub kubernetes: Option<crate::k8s::KubernetesFile>,
    /// What runs after an entry rotates, by entry id or folder (hooks are node configuration:
    /// the holder's entries never carry one).
    #[serde(default)]
    pub hooks: Vec<HookFile>,
    /// How far ahead of this node's clock an issued SVID's notBefore may be (`60s`).
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub clock_skew: Option<Duration>,
}

/// One `hooks:` item as written: which entry (`entry:` id or `dir:` folder) and what to do.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HookFile {
    /// The entry's id.
    pub entry: Option<String>,
    /// The entry's folder in the volume.
    pub dir: Option<String>,
    /// Signal the process whose pid is in this file (absolute path).
    pub pid_file: Option<PathBuf>,
    /// The signal (`SIGHUP` by default).
    pub signal: Option<String>,
    /// A command to run: program and arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// How long the command may run before its process group is killed (10 s).
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub timeout: Option<Duration>,
}

/// A validated `hooks:` item.
#[derive(Debug, Clone, PartialEq)]
pub struct HookRule {
    /// The entry id it applies to.
    pub entry: Option<String>,
    /// The folder it applies to.
    pub dir: Option<String>,
    /// What runs.
    pub hook: Hook,
}

impl HookRule {
    /// Whether this rule names `entry` (by id or by folder).
    pub fn applies_to(&self, entry: &Entry) -> bool {
        self.entry.as_deref() == Some(entry.id.as_str())
            || self.dir.as_deref() == Some(entry.dir.as_str())
    }
}

/// The default of `clockSkew`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// `caAddress` as written: one `host:port` (possibly several separated by commas), or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CaAddress {
    /// `ca.example:8443` or `ca-1:8443,ca-2:8443`.
    One(String),
    /// `[ca-1:8443, ca-2:8443]`.
    Many(Vec<String>),
}

impl CaAddress {
    /// Every address, commas split, blanks dropped.
    fn addresses(&self) -> Vec<String> {
        let parts: Vec<&str> = match self {
            Self::One(text) => vec![text.as_str()],
            Self::Many(list) => list.iter().map(String::as_str).collect(),
        };
        parts
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// A file mode written as text (`"0640"`) or as a YAML number (`0640`, read as octal digits).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ModeText {
    /// `"0666"`.
    Text(String),
    /// `0666` (YAML may read it as the decimal 666: its digits are taken as octal).
    Number(u64),
}

impl ModeText {
    fn parse(&self) -> Option<u32> {
        let text = match self {
            Self::Text(t) => t.trim().trim_start_matches("0o").to_owned(),
            Self::Number(n) => n.to_string(),
        };
        u32::from_str_radix(&text, 8).ok().filter(|m| *m <= 0o7777)
    }
}

/// `rotation:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotationFile {
    /// Fraction of the lifetime after which to rotate.
    pub fraction: Option<f64>,
    /// Plus or minus this fraction of the lifetime, at random.
    pub jitter: Option<f64>,
    /// First backoff after a failure.
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub backoff_initial: Option<Duration>,
    /// Largest backoff.
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub backoff_max: Option<Duration>,
    /// Most signing requests in flight at once.
    pub max_concurrent_signing: Option<usize>,
}

/// Rotation settings, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotation {
    /// Fraction of the lifetime after which to rotate (0.5).
    pub fraction: f64,
    /// Plus or minus this fraction of the lifetime (0.1).
    pub jitter: f64,
    /// First backoff after a failure (1 s).
    pub backoff_initial: Duration,
    /// Largest backoff (2 min).
    pub backoff_max: Duration,
    /// Most signing requests in flight at once (4).
    pub max_concurrent_signing: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            fraction: 0.5,
            jitter: 0.1,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(120),
            max_concurrent_signing: 4,
        }
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--ca-address` (several separated by commas).
    pub ca_address: Option<String>,
    /// `--trust-bundle`.
    pub trust_bundle: Option<PathBuf>,
    /// `--node-name`.
    pub node_name: Option<String>,
    /// `--mesh`.
    pub mesh: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--volume-dir`.
    pub volume_dir: Option<PathBuf>,
    /// `--workload-socket`.
    pub workload_socket: Option<PathBuf>,
    /// `--admin-socket`.
    pub admin_socket: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

/// The listeners bound once at start (a change needs a restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listeners {
    /// Plaintext Prometheus listener (`GET /metrics`); off when `None`. Port 0 picks a free
    /// port, shown as `metricsAddress` in the admin status.
    pub metrics_listen: Option<SocketAddr>,
}

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The holder, `host:port`; its replicas separated by commas (each one checked), tried
    /// in turn by [`crate::issuer::HttpsIssuer`].
    pub ca_address: String,
    /// The TLS name to expect on the holder's certificate.
    pub ca_server_name: String,
    /// The trust bundle file.
    pub trust_bundle: PathBuf,
    /// The roots read from it (DER).
    pub trust_roots: Vec<Vec<u8>>,
    /// This node's name.
    pub node_name: String,
    /// The mesh.
    pub mesh: String,
    /// The state folder.
    pub state_dir: PathBuf,
    /// The shared volume.
    pub volume_dir: PathBuf,
    /// The Workload API socket.
    pub workload_socket: PathBuf,
    /// Its mode.
    pub workload_socket_mode: u32,
    /// Workload API connections one uid may hold at once.
    pub workload_connections_per_uid: usize,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Key algorithm.
    pub key_algorithm: KeyAlgorithm,
    /// Rotation settings.
    pub rotation: Rotation,
    /// Sync interval.
    pub sync_interval: Duration,
    /// Report heartbeat.
    pub heartbeat: Duration,
    /// `watchHolder`: long-poll the holder for changes ([`crate::push`]).
    pub watch_holder: bool,
    /// Agent-local entries.
    pub entries: Vec<Entry>,
    /// Kubernetes settings, when the node runs in a cluster.
    pub kubernetes: Option<crate::k8s::Kubernetes>,
    /// Hooks by entry id or folder.
    pub hooks: Vec<HookRule>,
    /// How far ahead of this node's clock an issued SVID's notBefore may be.
    pub clock_skew: Duration,
}

/// Reads and validates the config file with `overrides` applied.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    load_with_listeners(path, overrides).map(|(config, _)| config)
}

/// [`load`], and the [`Listeners`] the file and `overrides` ask for.
pub fn load_with_listeners(
    path: &Path,
    overrides: &Overrides,
) -> Result<(Config, Listeners), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = parse(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })?;
    resolve_with_listeners(file, overrides)
}

/// Parses config YAML (an empty file is an empty config).
pub fn parse(text: &str) -> Result<FileConfig, String> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_norway::from_str(text).map_err(|e| e.to_string())
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// Applies overrides and defaults and checks every value, listing every problem.
pub fn resolve(file: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
    resolve_with_listeners(file, o).map(|(config, _)| config)
}

/// [`resolve`], and the [`Listeners`]; a bad listener address is one more listed problem.
pub fn resolve_with_listeners(
    file: FileConfig,
    o: &Overrides,
) -> Result<(Config, Listeners), ConfigError> {
    let mut problems = Vec::new();
    let p = &mut problems;
    let metrics_listen =
        resolve_metrics_listen(o.metrics_listen, file.metrics_listen.as_deref(), p);
    let (ca_address, ca_server_name) =
        resolve_ca_address(o, file.ca_address, file.ca_server_name, p);
    let trust_bundle = o
        .trust_bundle
        .clone()
        .or(file.trust_bundle)
        .unwrap_or_default();
    let trust_roots = read_trust_bundle(&trust_bundle, p);
    let node_name = resolve_node_name(o.node_name.clone().or(file.node_name), p);
    let mesh = o.mesh.clone().or(file.mesh).unwrap_or_default();
    if mesh.is_empty() {
        p.push("mesh is required (the mesh this node joins)".to_owned());
    }
    let workload_socket_mode = resolve_socket_mode(file.workload_socket_mode.as_ref(), p);
    let rotation = resolve_rotation(&file.rotation, p);
    let sync_interval = at_least_1s("syncInterval", file.sync_interval, p);
    let heartbeat = at_least_1s("heartbeat", file.heartbeat, p);
    check_entries(&file.entries, p);
    let kubernetes = file
        .kubernetes
        .map(|k| crate::k8s::Kubernetes::resolve(k, p));
    let hooks = file
        .hooks
        .iter()
        .enumerate()
        .filter_map(|(n, h)| hook_rule(n, h, p))
        .collect();
    let workload_connections_per_uid =
        resolve_connections_per_uid(file.workload_connections_per_uid, p);
    let clock_skew = file.clock_skew.unwrap_or(DEFAULT_CLOCK_SKEW);
    if clock_skew > Duration::from_secs(3600) {
        p.push("clockSkew must be at most 1h".to_owned());
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    let config = Config {
        ca_address,
        ca_server_name,
        trust_bundle,
        trust_roots,
        node_name,
        mesh,
        state_dir: path_or(&o.state_dir, file.state_dir, DEFAULT_STATE_DIR),
        volume_dir: path_or(&o.volume_dir, file.volume_dir, DEFAULT_VOLUME_DIR),
        workload_socket: path_or(
            &o.workload_socket,
            file.workload_socket,
            DEFAULT_WORKLOAD_SOCKET,
        ),
        workload_socket_mode,
        workload_connections_per_uid,
        admin_socket: path_or(&o.admin_socket, file.admin_socket, DEFAULT_ADMIN_SOCKET),
        key_algorithm: file.key_algorithm.unwrap_or_default(),
        rotation,
        sync_interval,
        heartbeat,
        watch_holder: file.watch_holder.unwrap_or(true),
        entries: file.entries,
        kubernetes,
        hooks,
        clock_skew,
    };
    Ok((config, Listeners { metrics_listen }))
}

/// `workloadSocketMode`, an octal mode (0666 when unset).
fn resolve_socket_mode(mode: Option<&ModeText>, problems: &mut Vec<String>) -> u32 {
    match mode {
        None => 0o666,
        Some(m) => m.parse().unwrap_or_else(|| {
            problems.push(format!(
                "workloadSocketMode {m:?} is not an octal file mode"
            ));
            0o666
        }),
    }
}

/// `workloadConnectionsPerUid`, at least 1.
fn resolve_connections_per_uid(value: Option<usize>, problems: &mut Vec<String>) -> usize {
    let value = value.unwrap_or(crate::workload::DEFAULT_CONNECTIONS_PER_UID);
    if value == 0 {
        problems.push("workloadConnectionsPerUid must be at least 1".to_owned());
    }
    value
}

/// The command line's path, else the file's, else `default`.
fn path_or(flag: &Option<PathBuf>, file: Option<PathBuf>, default: &str) -> PathBuf {
    flag.clone().or(file).unwrap_or_else(|| default.into())
}

/// `metricsListen`: the flag, else the file's address (off when neither is set).
fn resolve_metrics_listen(
    flag: Option<SocketAddr>,
    file: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<SocketAddr> {
    match (flag, file) {
        (Some(address), _) => Some(address),
        (None, None) => None,
        (None, Some(text)) => match text.trim().parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                problems.push(format!(
                    "metricsListen `{text}` is not an address:port such as 127.0.0.1:9090"
                ));
                None
            }
        },
    }
}

/// `caAddress` (one or more replicas, joined with `,`) and the TLS name, which defaults to the
/// first replica's host.
fn resolve_ca_address(
    o: &Overrides,
    file: Option<CaAddress>,
    server_name: Option<String>,
    problems: &mut Vec<String>,
) -> (String, String) {
    let addresses = o
        .ca_address
        .clone()
        .map(CaAddress::One)
        .or(file)
        .map(|a| a.addresses())
        .unwrap_or_default();
    let mut ca_server_name = server_name.unwrap_or_default();
    if addresses.is_empty() {
        problems.push("caAddress is required (host:port of the CA holder)".to_owned());
    }
    for address in &addresses {
        match host_of(address) {
            Some(host) if ca_server_name.is_empty() => ca_server_name = host.to_owned(),
            Some(_) => {}
            None => problems.push(format!("caAddress `{address}` is not host:port")),
        }
    }
    (addresses.join(","), ca_server_name)
}

/// The roots in `trustBundle` (required, at least one PEM certificate).
fn read_trust_bundle(path: &Path, problems: &mut Vec<String>) -> Vec<Vec<u8>> {
    if path.as_os_str().is_empty() {
        problems.push(
            "trustBundle is required (PEM file of the root(s) the holder chains to)".to_owned(),
        );
        return Vec::new();
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let roots = svid::certs_from_pem(&text);
            if roots.is_empty() {
                problems.push(format!(
                    "trustBundle {} holds no PEM certificate",
                    path.display()
                ));
            }
            roots
        }
        Err(e) => {
            problems.push(format!(
                "trustBundle {} cannot be read: {e}",
                path.display()
            ));
            Vec::new()
        }
    }
}

/// `nodeName`, else the host name in lowercase.
fn resolve_node_name(name: Option<String>, problems: &mut Vec<String>) -> String {
    let node_name = match name {
        Some(n) => n,
        None => match sys::hostname() {
            Ok(h) => h.to_ascii_lowercase(),
            Err(e) => {
                problems.push(format!("nodeName is not set and {e}"));
                String::new()
            }
        },
    };
    if !node_name.is_empty() && !meshcert_protocol::api::valid_node_name(&node_name) {
        problems.push(format!(
            "nodeName `{node_name}` is not a valid node name (lowercase letters, digits, `.`, `-`, `_`)"
        ));
    }
    node_name
}

/// The `rotation` section over its defaults, with its bounds checked.
fn resolve_rotation(r: &RotationFile, problems: &mut Vec<String>) -> Rotation {
    let d = Rotation::default();
    let rotation = Rotation {
        fraction: r.fraction.unwrap_or(d.fraction),
        jitter: r.jitter.unwrap_or(d.jitter),
        backoff_initial: r.backoff_initial.unwrap_or(d.backoff_initial),
        backoff_max: r.backoff_max.unwrap_or(d.backoff_max),
        max_concurrent_signing: r.max_concurrent_signing.unwrap_or(d.max_concurrent_signing),
    };
    if !(rotation.fraction > 0.0 && rotation.fraction < 1.0) {
        problems.push(format!(
            "rotation.fraction {} must be between 0 and 1",
            rotation.fraction
        ));
    }
    if !(0.0..0.5).contains(&rotation.jitter)
        || rotation.fraction - rotation.jitter <= 0.0
        || rotation.fraction + rotation.jitter >= 1.0
    {
        problems.push(format!(
            "rotation.jitter {} must be at least 0, below 0.5, and keep fraction ± jitter between 0 and 1",
            rotation.jitter
        ));
    }
    if rotation.backoff_initial.is_zero() {
        problems.push("rotation.backoffInitial must be more than 0".to_owned());
    }
    if rotation.backoff_max < rotation.backoff_initial {
        problems.push("rotation.backoffMax must be at least rotation.backoffInitial".to_owned());
    }
    if rotation.max_concurrent_signing == 0 {
        problems.push("rotation.maxConcurrentSigning must be at least 1".to_owned());
    }
    rotation
}

/// An interval of at least one second (30 s when unset).
fn at_least_1s(field: &str, value: Option<Duration>, problems: &mut Vec<String>) -> Duration {
    let value = value.unwrap_or(Duration::from_secs(30));
    if value < Duration::from_secs(1) {
        problems.push(format!("{field} must be at least 1s"));
    }
    value
}

/// Local entries: unique ids, and each `dir` one plain folder name used once.
fn check_entries(entries: &[Entry], problems: &mut Vec<String>) {
    let mut ids = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for e in entries {
        if !ids.insert(e.id.as_str()) {
            problems.push(format!("entries: id `{}` appears twice", e.id));
        }
        if !valid_dir(&e.dir) {
            problems.push(format!(
                "entries: `{}` has dir `{}`, which is not one plain folder name",
                e.id, e.dir
            ));
        } else if !dirs.insert(e.dir.as_str()) {
            problems.push(format!("entries: dir `{}` is used twice", e.dir));
        }
    }
}

/// Checks `hooks[n]`, adding what is wrong to `problems`.
pub(crate) fn hook_rule(n: usize, h: &HookFile, problems: &mut Vec<String>) -> Option<HookRule> {
    let before = problems.len();
    match (&h.entry, &h.dir) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => problems.push(format!(
            "hooks[{n}]: set exactly one of `entry` (an entry id) or `dir` (its folder)"
        )),
    }
    if h.pid_file.is_none() && h.command.is_empty() {
        problems.push(format!("hooks[{n}]: set `pidFile`, `command` or both"));
    }
    if h.pid_file.as_ref().is_some_and(|p| !p.is_absolute()) {
        problems.push(format!("hooks[{n}]: `pidFile` must be an absolute path"));
    }
    if let Some(signal) = &h.signal
        && let Err(e) = sys::parse_signal(signal)
    {
        problems.push(format!("hooks[{n}]: {e}"));
    }
    if h.command.first().is_some_and(|p| p.is_empty()) {
        problems.push(format!(
            "hooks[{n}]: `command` starts with an empty program"
        ));
    }
    (problems.len() == before).then(|| HookRule {
        entry: h.entry.clone(),
        dir: h.dir.clone(),
        hook: Hook {
            pid_file: h.pid_file.clone(),
            signal: h.signal.clone(),
            command: h.command.clone(),
            timeout: h.timeout,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::svid::testca::TestCa::new();
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, svid::certs_to_pem(&[ca.root])).expect("write");
        (dir, path)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let (_dir, bundle) = bundle_file();
        let yaml = format!(
            "caAddress: 127.0.0.1:8443\ntrustBundle: {}\nmesh: mesh-a\nnodeName: node-1\n",
            bundle.display()
        );
        let c = resolve(parse(&yaml).expect("parse"), &Overrides::default()).expect("valid");
        assert_eq!(c.ca_server_name, "127.0.0.1");
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.volume_dir, PathBuf::from(DEFAULT_VOLUME_DIR));
        assert_eq!(c.workload_socket_mode, 0o666);
        assert_eq!(c.key_algorithm, KeyAlgorithm::EcdsaP256);
        assert_eq!(c.rotation, Rotation::default());
        assert_eq!(c.sync_interval, Duration::from_secs(30));
        assert_eq!(c.trust_roots.len(), 1);
        let (_, listeners) =
            resolve_with_listeners(parse(&yaml).expect("parse"), &Overrides::default())
                .expect("valid");
        assert_eq!(listeners.metrics_listen, None, "metrics are off by default");
    }

    #[test]
    fn metrics_listen_from_the_file_or_the_flag() {
        let (_dir, bundle) = bundle_file();
        let base = format!(
            "caAddress: 127.0.0.1:8443\ntrustBundle: {}\nmesh: mesh-a\nnodeName: node-1\n",
            bundle.display()
        );
        let flag: SocketAddr = "127.0.0.1:9100".parse().expect("address");
        type Case<'a> = (
            &'a str,
            Option<SocketAddr>,
            Result<Option<&'a str>, &'a str>,
        );
        let cases: &[Case] = &[
            ("", None, Ok(None)),
            (
                "metricsListen: 0.0.0.0:9090\n",
                None,
                Ok(Some("0.0.0.0:9090")),
            ),
            ("metricsListen: \"[::1]:0\"\n", None, Ok(Some("[::1]:0"))),
            (
                "metricsListen: 0.0.0.0:9090\n",
                Some(flag),
                Ok(Some("127.0.0.1:9100")),
            ),
            ("", Some(flag), Ok(Some("127.0.0.1:9100"))),
            (
                "metricsListen: localhost:9090\n",
                None,
                Err("metricsListen `localhost:9090`"),
            ),
            (
                "metricsListen: \"9090\"\n",
                None,
                Err("metricsListen `9090`"),
            ),
        ];
        for (yaml, flag, want) in cases {
            let o = Overrides {
                metrics_listen: *flag,
                ..Overrides::default()
            };
            let got = resolve_with_listeners(parse(&format!("{base}{yaml}")).expect("parse"), &o);
            match (got, want) {
                (Ok((_, l)), Ok(want)) => assert_eq!(
                    l.metrics_listen.map(|a| a.to_string()).as_deref(),
                    *want,
                    "{yaml} {flag:?}"
                ),
                (Err(ConfigError::Invalid(problems)), Err(needle)) => assert!(
                    problems.iter().any(|p| p.contains(needle)),
                    "{yaml}: {problems:?}"
                ),
                (got, want) => panic!("{yaml} {flag:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn flags_override_the_file() {
        let (_dir, bundle) = bundle_file();
        let yaml = format!(
            "caAddress: ca.example:8443\ntrustBundle: {}\nmesh: mesh-a\nnodeName: node-1\nstateDir: /a\n",
            bundle.display()
        );
        let o = Overrides {
            ca_address: Some("other.example:9443".into()),
            node_name: Some("node-2".into()),
            state_dir: Some("/b".into()),
            ..Overrides::default()
        };
        let c = resolve(parse(&yaml).expect("parse"), &o).expect("valid");
        assert_eq!(c.ca_address, "other.example:9443");
        assert_eq!(c.ca_server_name, "other.example");
        assert_eq!(c.node_name, "node-2");
        assert_eq!(c.state_dir, PathBuf::from("/b"));
    }

    #[test]
    fn several_holder_addresses() {
        let (_dir, bundle) = bundle_file();
        let base = format!(
            "trustBundle: {}\nmesh: mesh-a\nnodeName: node-1\n",
            bundle.display()
        );
        for (yaml, flag, want) in [
            (
                "caAddress: [ca-1:8443, ca-2:8443]\n",
                None,
                Ok("ca-1:8443,ca-2:8443"),
            ),
            (
                "caAddress: \"ca-1:8443, ca-2:8443\"\n",
                None,
                Ok("ca-1:8443,ca-2:8443"),
            ),
            ("caAddress: ca:8443\n", Some("a:1,b:2"), Ok("a:1,b:2")),
            (
                "caAddress: [ca-1:8443, nope]\n",
                None,
                Err("caAddress `nope`"),
            ),
            ("caAddress: []\n", None, Err("caAddress is required")),
        ] {
            let o = Overrides {
                ca_address: flag.map(str::to_owned),
                ..Overrides::default()
            };
            match (
                resolve(parse(&format!("{base}{yaml}")).expect("parse"), &o),
                want,
            ) {
                (Ok(c), Ok(want)) => {
                    assert_eq!(c.ca_address, want, "{yaml}");
                    let first = want.split(',').next().and_then(host_of);
                    assert_eq!(Some(c.ca_server_name.as_str()), first, "{yaml}");
                }
                (Err(ConfigError::Invalid(problems)), Err(needle)) => assert!(
                    problems.iter().any(|p| p.contains(needle)),
                    "{yaml}: {problems:?}"
                ),
                (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let yaml = "caAddress: nope\nnodeName: Bad/Name\nworkloadSocketMode: \"9z\"\n\
                    rotation: {fraction: 1.5, jitter: 0.7, backoffInitial: 5s, backoffMax: 1s, maxConcurrentSigning: 0}\n\
                    syncInterval: 0s\n\
                    entries:\n- {id: a, spiffeId: 'spiffe://mesh-a.test/a', dir: ../x}\n- {id: a, spiffeId: 'spiffe://mesh-a.test/b', dir: b}\n";
        let err = resolve(parse(yaml).expect("parse"), &Overrides::default()).expect_err("invalid");
        let ConfigError::Invalid(problems) = err else {
            panic!("expected Invalid, got {err}");
        };
        for needle in [
            "caAddress",
            "trustBundle",
            "nodeName",
            "mesh is required",
            "workloadSocketMode",
            "rotation.fraction",
            "rotation.jitter",
            "backoffMax",
            "maxConcurrentSigning",
            "syncInterval",
            "appears twice",
            "plain folder name",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "missing `{needle}` in {problems:#?}"
            );
        }
    }

    #[test]
    fn parse_errors_name_the_field() {
        for (yaml, needle) in [
            ("caAdress: x:1\n", "caAdress"),
            ("keyAlgorithm: dsa\n", "dsa"),
            ("rotation: {fraction: many}\n", "fraction"),
        ] {
            let err = parse(yaml).expect_err(yaml);
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn socket_modes() {
        for (mode, want) in [
            (ModeText::Text("0666".into()), Some(0o666)),
            (ModeText::Text("660".into()), Some(0o660)),
            (ModeText::Number(600), Some(0o600)),
            (ModeText::Text("0999".into()), None),
        ] {
            assert_eq!(mode.parse(), want, "{mode:?}");
        }
    }

    #[test]
    fn hosts() {
        for (addr, want) in [
            ("127.0.0.1:8443", Some("127.0.0.1")),
            ("ca.example:443", Some("ca.example")),
            ("[::1]:443", Some("::1")),
            ("ca.example", None),
            ("ca.example:http", None),
        ] {
            assert_eq!(host_of(addr), want, "{addr}");
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../deploy/examples/agent.yaml");
        let file = parse(text).expect("the example parses");
        let (_dir, bundle) = bundle_file();
        let o = Overrides {
            trust_bundle: Some(bundle),
            ..Overrides::default()
        };
        let c = resolve(file, &o).expect("the example is valid");
        assert_eq!(c.node_name, "node-1");
        assert_eq!(c.mesh, "mesh-a");
        assert_eq!(c.ca_server_name, "localhost");
        // The example mesh is ENABLED: a local entry there would only ever be refused.
        assert!(c.entries.is_empty());
    }
}
