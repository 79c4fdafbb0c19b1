//! `meshcert-agent run`: the only place that wires the agent's tasks together and handles
//! signals. It loads the config, joins (or reuses the node identity), starts the rotator, the
//! reporter, the Workload API and admin sockets, the optional metrics listener and the file
//! watchers, and turns SIGHUP or a change of the config file into a reload, SIGTERM/SIGINT into
//! a clean stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_daemon::exit;
use meshcert_daemon::watch::ConfigWatcher;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::cache::CacheWriter;
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
    /// The process exit code: [`exit::CONFIG`] for configuration problems, else
    /// [`exit::RUNTIME`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => exit::CONFIG,
            _ => exit::RUNTIME,
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

/// SIGTERM, SIGINT and SIGHUP, installed before anything starts.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        let install = |kind| signal(kind).map_err(DaemonError::Signal);
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    /// Resolves at SIGTERM or SIGINT.
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
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
    let issuer = holder_client(&config, &metrics)?;
    let mut signals = Signals::install()?;
    // Sockets first: the admin socket answers (not ready) while the node joins.
    // The one writer of the served state: it sets the node's status here, then moves into
    // the rotator; everything else gets a reader.
    let writer = CacheWriter::new();
    let cache = writer.reader();
    let servers = Servers::start(&config, listeners, &writer, &metrics, &issuer).await?;
    let joined = tokio::select! {
        result = identity(&*issuer, &config, options.join_token.as_deref()) => Some(result),
        () = signals.stop() => None,
    };
    let (identity, seed) = match joined {
        Some(Ok(found)) => found,
        Some(Err(e)) => return servers.stop(Err(e)).await,
        None => return servers.stop(Ok(())).await,
    };
    if let Err(e) = issuer.set_identity(&identity.chain, &identity.key) {
        return servers.stop(Err(e.into())).await;
    }
    tracing::info!(
        spiffe_id = %identity.info.spiffe_id,
        serial = %identity.info.serial,
        "node identity loaded"
    );
    let last_sync = last_sync(&config, seed);

    let volume_changed = Arc::new(Changes::new());
    let rotator = Rotator::new(
        issuer.clone(),
        writer,
        config.clone(),
        identity,
        last_sync,
        volume_changed.clone(),
    );
    let reports = rotator.reports();

    let (commands_tx, commands_rx) = mpsc::channel(8);
    let rotator_task = tokio::spawn(rotator.run(commands_rx, servers.stopped()));
    let push_task = config.watch_holder.then(|| {
        tokio::spawn(crate::push::run(
            issuer.clone(),
            commands_tx.clone(),
            cache.subscribe_status(),
            config.sync_interval * 2,
            servers.stopped(),
        ))
    });
    let report_task = tokio::spawn(report::run(
        issuer.clone(),
        reports,
        cache,
        config.heartbeat,
        servers.stopped(),
    ));
    let volume_watch = VolumeWatch::start(&config.volume_dir, volume_changed);
    let reloads = Reloads {
        options: &options,
        running: listeners,
        commands: &commands_tx,
    };
    serve_until_stopped(&mut signals, volume_watch, reloads).await;

    tracing::info!("stopping: finishing in-flight installs");
    systemd::stopping();
    servers.signal_stop();
    let _ = rotator_task.await;
    let _ = report_task.await;
    if let Some(t) = push_task {
        let _ = t.await;
    }
    servers.stop(Ok(())).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The client of the holder, timed by the metrics; it trusts the holder through the configured
/// bundle and the roots of the last synced bundles.
fn holder_client(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Arc<TimedIssuer<HttpsIssuer>>, DaemonError> {
    let issuer = Arc::new(TimedIssuer::new(
        HttpsIssuer::new(
            &config.ca_address,
            &config.ca_server_name,
            &config.trust_roots,
        )?,
        metrics.clone(),
    ));
    crate::push::follow_last_sync(issuer.inner(), &config.state_dir);
    Ok(issuer)
}

/// The last sync recorded in the state folder, else the one that came with the join.
fn last_sync(
    config: &Config,
    seed: Option<meshcert_protocol::api::SyncResponse>,
) -> Option<meshcert_protocol::api::SyncResponse> {
    match node::load_last_sync(&config.state_dir) {
        Ok(Some(s)) => Some(s),
        Ok(None) => seed,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the last sync");
            seed
        }
    }
}

/// The file watchers' and signals' loop until SIGTERM or SIGINT: the volume (restore what
/// others change), the config file and SIGHUP (reload).
async fn serve_until_stopped(
    signals: &mut Signals,
    mut volume_watch: VolumeWatch,
    reloads: Reloads<'_>,
) {
    let new_folders = volume_watch.new_folders();
    let mut config_watch = ConfigWatcher::start(&reloads.options.config_path);
    let mut rewatch = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = rewatch.tick() => volume_watch.renew_if_replaced(),
            () = new_folders.changed() => volume_watch.follow_new_folders(),
            _ = signals.hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                config_watch.seen();
                reloads.reload().await;
            }
            () = config_watch.changed() => {
                tracing::info!(path = %reloads.options.config_path.display(), "config file changed: reloading");
                reloads.reload().await;
            }
        }
    }
}

/// The servers that answer from the start (Workload API, admin socket, metrics, JWT bundles,
/// the status gauges), and the flag that stops every task.
struct Servers {
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workload: tokio::task::JoinHandle<Result<(), workload::WorkloadError>>,
    admin: tokio::task::JoinHandle<Result<(), admin::AdminError>>,
}

impl Servers {
    /// Binds the sockets and the metrics listener, then starts serving.
    async fn start(
        config: &Config,
        listeners: Listeners,
        writer: &CacheWriter,
        metrics: &Arc<Metrics>,
        issuer: &Arc<TimedIssuer<HttpsIssuer>>,
    ) -> Result<Self, DaemonError> {
        let workload_config = WorkloadConfig {
            socket: config.workload_socket.clone(),
            mode: config.workload_socket_mode,
            kubelet: kubelet(config)?,
            max_connections_per_uid: config.workload_connections_per_uid,
            ..Default::default()
        };
        let workload_listener =
            workload::bind(&workload_config).map_err(|e| DaemonError::Socket(e.to_string()))?;
        let admin_listener =
            admin::bind(&config.admin_socket).map_err(|e| DaemonError::Socket(e.to_string()))?;
        let metrics_listener = bind_metrics(listeners, metrics).await?;
        tracing::info!(
            workload_socket = %config.workload_socket.display(),
            admin_socket = %config.admin_socket.display(),
            metrics = ?metrics.address(),
            "listening"
        );
        writer.update_status(|s| {
            s.node = Some(config.node_name.clone());
            s.mesh = Some(config.mesh.clone());
            s.ca_address = config.ca_address.clone();
        });
        let cache = writer.reader();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = || stop_future(&stop_rx);
        // JWT-SVIDs: signed by the holder, cached here; the JWKS polled at the sync interval.
        let tokens = Arc::new(crate::jwt::Tokens::new(
            issuer.clone(),
            Duration::from_secs(meshcert_protocol::jwt::DEFAULT_JWT_TTL_SECONDS),
        ));
        let mut tasks = vec![tokio::spawn(
            tokens
                .clone()
                .poll_bundles(config.sync_interval, stop_rx.clone()),
        )];
        let workload = tokio::spawn(workload::serve_with(
            workload_listener,
            workload_config,
            cache.clone(),
            workload::Extras {
                jwt: Some(tokens),
                metrics: Some(metrics.workload.clone()),
            },
            stopped(),
        ));
        let admin = tokio::spawn(admin::serve_with_metrics(
            admin_listener,
            cache.clone(),
            metrics.clone(),
            stopped(),
        ));
        if let Some(listener) = metrics_listener {
            let serve = metrics::serve(listener, metrics.clone(), cache.clone(), stopped());
            tasks.push(tokio::spawn(serve));
        }
        tasks.push(tokio::spawn(metrics::watch_status(
            metrics.clone(),
            cache.subscribe_status(),
            stopped(),
        )));
        Ok(Self {
            stop_tx,
            stop_rx,
            tasks,
            workload,
            admin,
        })
    }

    /// A future that resolves once the stop flag is set.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        stop_future(&self.stop_rx)
    }

    /// Sets the stop flag: every task winds down.
    fn signal_stop(&self) {
        let _ = self.stop_tx.send(true);
    }

    /// Stops the servers, waits for them, and returns `result`.
    async fn stop(self, result: Result<(), DaemonError>) -> Result<(), DaemonError> {
        self.signal_stop();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Ok(Err(e)) = self.workload.await {
            tracing::warn!(error = %e, "the Workload API server stopped with an error");
        }
        if let Ok(Err(e)) = self.admin.await {
            tracing::warn!(error = %e, "the admin socket stopped with an error");
        }
        result
    }
}

/// Binds the plaintext metrics listener when `metricsListen` is set.
async fn bind_metrics(
    listeners: Listeners,
    metrics: &Metrics,
) -> Result<Option<tokio::net::TcpListener>, DaemonError> {
    let Some(address) = listeners.metrics_listen else {
        return Ok(None);
    };
    let bind_error = |source| DaemonError::MetricsListen { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(bind_error)?;
    metrics.set_address(listener.local_addr().map_err(bind_error)?);
    Ok(Some(listener))
}

/// What a reload needs: where the config comes from, the listeners bound at start (they only
/// change at a restart), and the rotator's command channel.
struct Reloads<'a> {
    options: &'a RunOptions,
    running: Listeners,
    commands: &'a mpsc::Sender<Command>,
}

impl Reloads<'_> {
    async fn reload(&self) {
        reload(self.options, self.running, self.commands).await;
    }
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
