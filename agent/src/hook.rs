//! Rotation hooks: after an entry's SVID is replaced, signal the process in a pid file or run a
//! command with a timeout. A hook failure is logged and reported; it never blocks rotation.
//!
//! Hooks are node configuration: they come only from the agent's own config (`hooks:` by entry
//! id or folder, or a local entry's `hook:`). A holder entry that carries one has it stripped
//! ([`strip_from_holder`]), so that a compromised holder cannot run code on every node. A
//! command runs with an environment holding only `MESHCERT_SVID_DIR`, no capabilities (ambient,
//! bounding, inheritable and permitted sets cleared, `no_new_privs` set), in its own process
//! group, killed whole on timeout. A pid file is read like the volume's files: never through a
//! final symlink, only a small regular file, off the runtime's threads and with a timeout.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcert_protocol::{Entry, Hook};

use crate::config::HookRule;
use crate::sys::{self, SysError};

/// How long a hook command may run when the entry does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading a pid file may take.
const PID_FILE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of a pid file that is read.
const PID_FILE_MAX: u64 = 64;

/// Where a hook's program is looked for when it is not an absolute path (the hook's own
/// environment has no `PATH`).
const SEARCH_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The pid file could not be read.
    #[error("cannot read the pid file {path}: {source}")]
    PidFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pid file does not hold a process id (or is not a small regular file).
    #[error("the pid file {path} does not hold a process id")]
    BadPid {
        /// The file.
        path: PathBuf,
    },
    /// The pid file belongs to a user who does not run that process: whoever can write the
    /// file must not be able to have the agent signal any process of the node.
    #[error(
        "the pid file {path} belongs to uid {owner}, but process {pid} does not run as that user: not signalled"
    )]
    ForeignPid {
        /// The file.
        path: PathBuf,
        /// The file's owner.
        owner: u32,
        /// The process it names.
        pid: i32,
    },
    /// Reading the pid file did not finish in time (a hung filesystem?).
    #[error("reading the pid file {path} did not finish within {timeout:?}")]
    PidFileTimeout {
        /// The file.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// Signalling failed.
    #[error(transparent)]
    Signal(#[from] SysError),
    /// The command could not be started.
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The command failed.
    #[error("`{program}` exited with {status}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The command ran longer than its timeout and was killed.
    #[error("`{program}` ran longer than {timeout:?} and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        timeout: Duration,
    },
}

/// The hook that runs after `entry` rotates: a local entry's own (from the agent's config),
/// else the first `hooks:` rule of the config naming its id or folder. A holder entry's own
/// hook is never used (see [`strip_from_holder`]).
pub fn for_entry<'a>(rules: &'a [HookRule], entry: &'a Entry, local: bool) -> Option<&'a Hook> {
    if local && let Some(hook) = &entry.hook {
        return Some(hook);
    }
    rules
        .iter()
        .find(|rule| rule.applies_to(entry))
        .map(|rule| &rule.hook)
}

/// Removes the hooks of entries that came from the holder; returns the ids of those that had
/// one. Hooks are node configuration: a holder (or whoever took it over) never chooses what
/// runs on a node.
pub fn strip_from_holder(entries: &mut [Entry]) -> Vec<String> {
    entries
        .iter_mut()
        .filter_map(|e| e.hook.take().map(|_| e.id.clone()))
        .collect()
}

/// The line shown in the agent's status for a holder entry whose hook was stripped.
pub fn stripped_warning(entry_id: &str) -> String {
    format!(
        "entry {entry_id}: the holder's entry carries a hook, ignored (hooks are node configuration: set them in the agent's config, `hooks:`)"
    )
}

/// Runs `hook` once: the signal first (if a pid file is set), then the command (if any).
pub async fn run(hook: &Hook, entry_dir: &Path) -> Result<(), HookError> {
    if let Some(path) = &hook.pid_file {
        let (pid, owner) = read_pid_file(path).await?;
        if owner != 0 && !process_runs_as(pid, owner) {
            return Err(HookError::ForeignPid {
                path: path.clone(),
                owner,
                pid,
            });
        }
        let signal = sys::parse_signal(hook.signal.as_deref().unwrap_or("SIGHUP"))?;
        sys::kill(pid, signal)?;
    }
    if let Some((program, args)) = hook.command.split_first() {
        let timeout = hook.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let spawn_error = |source| HookError::Spawn {
            program: program.clone(),
            source,
        };
        let resolved = resolve(program).ok_or_else(|| {
            spawn_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found (a program without a path is looked for in /usr/local/sbin, /usr/local/bin, /usr/sbin, /usr/bin, /sbin and /bin)",
            ))
        })?;
        let mut command = tokio::process::Command::new(resolved);
        command
            .args(args)
            .env_clear()
            .env("MESHCERT_SVID_DIR", entry_dir)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        sys::drop_privileges_on_exec(command.as_std_mut());
        let mut child = command.spawn().map_err(spawn_error)?;
        let group = child.id().and_then(|id| i32::try_from(id).ok());
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                return Err(HookError::Failed {
                    program: program.clone(),
                    status,
                });
            }
            Ok(Err(source)) => return Err(spawn_error(source)),
            Err(_) => {
                // The whole group: what the command started goes with it.
                if let Some(group) = group {
                    sys::kill_group(group);
                }
                let _ = child.kill().await;
                return Err(HookError::Timeout {
                    program: program.clone(),
                    timeout,
                });
            }
        }
    }
    Ok(())
}

/// The program to run: an absolute path as is, a bare name looked for in [`SEARCH_PATH`].
fn resolve(program: &str) -> Option<PathBuf> {
    let path = Path::new(program);
    if path.is_absolute() {
        return Some(path.to_owned());
    }
    if program.contains('/') {
        return None;
    }
    SEARCH_PATH
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
}

/// Whether process `pid` runs as `uid` (real or effective), as `/proc/<pid>/status` says.
fn process_runs_as(pid: i32, uid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            let ids: Vec<u32> = line
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(ids.iter().take(2).any(|id| *id == uid))
        })
        .unwrap_or(false)
}

/// Reads the pid in `path` and the file's owner on a thread of its own, waiting at most
/// [`PID_FILE_TIMEOUT`].
async fn read_pid_file(path: &Path) -> Result<(i32, u32), HookError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let owned = path.to_owned();
    std::thread::Builder::new()
        .name("meshcert-pidfile".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = tx.send(read_pid_file_now(&owned));
        })
        .map_err(|source| HookError::PidFile {
            path: path.to_owned(),
            source,
        })?;
    match tokio::time::timeout(PID_FILE_TIMEOUT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(HookError::BadPid {
            path: path.to_owned(),
        }),
        Err(_) => Err(HookError::PidFileTimeout {
            path: path.to_owned(),
            timeout: PID_FILE_TIMEOUT,
        }),
    }
}

/// Opens `path` without following a final symlink and without blocking (a FIFO), takes only a
/// regular file, and reads at most [`PID_FILE_MAX`] bytes of it.
fn read_pid_file_now(path: &Path) -> Result<(i32, u32), HookError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|source| HookError::PidFile {
            path: path.to_owned(),
            source,
        })?;
    let bad = || HookError::BadPid {
        path: path.to_owned(),
    };
    let meta = file.metadata().map_err(|_| bad())?;
    if !meta.is_file() {
        return Err(bad());
    }
    let mut text = String::new();
    file.take(PID_FILE_MAX)
        .read_to_string(&mut text)
        .map_err(|_| bad())?;
    let pid = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    Ok((pid, std::os::unix::fs::MetadataExt::uid(&meta)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(command: &[&str], timeout: Option<Duration>) -> Hook {
        Hook {
            pid_file: None,
            signal: None,
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    #[tokio::test]
    async fn commands_succeed_fail_and_time_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let script = format!("echo $MESHCERT_SVID_DIR > {}", marker.display());
        run(&hook(&["sh", "-c", &script], None), dir.path())
            .await
            .expect("runs");
        let written = std::fs::read_to_string(&marker).expect("marker");
        assert_eq!(written.trim(), dir.path().display().to_string());

        let failed = run(&hook(&["false"], None), dir.path()).await;
        assert!(matches!(failed, Err(HookError::Failed { .. })));
        let slow = run(
            &hook(&["sleep", "5"], Some(Duration::from_millis(100))),
            dir.path(),
        )
        .await;
        assert!(matches!(slow, Err(HookError::Timeout { .. })));
        let missing = run(&hook(&["/nonexistent/prog"], None), dir.path()).await;
        assert!(matches!(missing, Err(HookError::Spawn { .. })));
    }

    /// The value of `field` in a `/proc/<pid>/status` text.
    fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim)
            .unwrap_or("missing")
    }

    #[tokio::test]
    async fn a_command_runs_with_no_environment_and_no_capabilities() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_out = dir.path().join("env");
        let status_out = dir.path().join("status");
        let script = format!(
            "cat /proc/$$/environ > {}; cat /proc/$$/status > {}",
            env_out.display(),
            status_out.display()
        );
        run(&hook(&["sh", "-c", &script], None), dir.path())
            .await
            .expect("runs");
        let env = std::fs::read(&env_out).expect("env");
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).filter(|v| !v.is_empty()).collect();
        assert_eq!(
            vars,
            [format!("MESHCERT_SVID_DIR={}", dir.path().display()).as_bytes()],
            "only the folder is passed"
        );
        let status = std::fs::read_to_string(&status_out).expect("status");
        for field in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(status_field(&status, field), "0000000000000000", "{field}");
        }
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
        // A root agent empties the bounding set; without root this part would prove nothing.
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test checks a root agent's bounding set and must run as root"
        );
        assert_eq!(status_field(&status, "CapBnd:"), "0000000000000000");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let late = dir.path().join("late");
        // The command starts a child of its own that would write after the timeout.
        let script = format!("(sleep 1; echo late > {}) & wait", late.display());
        let slow = run(
            &hook(&["sh", "-c", &script], Some(Duration::from_millis(200))),
            dir.path(),
        )
        .await;
        assert!(matches!(slow, Err(HookError::Timeout { .. })), "{slow:?}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!late.exists(), "the command's own child was killed with it");
    }

    #[tokio::test]
    async fn a_pid_file_that_is_a_fifo_or_a_symlink_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo.pid");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("fifo");
        let link = dir.path().join("link.pid");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        for path in [fifo, link] {
            let h = Hook {
                pid_file: Some(path.clone()),
                signal: Some("SIGHUP".into()),
                command: Vec::new(),
                timeout: None,
            };
            let result = run(&h, dir.path()).await;
            assert!(
                matches!(
                    result,
                    Err(HookError::BadPid { .. } | HookError::PidFile { .. })
                ),
                "{}: {result:?}",
                path.display()
            );
        }
    }

    #[test]
    fn holder_hooks_are_stripped_and_config_hooks_found_by_id_or_folder() {
        let entry = |id: &str, hook: Option<Hook>| -> Entry {
            let mut e: Entry = serde_json::from_value(serde_json::json!({
                "id": id,
                "spiffeId": format!("spiffe://td.test/{id}"),
                "nodes": ["n1"],
                "dir": format!("{id}-dir"),
            }))
            .expect("entry");
            e.hook = hook;
            e
        };
        let planted = hook(&["touch", "/tmp/pwned"], None);
        let mut entries = vec![entry("web", Some(planted.clone())), entry("db", None)];
        assert_eq!(strip_from_holder(&mut entries), ["web"]);
        assert!(entries.iter().all(|e| e.hook.is_none()));

        let file = crate::config::parse(
            "hooks:\n  - entry: web\n    command: [\"true\"]\n  - dir: db-dir\n    pidFile: /run/db.pid\n    signal: SIGUSR1\n",
        )
        .expect("parses");
        let rules: Vec<HookRule> = file
            .hooks
            .iter()
            .enumerate()
            .filter_map(|(n, h)| crate::config::hook_rule(n, h, &mut Vec::new()))
            .collect();
        let web = &entries[0];
        let db = &entries[1];
        assert_eq!(
            for_entry(&rules, web, false).map(|h| h.command.clone()),
            Some(vec!["true".to_owned()])
        );
        assert_eq!(
            for_entry(&rules, db, false).and_then(|h| h.signal.clone()),
            Some("SIGUSR1".to_owned())
        );
        // A local entry (from the agent's config) keeps its own hook.
        let local = entry("local", Some(planted.clone()));
        assert_eq!(for_entry(&rules, &local, true), Some(&planted));
        assert_eq!(for_entry(&rules, &local, false), None);
    }

    #[tokio::test]
    async fn pid_file_is_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid_file = dir.path().join("app.pid");
        std::fs::write(&pid_file, format!("{}\n", child.id())).expect("write");
        let h = Hook {
            pid_file: Some(pid_file.clone()),
            signal: Some("SIGTERM".into()),
            command: Vec::new(),
            timeout: None,
        };
        run(&h, dir.path()).await.expect("signals");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "sleep was terminated by the signal");

        std::fs::write(&pid_file, "not a pid").expect("write");
        assert!(matches!(
            run(&h, dir.path()).await,
            Err(HookError::BadPid { .. })
        ));

        // A pid file another user can write names a process of ours: not signalled. Handing the
        // file to another user needs root.
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test chowns a pid file to another user and must run as root"
        );
        let mut ours = KillOnDrop(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn"),
        );
        std::fs::write(&pid_file, format!("{}\n", ours.0.id())).expect("write");
        sys::lchown(&pid_file, 4242, 4242).expect("chown");
        let refused = run(&h, dir.path()).await;
        assert!(
            matches!(refused, Err(HookError::ForeignPid { owner: 4242, .. })),
            "{refused:?}"
        );
        assert!(ours.0.try_wait().expect("wait").is_none(), "not signalled");
    }

    /// A child killed and reaped when the test ends, panicking or not.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
