//! Harness for meshcert's end-to-end tests: starts real `meshcert-ca` and `meshcert-agent`
//! processes on loopback and temporary folders.
//!
//! The binaries come from the same target folder as the test binary. `cargo test` alone does not
//! rebuild another package's binaries, so the first [`bin_path`] call of a test process runs
//! `cargo build --bins` for the binaries' packages into that folder (the same profile): an e2e
//! test never runs binaries older than the sources. `MESHCERT_E2E_PREBUILT=1` skips that build
//! for a test binary run outside its workspace, with binaries copied beside it.
//!
//! # Layout
//!
//! - [`ca`]: a running CA holder with its config, state folder and admin socket.
//! - [`agent`]: a running node agent with its volume and sockets.
//! - [`oracle`]: independent readings of certificates and installed SVIDs (x509-parser, openssl).
//! - [`pki`]: keys and CSRs made at test time.
//! - [`kube`]: a stand-in Kubernetes API server (TokenReview, pods) speaking Kubernetes' JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub mod agent;
pub mod ca;
pub mod kube;
pub mod oracle;
pub mod pki;
pub mod postgres;

/// The packages whose binaries the e2e tests run.
const BIN_PACKAGES: [&str; 3] = ["meshcert-ca", "meshcert-agent", "meshcert-tests"];

/// The environment switch that trusts the binaries beside the test binary as they are.
pub const PREBUILT_ENV: &str = "MESHCERT_E2E_PREBUILT";

/// The path of a workspace binary (`meshcert-ca`, `meshcert-agent`, `workload-probe`) built
/// beside the tests from the current sources (see the crate documentation).
///
/// Panics with the build's output when the build fails, or when the binary is missing: a test
/// cannot go on without it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    // target/<profile>/deps/<test binary> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = BUILT.get_or_init(|| build_bins(dir)) {
        panic!("{why}");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// `cargo build --bins` of [`BIN_PACKAGES`] into the target folder holding `profile_dir`, with
/// its profile; cargo rebuilds only what changed. Skipped when [`PREBUILT_ENV`] is `1`.
fn build_bins(profile_dir: &Path) -> Result<(), String> {
    if std::env::var_os(PREBUILT_ENV).is_some_and(|v| v == "1") {
        return Ok(());
    }
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("the target folder has no profile name")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("the profile folder has no parent")?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--bins");
    for package in BIN_PACKAGES {
        cmd.args(["-p", package]);
    }
    // `debug` is the `dev` profile's folder, `release` the `release` profile's.
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo to build the e2e binaries: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the e2e binaries ({cmd:?}) failed with {}; set {PREBUILT_ENV}=1 to use the \
             binaries beside the test binary as they are:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How long a short command run by the harness ([`output_within`]) may take.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A child process killed and reaped when dropped, so that a panicking test leaves nothing
/// running.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Spawns `cmd` under a guard.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<ChildGuard> {
        cmd.spawn().map(ChildGuard)
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`Command::output`] with a deadline: the command is killed, and an error of kind
/// `TimedOut` returned, if it has not exited after `timeout`. Stdout and stderr are captured
/// (stdin is whatever `cmd` says).
pub fn output_within(
    cmd: &mut Command,
    timeout: std::time::Duration,
) -> std::io::Result<std::process::Output> {
    let child = ChildGuard::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    child.output_within(timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{cmd:?} did not exit within {timeout:?}"),
            )
        } else {
            e
        }
    })
}

impl ChildGuard {
    /// [`std::process::Child::wait`] with a deadline: an error of kind `TimedOut` if the child
    /// has not exited after `timeout` (it is killed when the guard drops).
    pub fn wait_within(
        &mut self,
        timeout: std::time::Duration,
    ) -> std::io::Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the child did not exit within {timeout:?}"),
                ));
            }
            // A poll interval, not a wait for an effect.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// [`std::process::Child::wait_with_output`] with a deadline: the child is killed, and an
    /// error of kind `TimedOut` returned, if it has not exited after `timeout`. Only the pipes
    /// the child was spawned with are read.
    pub fn output_within(
        mut self,
        timeout: std::time::Duration,
    ) -> std::io::Result<std::process::Output> {
        use std::io::Read as _;
        // Like `output`: a piped stdin is closed at once, so the command sees its end.
        drop(self.stdin.take());
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(self.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(self.stderr.take().map(|p| Box::new(p) as _));
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                // The guard kills it; the pipes close and the readers end.
                drop(self);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the child did not exit within {timeout:?}"),
                ));
            }
            // A poll interval, not a wait for an effect.
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        Ok(std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

/// Whether `log` (a binary's tracing output) holds an event of `target` (e.g.
/// `meshcert_agent::rotator`, or a crate, `meshcert_agent`, for any of its modules) whose
/// message is exactly `message`, fields may follow: `ready` does not match `already issued`,
/// nor `ready to serve`.
pub fn log_has_event(log: &str, target: &str, message: &str) -> bool {
    log.lines()
        .any(|line| event_text(line, target).is_some_and(|text| is_message(text, message)))
}

/// The text of `line` after its target (the message, then the fields) if its target is
/// `target` or one of its modules.
fn event_text<'a>(line: &'a str, target: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {target}"))? + 1;
    let after = &line[start + target.len()..];
    let rest = match after.strip_prefix(": ") {
        Some(rest) => rest,
        None => {
            let module = after.strip_prefix("::")?;
            let (path, rest) = module.split_once(": ")?;
            if path.is_empty() || path.contains(' ') {
                return None;
            }
            rest
        }
    };
    Some(rest)
}

/// Whether an event line's text (message, then fields) starts with exactly `message`.
fn is_message(text: &str, message: &str) -> bool {
    text == message
        || text
            .strip_prefix(message)
            .is_some_and(|fields| fields.starts_with(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_events_match_whole_messages() {
        let log = "2026-01-01T00:00:00Z  INFO meshcert_agent::rotator: ready status=\"1/1\"\n\
                   2026-01-01T00:00:00Z DEBUG meshcert_agent::rotator: already issued\n";
        assert!(log_has_event(log, "meshcert_agent::rotator", "ready"));
        assert!(!log_has_event(log, "meshcert_agent::rotator", "read"));
        assert!(!log_has_event(log, "meshcert_agent::rotator", "issued"));
        assert!(!log_has_event(log, "meshcert_agent::daemon", "ready"));
        // A crate stands for any of its modules, not for another crate of the same prefix.
        assert!(log_has_event(log, "meshcert_agent", "ready"));
        assert!(log_has_event(log, "meshcert_agent", "already issued"));
        assert!(!log_has_event(log, "meshcert", "ready"));
        assert!(!log_has_event(log, "meshcert_ag", "ready"));
        assert!(!log_has_event(
            "already\n",
            "meshcert_agent::rotator",
            "ready"
        ));
    }

    #[test]
    fn a_command_past_its_deadline_is_killed() {
        let started = std::time::Instant::now();
        let err = output_within(
            Command::new("sleep").arg("30"),
            std::time::Duration::from_millis(200),
        )
        .expect_err("sleep 30 outlives 200 ms");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        // Not a timing assertion on the code under test: the 30 s sleep did not run out.
        assert!(started.elapsed() < std::time::Duration::from_secs(25));
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            COMMAND_TIMEOUT,
        )
        .expect("sh runs");
        assert!(out.status.success());
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
    }
}
