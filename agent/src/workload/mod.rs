//! The SPIFFE Workload API on a Unix socket (placeholder: the real server is being written).

use std::future::Future;
use std::path::PathBuf;

use tokio::net::UnixListener;

use crate::cache::Cache;

/// Why the Workload API server failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The socket could not be bound.
    #[error("cannot bind the workload socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Where and how the Workload API listens.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The socket path (`SPIFFE_ENDPOINT_SOCKET` without `unix://`).
    pub socket: PathBuf,
    /// The socket file's mode (world-connectable by default: callers are authorised by their
    /// kernel credentials).
    pub mode: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/meshcert/workload.sock"),
            mode: 0o666,
        }
    }
}

/// Binds the workload socket.
pub fn bind(config: &WorkloadConfig) -> Result<UnixListener, WorkloadError> {
    UnixListener::bind(&config.socket).map_err(|source| WorkloadError::Bind {
        path: config.socket.clone(),
        source,
    })
}

/// Serves the Workload API until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    config: WorkloadConfig,
    cache: Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkloadError> {
    let _ = (listener, config, cache);
    shutdown.await;
    Ok(())
}
