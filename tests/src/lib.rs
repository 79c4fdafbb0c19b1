//! Harness for meshcert's end-to-end tests: starts real `meshcert-ca` and `meshcert-agent`
//! processes on loopback and temporary folders.
//!
//! The binaries come from the same target folder as the test binary, so the test command builds
//! them first: `cargo build --workspace --bins && cargo test --workspace`.
//!
//! # Layout
//!
//! - [`ca`]: a running CA holder with its config, state folder and admin socket.
//! - [`agent`]: a running node agent with its volume and sockets.
//! - [`pki`]: keys and CSRs made at test time.
//! - [`kube`]: a stand-in Kubernetes API server (TokenReview, pods) speaking Kubernetes' JSON.

use std::path::PathBuf;

pub mod agent;
pub mod ca;
pub mod kube;
pub mod pki;

/// The path of a workspace binary (`meshcert-ca`, `meshcert-agent`) built beside the tests.
///
/// Panics with the command to run when it is missing: a test cannot go on without it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    // target/<profile>/deps/<test binary> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}
