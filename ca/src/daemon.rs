//! `meshcert-ca run`: the only place that wires the tasks together (HTTPS API, admin socket,
//! intermediate renewal) and handles signals and systemd notifications.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::holder::{Holder, HolderError};
use crate::{admin, server};

/// How often the holder checks whether an intermediate is due for renewal.
const RENEWAL_CHECK: Duration = Duration::from_secs(60);

/// Why the holder stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The holder cannot start.
    #[error(transparent)]
    Holder(#[from] HolderError),
    /// The API address cannot be bound.
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

/// Runs the holder until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let now = SystemTime::now();
    let listen = config.holder.listen;
    let holder = Arc::new(Holder::open(config, now)?);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        })?;
    holder.set_listen_address(addr);
    let tls = server::tls_config(&holder, now)?;
    let admin_path = holder.config.holder.admin_socket.clone();
    let admin_listener = admin::bind(&admin_path)?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::Signals)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let api = tokio::spawn(server::serve(
        listener,
        Arc::clone(&holder),
        tls,
        stopped(stop_rx.clone()),
    ));
    let adm = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&holder),
        stopped(stop_rx.clone()),
    ));
    let renewal = {
        let holder = Arc::clone(&holder);
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(RENEWAL_CHECK);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => {
                        match holder.authority.renew_due(SystemTime::now()) {
                            Ok(renewed) if !renewed.is_empty() => {
                                tracing::info!(meshes = ?renewed, "intermediates renewed");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "intermediate renewal failed; retrying"),
                        }
                    }
                }
            }
        })
    };

    if holder.config.trust == crate::config::TrustModel::Limited {
        tracing::warn!("limited trust is not implemented yet; serving shared trust");
    }
    for m in &holder.config.meshes {
        tracing::info!(
            mesh = %m.name,
            trust_domain = %m.trust_domain,
            enforcement = ?holder.config.effective_enforcement(m),
            "mesh"
        );
    }
    tracing::info!(
        listen = %addr,
        admin_socket = %admin_path.display(),
        meshes = holder.config.meshes.len(),
        "meshcert-ca is serving"
    );
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = api.await;
        let _ = adm.await;
        let _ = renewal.await;
    })
    .await;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}
