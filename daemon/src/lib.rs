//! Daemon plumbing that `meshcert-agent` and `meshcert-ca` share, written once so the two
//! programs cannot drift apart. Nothing here knows about certificates or the wire protocol
//! (that is `meshcert-protocol`, which stays free of I/O).
//!
//! # Layout
//!
//! - [`serve`]: the one HTTP/1 accept loop, with a connection cap, a header-read timeout, a
//!   connection lifetime and a peer check that runs before a connection takes a slot.
//! - [`fs`]: atomic file replacement (temporary file with its final mode from creation, fsync,
//!   rename, fsync of the folder).
//! - [`watch`]: the configuration-file watcher (content digest compare, debounce, Kubernetes
//!   ConfigMap `..data` symlink swaps).
//! - [`logging`]: tracing set-up on stderr, text or JSON, `RUST_LOG` as target directives.
//! - [`systemd`]: `sd_notify` messages (`Type=notify-reload`).
//! - [`exit`]: the process exit codes both programs use.

pub mod exit;
pub mod fs;
pub mod logging;
pub mod serve;
pub mod systemd;
pub mod watch;
