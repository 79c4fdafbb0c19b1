//! Rotation hooks: after an entry's SVID is replaced, signal the process in a pid file or run a
//! command with a timeout. A hook failure is logged and reported; it never blocks rotation.

use std::path::PathBuf;
use std::time::Duration;

use meshcert_protocol::Hook;

use crate::sys::{self, SysError};

/// How long a hook command may run when the entry does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The pid file does not hold a process id.
    #[error("the pid file {path} does not hold a process id")]
    BadPid {
        /// The file.
        path: PathBuf,
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

/// Runs `hook` once: the signal first (if a pid file is set), then the command (if any).
pub async fn run(hook: &Hook, entry_dir: &std::path::Path) -> Result<(), HookError> {
    if let Some(path) = &hook.pid_file {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| HookError::PidFile {
                path: path.clone(),
                source,
            })?;
        let pid: i32 = text
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| HookError::BadPid { path: path.clone() })?;
        let signal = sys::parse_signal(hook.signal.as_deref().unwrap_or("SIGHUP"))?;
        sys::kill(pid, signal)?;
    }
    if let Some((program, args)) = hook.command.split_first() {
        let timeout = hook.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("MESHCERT_SVID_DIR", entry_dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HookError::Spawn {
                program: program.clone(),
                source,
            })?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                return Err(HookError::Failed {
                    program: program.clone(),
                    status,
                });
            }
            Ok(Err(source)) => {
                return Err(HookError::Spawn {
                    program: program.clone(),
                    source,
                });
            }
            Err(_) => {
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
    }
}
