//! Every `nix` call of the agent core: file ownership, signals, host name and user ids.

use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Gid, Pid, Uid};

/// Why a system call failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// Changing the owner of a file failed.
    #[error("cannot change the owner of {path} to {uid}:{gid}: {source}")]
    Chown {
        /// The file.
        path: String,
        /// The wanted user.
        uid: u32,
        /// The wanted group.
        gid: u32,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The signal name is not one we know.
    #[error("unknown signal `{0}` (use a name such as SIGHUP or SIGUSR1)")]
    UnknownSignal(String),
    /// Sending a signal failed.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Kill {
        /// The process.
        pid: i32,
        /// The signal.
        signal: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The host name could not be read.
    #[error("cannot read the host name: {0}")]
    Hostname(#[source] nix::Error),
}

/// Changes the owner of an open file (before anything is written to it).
pub fn fchown(file: &impl AsFd, path: &Path, uid: u32, gid: u32) -> Result<(), SysError> {
    unistd::fchown(
        file.as_fd(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
    .map_err(|source| SysError::Chown {
        path: path.display().to_string(),
        uid,
        gid,
        source,
    })
}

/// Changes the owner of a path without following a final symlink.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), SysError> {
    unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|source| SysError::Chown {
        path: path.display().to_string(),
        uid,
        gid,
        source,
    })
}

/// Parses a signal name (`SIGHUP`, `HUP`, `sigusr1`).
pub fn parse_signal(name: &str) -> Result<Signal, SysError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>()
        .map_err(|_| SysError::UnknownSignal(name.to_owned()))
}

/// Sends `signal` to `pid`.
pub fn kill(pid: i32, signal: Signal) -> Result<(), SysError> {
    signal::kill(Pid::from_raw(pid), signal).map_err(|source| SysError::Kill {
        pid,
        signal: signal.as_str().to_owned(),
        source,
    })
}

/// The machine's host name, as a default node name.
pub fn hostname() -> Result<String, SysError> {
    let name = unistd::gethostname().map_err(SysError::Hostname)?;
    Ok(name.to_string_lossy().into_owned())
}

/// The agent's effective user and group ids.
pub fn current_owner() -> (u32, u32) {
    (unistd::geteuid().as_raw(), unistd::getegid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        for (name, want) in [
            ("SIGHUP", Some(Signal::SIGHUP)),
            ("hup", Some(Signal::SIGHUP)),
            ("SIGUSR1", Some(Signal::SIGUSR1)),
            ("usr2", Some(Signal::SIGUSR2)),
            ("SIGNOPE", None),
            ("", None),
        ] {
            assert_eq!(parse_signal(name).ok(), want, "{name}");
        }
    }
}
