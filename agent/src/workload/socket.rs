//! Socket files: the parent folder is created if missing, a stale socket left by a previous
//! run is replaced (only if it is a socket nobody listens on), and the file has its mode from
//! the moment it appears (bound in a private folder, then renamed into place).
//! Shared by the workload socket and the admin socket.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

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
    /// The socket's folder belongs to another user, who could replace the socket.
    #[error(
        "{path} belongs to uid {uid}, neither the agent's user nor root: choose another socket folder"
    )]
    ForeignFolder {
        /// The folder.
        path: PathBuf,
        /// Its owner.
        uid: u32,
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
        check_owner(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if listening(path) {
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

/// How long a listener made by this very process may keep answering before it counts as live:
/// a child forked by another thread holds a copy of every descriptor, close-on-exec ones
/// included, until its `exec`.
const OWN_LISTENER_GRACE: Duration = Duration::from_secs(2);

/// Whether a process listens on the socket at `path`.
///
/// The peer credentials of a connection name the process that made the listener. When that is
/// this process, which is binding the path again, the listener it closed may still be held by
/// a child forked by another thread and not yet replaced by `exec` (it would accept the
/// connection into its backlog and never answer): such a socket is asked again until
/// [`OWN_LISTENER_GRACE`] has passed, and only one that still answers counts as live.
fn listening(path: &Path) -> bool {
    let own = nix::unistd::getpid().as_raw();
    let deadline = Instant::now() + OWN_LISTENER_GRACE;
    loop {
        let Ok(stream) = std::os::unix::net::UnixStream::connect(path) else {
            return false;
        };
        let ours = getsockopt(&stream, sockopt::PeerCredentials).is_ok_and(|c| c.pid() == own);
        drop(stream);
        if !ours || Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prepares `path`, binds a listener on it and gives the socket file `mode`. The socket is
/// bound in a fresh private folder beside `path` (0700, the agent's), given its mode there,
/// then renamed into place: it never appears at `path` with another mode, and the chmod by
/// path happens where no one else can swap the file.
/// Must be called inside a tokio runtime.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    prepare(path)?;
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SocketError::Io {
            action,
            path,
            source,
        }
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A fresh name: `create` fails rather than reuse a folder someone else made.
    let private = parent.join(format!(
        ".meshcert-socket-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io("create a private folder in", parent))?;
    let staged = private.join("socket");
    let bound = UnixListener::bind(&staged)
        .map_err(io("bind", path))
        .and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
                .map_err(io("set the mode of", path))?;
            std::fs::rename(&staged, path).map_err(io("move the socket to", path))?;
            Ok(listener)
        });
    if bound.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Refuses a socket folder owned by another user than the agent or root: whoever owns it
/// could replace the socket.
fn check_owner(dir: &Path) -> Result<(), SocketError> {
    let meta = std::fs::metadata(dir).map_err(|source| SocketError::Io {
        action: "inspect",
        path: dir.to_owned(),
        source,
    })?;
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() == own || meta.uid() == 0 {
        Ok(())
    } else {
        Err(SocketError::ForeignFolder {
            path: dir.to_owned(),
            uid: meta.uid(),
        })
    }
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

    /// A listener this process closed while a child forked by another thread still holds a
    /// copy (between its fork and its exec) is stale, not "in use": the next bind succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(unsafe_code)]
    async fn a_closed_listener_still_held_by_a_forking_child_is_stale() {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let first = bind(&path, 0o600).expect("first bind");
        let (forked, tell) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let spawner = std::thread::spawn(move || {
            let fd = tell.as_raw_fd();
            let mut cmd = std::process::Command::new("true");
            // SAFETY: runs in the child between fork and exec; write(2) and usleep(3) (nanosleep)
            // are async-signal-safe and allocate nothing.
            unsafe {
                cmd.pre_exec(move || {
                    nix::libc::write(fd, b"f".as_ptr().cast(), 1);
                    nix::libc::usleep(500_000);
                    Ok(())
                });
            }
            cmd.status().expect("run true")
        });
        // The child exists and holds every descriptor of this process, the listener included.
        let mut byte = [0u8; 1];
        std::fs::File::from(forked)
            .read_exact(&mut byte)
            .expect("the child forked");
        drop(first);
        let _second = bind(&path, 0o600).expect("a listener only a forking child holds is stale");
        assert!(spawner.join().expect("spawner").success());
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
