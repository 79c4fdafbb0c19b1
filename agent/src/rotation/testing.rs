//! Test helpers shared by the core's and the executor's tests.

use std::path::Path;
use std::time::Duration;

use meshcert_protocol::Entry;

use crate::config::{Config, Rotation};
use crate::keys::KeyAlgorithm;

/// The trust domain of the tests.
pub const TD: &str = "mesh-a.test";

/// An entry `id` for node `n1`, in folder `id`.
pub fn entry(id: &str) -> Entry {
    entry_in(id, TD)
}

/// An entry `id` in trust domain `td`.
pub fn entry_in(id: &str, td: &str) -> Entry {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "spiffeId": format!("spiffe://{td}/{id}"),
        "nodes": ["n1"],
        "dir": id,
    }))
    .expect("entry")
}

/// A config under `dir` with short backoffs.
pub fn config(dir: &Path) -> Config {
    Config {
        ca_address: "127.0.0.1:1".into(),
        ca_server_name: "127.0.0.1".into(),
        trust_bundle: dir.join("bundle.pem"),
        trust_roots: Vec::new(),
        node_name: "n1".into(),
        mesh: "mesh-a".into(),
        state_dir: dir.join("state"),
        volume_dir: dir.join("svids"),
        workload_socket: dir.join("workload.sock"),
        workload_socket_mode: 0o666,
        workload_connections_per_uid: 256,
        admin_socket: dir.join("admin.sock"),
        key_algorithm: KeyAlgorithm::EcdsaP256,
        rotation: Rotation {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            ..Rotation::default()
        },
        sync_interval: Duration::from_secs(30),
        heartbeat: Duration::from_secs(30),
        watch_holder: false,
        entries: Vec::new(),
        kubernetes: None,
        hooks: Vec::new(),
        clock_skew: crate::config::DEFAULT_CLOCK_SKEW,
    }
}
