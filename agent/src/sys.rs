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

/// Sends SIGKILL to every process of the process group `pgid` (a hook that timed out and
/// whatever it started). A group already gone is fine.
pub fn kill_group(pgid: i32) {
    let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

/// The highest capability number cleared from a hook's bounding set (beyond the kernel's
/// last, `prctl` fails harmlessly).
const LAST_CAP: nix::libc::c_ulong = 63;

/// Makes `command` start without any capability: `no_new_privs` (file capabilities and
/// set-uid bits give nothing), ambient set cleared, bounding set emptied (when the agent may:
/// as root, so that a hook running as root gets no capability at `exec`), then the
/// inheritable, permitted and effective sets cleared.
#[allow(unsafe_code)]
pub fn drop_privileges_on_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the child between fork and exec; it only makes the
    // async-signal-safe system calls prctl(2) and capset(2) on its own stack, and allocates
    // nothing.
    unsafe {
        command.pre_exec(|| {
            use nix::libc;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Without ambient capabilities in this kernel (EINVAL) there is nothing to clear.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            );
            for cap in 0..=LAST_CAP {
                // Needs CAP_SETPCAP (root has it); without it, the sets below still go.
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
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
