//! `meshcert-ca run`: the only place that wires the tasks together (HTTPS API, admin socket,
//! metrics listener, intermediate renewal, live reload) and handles signals and systemd
//! notifications.
//!
//! Reload: on SIGHUP, and when the configuration file changes (inotify on its folder, so editors
//! that replace the file and Kubernetes ConfigMap symlink swaps are seen; events are debounced
//! and an unchanged file is ignored). The file is re-read and validated; a valid one takes
//! effect at once (meshes, entries, enforcement, federation, roots; a new TLS configuration for
//! the next connections); an invalid one sets `configStatus` to INVALID and the previous
//! configuration keeps serving. systemd hears `RELOADING=1` with `MONOTONIC_USEC`, then
//! `READY=1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcert_daemon::systemd;
use meshcert_daemon::watch::ConfigWatcher;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, Config, ConfigError};
use crate::holder::{Holder, HolderError, ReloadOutcome};
use crate::{admin, metrics, server};

/// How often the holder checks whether an intermediate or its server certificate is due for
/// renewal (a comparison of timestamps; renewal itself happens at half-life).
const RENEWAL_CHECK: Duration = Duration::from_secs(5);
/// How often expired issuances and spent join tokens are pruned (`holder.retention`).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why the holder stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The holder cannot start.
    #[error(transparent)]
    Holder(#[from] HolderError),
    /// An address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The admin socket cannot be created.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// Signal handlers cannot be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Command-line values that replace the file's, at start and at every reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<std::net::SocketAddr>,
    /// `--admin-socket`.
    pub admin_socket: Option<PathBuf>,
}

impl Overrides {
    /// Applies the overrides to a configuration read from the file.
    pub fn apply(&self, config: &mut Config) {
        if let Some(d) = &self.state_dir {
            config.holder.state_dir = d.clone();
        }
        if let Some(l) = self.listen {
            config.holder.listen = l;
        }
        if let Some(a) = &self.admin_socket {
            config.holder.admin_socket = a.clone();
        }
    }
}

/// Where the configuration comes from, for reloads.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The configuration file.
    pub path: PathBuf,
    /// Command-line overrides.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and validates the file, with the overrides applied; every problem on failure.
    pub fn load(&self) -> Result<Config, Vec<String>> {
        match config::load(&self.path) {
            Ok(mut c) => {
                self.overrides.apply(&mut c);
                Ok(c)
            }
            Err(ConfigError::Invalid { problems }) => Err(problems),
            Err(e @ ConfigError::Read { .. }) => Err(vec![format!("(file): {e}")]),
        }
    }
}

/// The API's listen queue: room for every connection the holder serves at once (the kernel
/// caps it at `net.core.somaxconn`). When a replica dies, every node it served reconnects to
/// the others within the same moment (each node keeps one connection); with tokio's default
/// queue of 1024 the connections beyond it waited for the kernel's retransmissions past the
/// agent's connect timeout.
fn config_backlog(holder: &Holder) -> u32 {
    u32::try_from(holder.serving().config.holder.max_connections).unwrap_or(u32::MAX)
}

/// Binds the API's TCP listener with a listen queue of `backlog`.
fn bind_api(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted holder binds again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn bind_err(addr: std::net::SocketAddr) -> impl Fn(std::io::Error) -> DaemonError {
    move |source| DaemonError::Listen { addr, source }
}

/// Runs the holder until SIGTERM or SIGINT; `config` is `source` as loaded at start.
pub async fn run(config: Config, source: ConfigSource) -> Result<(), DaemonError> {
    let now = SystemTime::now();
    raise_open_files(config.holder.max_connections);
    let listen = config.holder.listen;
    let metrics_listen = config.holder.metrics_listen;
    let holder = Arc::new(Holder::open(config, now)?);
    let listener = bind_api(listen, config_backlog(&holder)).map_err(bind_err(listen))?;
    let addr = listener.local_addr().map_err(bind_err(listen))?;
    holder.set_listen_address(addr);
    let metrics_listener = bind_metrics(metrics_listen, &holder).await?;
    let tls = server::tls_config(&holder, now)?;
    holder.set_tls(tls.clone());
    let admin_path = holder.serving().config.holder.admin_socket.clone();
    let admin_listener = admin::bind(&admin_path)?;

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = vec![
        tokio::spawn(server::serve(
            listener,
            Arc::clone(&holder),
            Arc::clone(&tls.config),
            stopped(stop_rx.clone()),
        )),
        tokio::spawn(admin::serve(
            admin_listener,
            Arc::clone(&holder),
            stopped(stop_rx.clone()),
        )),
        tokio::spawn(renewal(Arc::clone(&holder), stopped(stop_rx.clone()))),
        tokio::spawn(pruning(Arc::clone(&holder), stopped(stop_rx.clone()))),
        tokio::spawn(crate::push::follow(
            Arc::clone(&holder),
            stopped(stop_rx.clone()),
        )),
        tokio::spawn(reloads(
            Arc::clone(&holder),
            source,
            hup,
            stopped(stop_rx.clone()),
        )),
    ];
    if let Some(l) = metrics_listener {
        let h = Arc::clone(&holder);
        let render = move || {
            let heartbeat = h.serving().config.holder.heartbeat;
            h.metrics.render(&*h.store, heartbeat, SystemTime::now())
        };
        tasks.push(tokio::spawn(metrics::serve(
            l,
            render,
            stopped(stop_rx.clone()),
        )));
    }

    log_serving(&holder, addr, &admin_path);
    systemd::ready("serving");

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    systemd::stopping();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// Open files the holder needs beside its API connections: the datastore, the admin and
/// metrics sockets, state files, connections being refused.
const FILE_MARGIN: u64 = 256;

/// Raises the soft limit of open files to the hard one: every watching agent keeps a
/// connection open, so `holder.maxConnections` connections need as many descriptors, and the
/// usual soft limit (1024) is far below. Under systemd the unit's `LimitNOFILE` sets both limits
/// (and its system call filter forbids `setrlimit`), so there is nothing to raise. Warns when
/// the limit stays below what `maxConnections` needs.
fn raise_open_files(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the limit of open files");
            return;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the limit of open files")
            }
        }
    }
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(FILE_MARGIN);
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            max_connections,
            "the limit of open files is below what holder.maxConnections needs: connections past it fail at accept (raise LimitNOFILE or ulimit -n)"
        );
    } else {
        tracing::debug!(limit, "open files");
    }
}

/// Binds the plaintext metrics listener when `holder.metricsListen` is set.
async fn bind_metrics(
    address: Option<std::net::SocketAddr>,
    holder: &Holder,
) -> Result<Option<TcpListener>, DaemonError> {
    let Some(m) = address else { return Ok(None) };
    let l = TcpListener::bind(m).await.map_err(bind_err(m))?;
    holder.set_metrics_address(l.local_addr().map_err(bind_err(m))?);
    Ok(Some(l))
}

/// Logs what the holder serves, once it is up.
fn log_serving(holder: &Holder, addr: std::net::SocketAddr, admin_path: &Path) {
    let serving = holder.serving();
    for m in &serving.config.meshes {
        tracing::info!(
            mesh = %m.name,
            trust_domain = %m.trust_domain,
            enforcement = ?serving.config.effective_enforcement(m),
            "mesh"
        );
    }
    tracing::info!(
        listen = %addr,
        admin_socket = %admin_path.display(),
        metrics = ?holder.metrics_address(),
        trust = ?serving.config.trust,
        meshes = serving.config.meshes.len(),
        bundle_version = serving.bundle_version,
        "meshcert-ca is serving"
    );
}

/// Renews intermediates and the API's server certificate past half of their life, on the
/// configuration serving at each check.
async fn renewal(holder: Arc<Holder>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(RENEWAL_CHECK);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let serving = holder.serving();
                match serving.authority.renew_due(SystemTime::now()) {
                    Ok(renewed) => {
                        if !renewed.is_empty() {
                            tracing::info!(meshes = ?renewed, "intermediates renewed");
                        }
                        holder.set_renewal_error(None);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "intermediate renewal failed; retrying");
                        holder.set_renewal_error(Some(e.to_string()));
                    }
                }
                drop(serving);
                let h = Arc::clone(&holder);
                // Signing a certificate: off the async workers.
                let _ = tokio::task::spawn_blocking(move || renew_server_cert(&h, SystemTime::now())).await;
                let h = Arc::clone(&holder);
                let _ = tokio::task::spawn_blocking(move || crate::rotation::tick_logged(&h, SystemTime::now())).await;
            }
        }
    }
}

/// Renews the server certificate when due; warns while it has less than a third of its life
/// left (renewal keeps failing, or the root that signs it ends soon).
fn renew_server_cert(holder: &Holder, now: SystemTime) {
    let Some(current) = holder.tls() else { return };
    let root_not_after = holder.serving().authority.server_root().not_after;
    if current.renewal_due(root_not_after, now) {
        match server::tls_config(holder, now) {
            Ok(next) => {
                tracing::info!(
                    fingerprint = %next.fingerprint,
                    not_after = %crate::authority::rfc3339(next.not_after),
                    previous_not_after = %crate::authority::rfc3339(current.not_after),
                    "server certificate renewed"
                );
                holder.set_tls(next);
                holder.set_server_cert_error(None);
            }
            Err(e) => {
                tracing::error!(error = %e, "server certificate renewal failed; retrying");
                holder.set_server_cert_error(Some(e.to_string()));
            }
        }
    }
    if let Some(warning) = holder
        .tls()
        .and_then(|t| crate::status::server_cert_warning(t.not_before, t.not_after, now))
    {
        tracing::warn!(warning = %warning, "server certificate");
    }
}

/// Prunes expired issuances and spent join tokens older than `holder.retention`, at start and
/// every hour.
async fn pruning(holder: Arc<Holder>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let h = Arc::clone(&holder);
                let _ = tokio::task::spawn_blocking(move || h.prune(SystemTime::now())).await;
            }
        }
    }
}

/// The reload loop: SIGHUP always reloads; a file change reloads when the content changed.
async fn reloads(
    holder: Arc<Holder>,
    source: ConfigSource,
    mut hup: tokio::signal::unix::Signal,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut watcher = ConfigWatcher::start(&source.path);
    loop {
        let why = tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                watcher.seen();
                "SIGHUP"
            }
            () = watcher.changed() => "file changed",
        };
        reload(&holder, &source, why).await;
    }
}

/// One reload, told to systemd.
async fn reload(holder: &Arc<Holder>, source: &ConfigSource, why: &str) {
    tracing::info!(reason = why, path = %source.path.display(), "reloading the configuration");
    systemd::reloading();
    let work = {
        let holder = Arc::clone(holder);
        let source = source.clone();
        // Opening roots may generate RSA keys: off the async workers.
        tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let outcome = holder.reload(source.load(), now);
            if let ReloadOutcome::Applied { .. } = outcome {
                match server::tls_config(&holder, now) {
                    Ok(tls) => holder.set_tls(tls),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot renew the TLS configuration; the previous one serves")
                    }
                }
            }
            outcome
        })
    };
    match work.await {
        Ok(outcome) => tracing::info!(outcome = ?outcome, "reload done"),
        Err(e) => tracing::error!(error = %e, "the reload task failed"),
    }
    systemd::reloaded();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_unit_allows_the_default_connections_and_the_holders_files() {
        let unit = include_str!("../../systemd/meshcert-ca.service");
        let limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("the unit sets LimitNOFILE")
            .trim()
            .parse()
            .expect("a number");
        let needed = crate::config::DEFAULT_MAX_CONNECTIONS as u64 + FILE_MARGIN;
        assert!(limit >= needed, "LimitNOFILE={limit} < {needed}");
    }
}
