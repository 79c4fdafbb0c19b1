//! The admin socket (placeholder: the real server is being written).

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::cache::Cache;

/// Why the admin socket failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket could not be bound.
    #[error("cannot bind the admin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    UnixListener::bind(path).map_err(|source| AdminError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Serves the admin API until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    cache: Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let _ = (listener, cache);
    shutdown.await;
    Ok(())
}

/// `meshcert-agent status`: fetches the status from the admin socket and prints it.
pub async fn print_status(socket: &Path, json: bool) -> Result<(), AdminError> {
    let _ = (socket, json);
    Ok(())
}
