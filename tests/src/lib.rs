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
//! - [`pki`]: keys and CSRs made at test time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub mod agent;
pub mod ca;
pub mod pki;

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
