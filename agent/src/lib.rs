//! meshcert-agent: the node daemon that keeps every SVID on its node fresh.
//!
//! # Layout
//!
//! - [`cache`]: the snapshot of installed SVIDs and bundles every reader serves from.
//! - [`workload`]: the SPIFFE Workload API on a Unix socket, callers attested by the kernel.
//! - [`admin`]: the admin socket (HTTP/JSON): status, health, readiness.

pub mod admin;
pub mod cache;
pub mod workload;
