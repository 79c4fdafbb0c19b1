//! Who is calling: the caller's kernel credentials (`SO_PEERCRED`) completed from `/proc/<pid>`
//! (supplementary groups, executable) and the user and group databases.
//!
//! Every `/proc` and `nix` call of the Workload API lives here; the decision of what a caller
//! receives is pure and lives in [`super::selection`].
//!
//! # Pid reuse
//!
//! `SO_PEERCRED` records the pid of the process that called `connect()`. That process may exit
//! and its pid be given to another process before we read `/proc/<pid>`. The guards:
//!
//! - the process start time (`/proc/<pid>/stat`, field 22, clock ticks since boot) must not be
//!   later than the moment we accepted the connection (`CLOCK_BOOTTIME` at accept): a process
//!   that started after the connection cannot be the one that connected;
//! - `stat`, `status` and `exe` are read through one handle on the `/proc/<pid>` folder,
//!   opened first: the handle stands for that process, and reads through it fail once it has
//!   exited, so all three describe the same process;
//! - the uid and gid in `/proc/<pid>/status` must equal the kernel's `SO_PEERCRED` values.
//!
//! When `/proc/<pid>` cannot be read (pid 0: the caller lives in another pid namespace, or the
//! agent may not inspect it) the caller keeps only its uid and primary gid: selectors on the
//! path or on supplementary groups then do not match, which fails closed.

use std::collections::HashMap;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, open, openat, readlinkat};
use nix::sys::stat::Mode;
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{Gid, Group, SysconfVar, Uid, User, sysconf};

/// Why a caller could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel gave no credentials for the connection.
    #[error("the kernel gave no credentials for this connection")]
    NoCredentials,
    /// The pid now belongs to another process than the one that connected.
    #[error("process {pid} changed while it was being identified (pid reuse)")]
    PidReused {
        /// The caller's pid.
        pid: i32,
    },
    /// `/proc/<pid>` contradicts the kernel's credentials.
    #[error("process {pid} does not carry the connection's credentials")]
    Mismatch {
        /// The caller's pid.
        pid: i32,
    },
}

/// The kernel's credentials of a connection, taken when it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The connecting process (0 when not visible from our pid namespace).
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Time since boot when the connection was accepted (`None` if unknown).
    pub accepted_since_boot: Option<Duration>,
}

/// Everything the selectors can look at, about one caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// The caller's pid (0 when unknown).
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary groups (may repeat the primary gid).
    pub groups: Vec<u32>,
    /// The user name of `uid`, if it has one.
    pub user: Option<String>,
    /// The names of the primary and supplementary groups that have one.
    pub group_names: Vec<String>,
    /// The executable (`/proc/<pid>/exe`), when readable.
    pub exe: Option<PathBuf>,
    /// The caller's pod, when it runs in one and the kubelet listed it (`k8s:` selectors).
    pub pod: Option<Arc<crate::kubelet::PodFacts>>,
    /// Why the caller's pod could not be attested, when it runs in one.
    pub pod_error: Option<Arc<str>>,
    /// The pod and container named by the caller's `/proc/<pid>/cgroup`, when it is in one.
    pub pod_container: Option<super::cgroup::PodContainer>,
}

/// The time since boot (`CLOCK_BOOTTIME`, the clock of process start times), taken when a
/// connection is accepted.
pub fn since_boot() -> Option<Duration> {
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let nanos = u32::try_from(now.tv_nsec()).ok()?;
    Some(Duration::new(u64::try_from(now.tv_sec()).ok()?, nanos))
}

/// The caller's process facts from `/proc/<pid>` (groups, executable), with the pid-reuse
/// guards; no names yet. A few reads of `/proc`, which never wait for a disk.
pub fn identify_process(cred: Credentials) -> Result<PeerInfo, PeerError> {
    let mut info = PeerInfo {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        ..PeerInfo::default()
    };
    if cred.pid > 0 {
        read_proc(cred, &mut info)?;
    }
    Ok(info)
}

/// The primary gid, then the supplementary groups without it.
fn all_gids(info: &PeerInfo) -> impl Iterator<Item = u32> + '_ {
    std::iter::once(info.gid).chain(info.groups.iter().copied().filter(|g| *g != info.gid))
}

fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// Most ids [`Names`] remembers of each kind; past it, it starts afresh.
const NAMES_REMEMBERED: usize = 4096;

/// The user and group names of recent callers, each looked up at most once per `ttl`.
///
/// A workload reconnecting (or many workloads of one user) then costs no database lookup
/// and no hop to a blocking thread; a renamed user or group is seen within `ttl`.
#[derive(Debug)]
pub struct Names {
    ttl: Duration,
    users: Mutex<HashMap<u32, (Option<String>, Instant)>>,
    groups: Mutex<HashMap<u32, (Option<String>, Instant)>>,
}

impl Names {
    /// Remembers names for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            users: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Fills `info`'s user and group names from memory; `false` (and `info` unchanged) when
    /// one of them is unknown or older than the ttl.
    pub fn fill_remembered(&self, info: &mut PeerInfo, now: Instant) -> bool {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < self.ttl;
        let user = {
            let users = lock(&self.users);
            match users.get(&info.uid) {
                Some((name, at)) if fresh(at) => name.clone(),
                _ => return false,
            }
        };
        let mut names = Vec::new();
        {
            let groups = lock(&self.groups);
            for gid in all_gids(info) {
                match groups.get(&gid) {
                    Some((name, at)) if fresh(at) => names.extend(name.iter().cloned()),
                    _ => return false,
                }
            }
        }
        info.user = user;
        info.group_names = names;
        true
    }

    /// Looks `info`'s names up in the databases (blocking), fills them in and remembers them.
    pub fn look_up(&self, info: &mut PeerInfo, now: Instant) {
        let user = user_name(info.uid);
        let gids: Vec<u32> = all_gids(info).collect();
        let names: Vec<(u32, Option<String>)> = gids.iter().map(|g| (*g, group_name(*g))).collect();
        {
            let mut users = lock(&self.users);
            if users.len() >= NAMES_REMEMBERED {
                users.clear();
            }
            users.insert(info.uid, (user.clone(), now));
        }
        {
            let mut groups = lock(&self.groups);
            if groups.len() + names.len() > NAMES_REMEMBERED {
                groups.clear();
            }
            for (gid, name) in &names {
                groups.insert(*gid, (name.clone(), now));
            }
        }
        info.user = user;
        info.group_names = names.into_iter().filter_map(|(_, n)| n).collect();
    }
}

/// A poisoned lock still holds a usable map of names (no invariant spans two entries).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fills the groups and executable from `/proc/<pid>` with the pid-reuse guards.
/// An unreadable `/proc/<pid>` leaves them empty (fails closed).
///
/// Every file is read through one handle on the `/proc/<pid>` folder, opened first: once
/// open it stands for that process only, and reads through it fail if the process exits,
/// even if its pid is given to another process meanwhile.
fn read_proc(cred: Credentials, info: &mut PeerInfo) -> Result<(), PeerError> {
    let pid = cred.pid;
    let Ok(dir) = open(
        format!("/proc/{pid}").as_str(),
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        // Gone already, or hidden from us (`hidepid`): keep the kernel's uid and gid only.
        return Ok(());
    };
    let Some(start) = read_at(&dir, "stat").as_deref().and_then(parse_start_ticks) else {
        return Ok(());
    };
    if let (Some(accepted), Some(tck)) = (cred.accepted_since_boot, ticks_per_second()) {
        // Start times have tick resolution; allow one tick of rounding.
        let started = Duration::from_secs_f64(start as f64 / tck as f64);
        if started > accepted + Duration::from_secs_f64(1.0 / tck as f64) + SLACK {
            return Err(PeerError::PidReused { pid });
        }
    }
    // Read before `status`, whose read proves the process was still the caller.
    let cgroup = read_at(&dir, "cgroup");
    let Some(status) = read_at(&dir, "status") else {
        // The process exited after we opened its folder.
        return Err(PeerError::PidReused { pid });
    };
    let exe = readlinkat(&dir, "exe").ok().map(PathBuf::from);
    let fields = parse_status(&status);
    if fields.uid.is_some_and(|u| u != cred.uid) || fields.gid.is_some_and(|g| g != cred.gid) {
        return Err(PeerError::Mismatch { pid });
    }
    info.groups = fields.groups;
    info.exe = exe;
    info.pod_container = cgroup.as_deref().and_then(super::cgroup::pod_container);
    Ok(())
}

/// A small file of a `/proc/<pid>` folder, read through the folder's handle.
fn read_at(dir: &OwnedFd, name: &str) -> Option<String> {
    let fd = openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Rounding slack between the accept time (`CLOCK_BOOTTIME`) and the tick-based start time.
const SLACK: Duration = Duration::from_millis(20);

fn ticks_per_second() -> Option<i64> {
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces or parentheses itself, so fields are counted after the last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After `)`: field 3 (state) is the first; field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The lines of `/proc/<pid>/status` we use.
#[derive(Debug, Default, PartialEq, Eq)]
struct StatusFields {
    /// Effective uid (second value of `Uid:`).
    uid: Option<u32>,
    /// Effective gid (second value of `Gid:`).
    gid: Option<u32>,
    /// `Groups:`.
    groups: Vec<u32>,
}

fn parse_status(status: &str) -> StatusFields {
    let mut out = StatusFields::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut numbers = value
            .split_whitespace()
            .filter_map(|v| v.parse::<u32>().ok());
        match key {
            "Uid" => out.uid = numbers.nth(1),
            "Gid" => out.gid = numbers.nth(1),
            "Groups" => out.groups = numbers.collect(),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller's process facts and its names looked up afresh, as a call's identification
    /// with nothing remembered.
    fn identify(cred: Credentials) -> Result<PeerInfo, PeerError> {
        let mut info = identify_process(cred)?;
        Names::new(Duration::ZERO).look_up(&mut info, Instant::now());
        Ok(info)
    }

    #[test]
    fn identifies_the_test_process_itself() {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let info = identify(Credentials {
            pid,
            uid,
            gid,
            accepted_since_boot: since_boot(),
        })
        .expect("the test process can identify itself");
        assert_eq!((info.pid, info.uid, info.gid), (pid, uid, gid));
        assert_eq!(
            info.exe.as_deref(),
            Some(std::env::current_exe().expect("own exe").as_path())
        );
        let own_groups: Vec<u32> = nix::unistd::getgroups()
            .expect("own groups")
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(info.groups, own_groups);
        let name = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        assert_eq!(info.user, name);
    }

    #[test]
    fn names_are_remembered_for_their_ttl_only() {
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let cred = Credentials {
            pid,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            accepted_since_boot: since_boot(),
        };
        // The names straight from the user and group databases.
        let mut fresh = identify_process(cred).expect("process facts");
        fresh.user = User::from_uid(Uid::from_raw(cred.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        fresh.group_names = std::iter::once(cred.gid)
            .chain(fresh.groups.iter().copied().filter(|g| *g != cred.gid))
            .filter_map(|g| Group::from_gid(Gid::from_raw(g)).ok().flatten())
            .map(|g| g.name)
            .collect();
        let names = Names::new(Duration::from_secs(10));
        let start = Instant::now();
        let mut info = identify_process(cred).expect("process facts");
        assert_eq!((info.user.clone(), info.group_names.len()), (None, 0));
        assert!(
            !names.fill_remembered(&mut info, start),
            "nothing known yet"
        );
        names.look_up(&mut info, start);
        assert_eq!(info, fresh, "a lookup fills in the databases' names");

        let mut again = identify_process(cred).expect("process facts");
        assert!(names.fill_remembered(&mut again, start + Duration::from_secs(9)));
        assert_eq!(again, fresh, "remembered names are the same");

        let mut late = identify_process(cred).expect("process facts");
        assert!(
            !names.fill_remembered(&mut late, start + Duration::from_secs(10)),
            "names older than the ttl are looked up again"
        );
        assert_eq!(late.user, None);

        // Another uid (no lookup done for it) is not taken from the first one's names.
        let mut other = PeerInfo {
            uid: cred.uid.wrapping_add(1),
            ..again.clone()
        };
        other.user = None;
        assert!(!names.fill_remembered(&mut other, start));
    }

    #[test]
    fn a_proc_handle_stops_reading_once_its_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let dir = open(
            format!("/proc/{pid}").as_str(),
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open /proc/<pid>");
        assert!(read_at(&dir, "status").is_some(), "alive: readable");
        child.kill().expect("kill");
        child.wait().expect("reap");
        // Whatever process gets this pid next, the handle no longer reads anything.
        assert!(read_at(&dir, "status").is_none(), "exited: unreadable");
        assert!(readlinkat(&dir, "exe").is_err());
    }

    #[test]
    fn a_process_started_after_the_connection_is_refused() {
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let err = identify(Credentials {
            pid,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            // "Accepted" at boot: this process started later, so it cannot be the caller.
            accepted_since_boot: Some(Duration::ZERO),
        })
        .expect_err("started after the accept");
        assert!(matches!(err, PeerError::PidReused { .. }), "{err}");
    }

    #[test]
    fn credentials_that_contradict_proc_are_refused() {
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let uid = nix::unistd::geteuid().as_raw();
        let err = identify(Credentials {
            pid,
            uid: uid.wrapping_add(1),
            gid: nix::unistd::getegid().as_raw(),
            accepted_since_boot: since_boot(),
        })
        .expect_err("uid differs from /proc");
        assert!(matches!(err, PeerError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn stat_start_time_table() {
        let cases: &[(&str, Option<u64>)] = &[
            (
                "42 (sleep) S 1 42 42 0 -1 4194560 103 0 0 0 0 0 0 0 20 0 1 0 7311 5554176 129",
                Some(7311),
            ),
            (
                "42 (a) b (c) S 1 42 42 0 -1 4194560 103 0 0 0 0 0 0 0 20 0 1 0 99 5554176 1",
                Some(99),
            ),
            ("42 (short) S 1", None),
            ("garbage", None),
        ];
        for (stat, want) in cases {
            assert_eq!(parse_start_ticks(stat), *want, "{stat}");
        }
    }

    #[test]
    fn status_fields_table() {
        let status =
            "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t50\t51\t51\t51\nGroups:\t4 24 27 \n";
        assert_eq!(
            parse_status(status),
            StatusFields {
                uid: Some(1001),
                gid: Some(51),
                groups: vec![4, 24, 27],
            }
        );
        assert_eq!(parse_status("Groups:\t\n").groups, Vec::<u32>::new());
    }
}
