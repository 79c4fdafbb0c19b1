//! Socket files: the parent folder is created if missing, a stale socket left by a previous
//! run is replaced (only if it is a socket nobody listens on), and the file gets its mode.
//! Shared by the workload socket and the admin socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why a socket file could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something else than a socket is at the path: we never delete it.
    #[error("{path} exists and is not a socket; remove it or choose another socket path")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Another process is listening on the socket.
    #[error("{path} is in use by another running process (is an agent already running?)")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Makes `path` ready to bind: parent folder created, a stale socket removed.
pub fn prepare(path: &Path) -> Result<(), SocketError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SocketError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create the folder", parent))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    Ok(())
}

/// Prepares `path`, binds a listener on it and gives the socket file `mode`.
/// Must be called inside a tokio runtime.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    prepare(path)?;
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Io {
        action: "bind",
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SocketError::Io {
            action: "set the mode of",
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn creates_the_folder_replaces_a_stale_socket_and_sets_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/dir/agent.sock");
        let first = bind(&path, 0o600).expect("first bind");
        let mode = std::fs::metadata(&path)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live socket is not taken over.
        assert!(matches!(bind(&path, 0o600), Err(SocketError::InUse { .. })));
        drop(first);
        // Its listener gone, the file is stale and is replaced.
        let _second = bind(&path, 0o666).expect("stale socket replaced");
        let mode = std::fs::metadata(&path)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
    }

    #[tokio::test]
    async fn refuses_to_delete_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"precious").expect("write");
        let err = bind(&path, 0o666).expect_err("not a socket");
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
    }
}
