//! `meshcert-agent run`: the only place that wires the agent's tasks together and handles
//! signals. It loads the config, joins (or reuses the node identity), starts the rotator, the
//! reporter, the Workload API and admin sockets, the optional metrics listener and the file
//! watchers, and turns SIGHUP or a change of the config file into a reload, SIGTERM/SIGINT into
//! a clean stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};

use crate::cache::Cache;
use crate::changes::{Changes, VolumeWatch};
use crate::config::{self, Config, ConfigError, Listeners, Overrides};
use crate::issuer::{HttpsIssuer, Issuer, IssuerError};
use crate::metrics::{Metrics, TimedIssuer};
use crate::node::JoinError;
use crate::node::{self, NodeError};
use crate::rotation;
use crate::rotation::{Command, Rotator};
use crate::volume::Volume;
use crate::workload::WorkloadConfig;
use crate::{admin, metrics, report, systemd, workload};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable (exit 78).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The node has no identity and no join token was given.
    #[error(
        "this node has not joined yet (no node identity in {state_dir}): create a join token on the CA holder (`meshcert-ca token create --node {node} --mesh {mesh}`) and start the agent with --join-token-file or MESHCERT_JOIN_TOKEN"
    )]
    NoToken {
        /// The state folder.
        state_dir: PathBuf,
        /// The node name.
        node: String,
        /// The mesh.
        mesh: String,
    },
    /// The node SVID expired while the agent was down.
    #[error(
        "the node SVID in {state_dir} expired at {expired} (the agent was stopped longer than its lifetime) and can no longer be renewed: re-join with a new token: create one on the CA holder (`meshcert-ca token create --node {node} --mesh {mesh}`) and start the agent with --join-token-file or MESHCERT_JOIN_TOKEN"
    )]
    NodeExpired {
        /// The state folder.
        state_dir: PathBuf,
        /// When it expired (RFC 3339).
        expired: String,
        /// The node name.
        node: String,
        /// The mesh.
        mesh: String,
    },
    /// The join failed.
    #[error("cannot join the CA holder: {0}")]
    Join(#[source] JoinError),
    /// The kubelet client for pod attestation cannot be set up.
    #[error(transparent)]
    Kubelet(#[from] crate::kubelet::KubeletError),
    /// The attestation with the Kubernetes service-account token was refused.
    #[error("cannot attest with the pod's service-account token: {0}")]
    KubernetesJoin(#[source] crate::k8s::K8sError),
    /// The state folder failed.
    #[error(transparent)]
    State(#[from] NodeError),
    /// The holder client could not be set up.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The shared volume could not be created.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// A socket could not be bound.
    #[error("{0}")]
    Socket(String),
    /// The metrics listener could not be bound.
    #[error("cannot listen for metrics on {address}: {source}")]
    MetricsListen {
        /// The address from `metricsListen` / `--metrics-listen`.
        address: std::net::SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot install a signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl DaemonError {
    /// The process exit code: 78 for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 78,
            _ => 1,
        }
    }
}

/// What `meshcert-agent run` was given.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The config file.
    pub config_path: PathBuf,
    /// Command-line overrides.
    pub overrides: Overrides,
    /// The join token, if given.
    pub join_token: Option<String>,
}

fn stop_future(
    rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> Result<(), DaemonError> {
    let (config, listeners) =
        config::load_with_listeners(&options.config_path, &options.overrides)?;
    node::ensure_dir(&config.state_dir)?;
    let volume = Volume::new(config.volume_dir.clone());
    volume.ensure_root()?;
    let metrics = Arc::new(Metrics::new());
    let issuer = Arc::new(TimedIssuer::new(
        HttpsIssuer::new(
            &config.ca_address,
            &config.ca_server_name,
            &config.trust_roots,
        )?,
        metrics.clone(),
    ));
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;

    // Sockets first: the admin socket answers (not ready) while the node joins.
    let cache = Cache::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let workload_config = WorkloadConfig {
        socket: config.workload_socket.clone(),
        mode: config.workload_socket_mode,
        kubelet: kubelet(&config)?,
        max_connections_per_uid: config.workload_connections_per_uid,
        ..Default::default()
    };
    let workload_listener =
        workload::bind(&workload_config).map_err(|e| DaemonError::Socket(e.to_string()))?;
    let admin_listener =
        admin::bind(&config.admin_socket).map_err(|e| DaemonError::Socket(e.to_string()))?;
    let metrics_listener = match listeners.metrics_listen {
        Some(address) => {
            let bind_error = |source| DaemonError::MetricsListen { address, source };
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(bind_error)?;
            metrics.set_address(listener.local_addr().map_err(bind_error)?);
            Some(listener)
        }
        None => None,
    };
    tracing::info!(
        workload_socket = %config.workload_socket.display(),
        admin_socket = %config.admin_socket.display(),
        metrics = ?metrics.address(),
        "listening"
    );
    cache.update_status(|s| {
        s.node = Some(config.node_name.clone());
        s.mesh = Some(config.mesh.clone());
        s.ca_address = config.ca_address.clone();
    });
    // JWT-SVIDs: signed by the holder, cached here; the JWKS polled at the sync interval.
    let tokens = Arc::new(crate::jwt::Tokens::new(
        issuer.clone(),
        Duration::from_secs(meshcert_protocol::jwt::DEFAULT_JWT_TTL_SECONDS),
    ));
    let jwks_task = tokio::spawn(
        tokens
            .clone()
            .poll_bundles(config.sync_interval, stop_rx.clone()),
    );
    let workload_task = tokio::spawn(workload::serve_with(
        workload_listener,
        workload_config,
        cache.clone(),
        workload::Extras {
            jwt: Some(tokens),
            metrics: Some(metrics.workload.clone()),
        },
        stop_future(&stop_rx),
    ));
    let admin_task = tokio::spawn(admin::serve_with_metrics(
        admin_listener,
        cache.clone(),
        metrics.clone(),
        stop_future(&stop_rx),
    ));
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            cache.clone(),
            stop_future(&stop_rx),
        ))
    });
    let status_task = tokio::spawn(metrics::watch_status(
        metrics.clone(),
        cache.subscribe_status(),
        stop_future(&stop_rx),
    ));
    let stop_servers = |stop_tx: watch::Sender<bool>| async move {
        let _ = stop_tx.send(true);
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        let _ = status_task.await;
        let _ = jwks_task.await;
        if let Ok(Err(e)) = workload_task.await {
            tracing::warn!(error = %e, "the Workload API server stopped with an error");
        }
        if let Ok(Err(e)) = admin_task.await {
            tracing::warn!(error = %e, "the admin socket stopped with an error");
        }
    };

    let joined = tokio::select! {
        result = identity(&*issuer, &config, options.join_token.as_deref()) => Some(result),
        _ = sigterm.recv() => None,
        _ = sigint.recv() => None,
    };
    let (identity, seed) = match joined {
        Some(Ok(found)) => found,
        Some(Err(e)) => {
            stop_servers(stop_tx).await;
            return Err(e);
        }
        None => {
            stop_servers(stop_tx).await;
            return Ok(());
        }
    };
    if let Err(e) = issuer.set_identity(&identity.chain, &identity.key) {
        stop_servers(stop_tx).await;
        return Err(e.into());
    }
    tracing::info!(
        spiffe_id = %identity.info.spiffe_id,
        serial = %identity.info.serial,
        "node identity loaded"
    );
    let last_sync = match node::load_last_sync(&config.state_dir) {
        Ok(Some(s)) => Some(s),
        Ok(None) => seed,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the last sync");
            seed
        }
    };

    let volume_changed = Arc::new(Changes::new());
    let rotator = Rotator::new(
        issuer.clone(),
        cache.clone(),
        config.clone(),
        identity,
        last_sync,
        volume_changed.clone(),
    );
    let reports = rotator.reports();

    let (commands_tx, commands_rx) = mpsc::channel(8);
    let rotator_task = tokio::spawn(rotator.run(commands_rx, stop_future(&stop_rx)));
    let report_task = tokio::spawn(report::run(
        issuer.clone(),
        reports,
        cache.clone(),
        config.heartbeat,
        stop_future(&stop_rx),
    ));

    // File watchers: the volume (restore what others change) and the config file (reload).
    let config_changed = Arc::new(Notify::new());
    let mut volume_watch = VolumeWatch::start(&config.volume_dir, volume_changed);
    let new_folders = volume_watch.new_folders();
    let _config_watcher = watch_config(&options.config_path, config_changed.clone());
    let mut rewatch = tokio::time::interval(Duration::from_secs(5));

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = rewatch.tick() => volume_watch.renew_if_replaced(),
            () = new_folders.changed() => volume_watch.follow_new_folders(),
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                reload(&options, listeners, &commands_tx).await;
            }
            () = config_changed.notified() => {
                // Editors write in several steps: let the file settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Events of the same write that arrived meanwhile need no second reload.
                let _ = tokio::time::timeout(Duration::ZERO, config_changed.notified()).await;
                tracing::info!(path = %options.config_path.display(), "config file changed: reloading");
                reload(&options, listeners, &commands_tx).await;
            }
        }
    }

    tracing::info!("stopping: finishing in-flight installs");
    systemd::stopping();
    let _ = stop_tx.send(true);
    let _ = rotator_task.await;
    let _ = report_task.await;
    stop_servers(stop_tx).await;
    tracing::info!("stopped");
    Ok(())
}

async fn reload(options: &RunOptions, running: Listeners, commands: &mpsc::Sender<Command>) {
    systemd::reloading();
    match config::load_with_listeners(&options.config_path, &options.overrides) {
        Ok((config, listeners)) => {
            if listeners != running {
                tracing::warn!(
                    running = ?running.metrics_listen,
                    configured = ?listeners.metrics_listen,
                    "metricsListen changed: it takes effect at the next restart"
                );
            }
            let _ = commands.send(Command::Reload(Box::new(config))).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "the new configuration is invalid; keeping the running one");
        }
    }
    systemd::reloaded();
}

/// The kubelet client for pod attestation, when `kubernetes.kubelet` is configured.
fn kubelet(config: &Config) -> Result<Option<Arc<crate::kubelet::Kubelet>>, DaemonError> {
    let Some(settings) = config.kubernetes.as_ref().and_then(|k| k.kubelet.clone()) else {
        return Ok(None);
    };
    crate::kubelet::Kubelet::new(settings)
        .map(|k| Some(Arc::new(k)))
        .map_err(DaemonError::from)
}

/// The node identity: the one in the state folder if still valid, else a join with the token
/// (retrying while the holder cannot be reached).
async fn identity<I: Issuer>(
    issuer: &I,
    config: &Config,
    token: Option<&str>,
) -> Result<
    (
        node::NodeIdentity,
        Option<meshcert_protocol::api::SyncResponse>,
    ),
    DaemonError,
> {
    let now = SystemTime::now();
    let existing = node::load(&config.state_dir)?;
    if let Some(identity) = existing {
        if identity.info.not_after > now {
            return Ok((identity, None));
        }
        if token.is_none() && config.kubernetes.is_none() {
            return Err(DaemonError::NodeExpired {
                state_dir: config.state_dir.clone(),
                expired: humantime::format_rfc3339_seconds(identity.info.not_after).to_string(),
                node: config.node_name.clone(),
                mesh: config.mesh.clone(),
            });
        }
        if config.kubernetes.is_some() {
            tracing::warn!("the node SVID expired; attesting again with the service-account token");
        } else {
            tracing::warn!("the node SVID expired; re-joining with the given token");
        }
    }
    if let Some(kubernetes) = &config.kubernetes {
        return join_kubernetes(issuer, config, kubernetes).await;
    }
    let Some(token) = token else {
        return Err(DaemonError::NoToken {
            state_dir: config.state_dir.clone(),
            node: config.node_name.clone(),
            mesh: config.mesh.clone(),
        });
    };
    let mut failures = 0;
    loop {
        match node::join(issuer, config, token).await {
            Ok((identity, seed)) => {
                tracing::info!(node = %config.node_name, mesh = %config.mesh, "joined the CA holder");
                return Ok((identity, Some(seed)));
            }
            Err(JoinError::Issuer(e)) if e.is_retryable() => {
                failures += 1;
                let wait = join_backoff(config, failures, e.is_holder_down());
                tracing::warn!(error = %e, retry_in = ?wait, "cannot reach the CA holder to join; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(DaemonError::Join(e)),
        }
    }
}

/// How long a join waits before it tries again: a holder that is down is probed at the outage
/// pace, not backed off (see [`crate::reachability`]), so the join happens within seconds of
/// its return; any other retryable failure backs off.
fn join_backoff(config: &Config, failures: u32, holder_down: bool) -> Duration {
    if holder_down {
        return crate::reachability::probe_wait(fastrand::f64());
    }
    rotation::backoff(
        failures,
        config.rotation.backoff_initial,
        config.rotation.backoff_max,
        fastrand::f64(),
    )
}

/// Joins with the pod's service-account token, retrying while the holder cannot be reached,
/// the token file is not there yet, or the token had expired (the kubelet writes a new one).
async fn join_kubernetes<I: Issuer>(
    issuer: &I,
    config: &Config,
    kubernetes: &crate::k8s::Kubernetes,
) -> Result<
    (
        node::NodeIdentity,
        Option<meshcert_protocol::api::SyncResponse>,
    ),
    DaemonError,
> {
    let mut failures = 0;
    loop {
        match crate::k8s::join(issuer, config, kubernetes).await {
            Ok((identity, seed)) => return Ok((identity, Some(seed))),
            Err(e) if e.is_retryable() => {
                failures += 1;
                let wait = join_backoff(config, failures, e.is_holder_down());
                tracing::warn!(error = %e, retry_in = ?wait, "cannot attest with the service-account token yet; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(DaemonError::KubernetesJoin(e)),
        }
    }
}

fn watch_config(path: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let file = path.file_name()?.to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = !matches!(event.kind, notify::EventKind::Access(_))
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(file.as_os_str()));
            if relevant {
                changed.notify_one();
            }
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP"))
    .ok()?;
    watcher
        .watch(&parent, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP"))
        .ok()?;
    Some(watcher)
}
