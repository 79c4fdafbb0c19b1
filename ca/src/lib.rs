//! meshcert-ca, the root CA holder of a meshcert virtual mesh.
//!
//! It holds the virtual mesh's root (generated once or provided; under limited trust one more
//! root per mesh), gives each mesh an ECDSA intermediate, attests nodes with one-time join tokens (or, on Kubernetes, service-account tokens), signs the CSRs agents send under
//! policy, distributes the trust bundle, and aggregates the agents' reports into the
//! VirtualMesh status. Operators drive it with the `meshcert-ca` command over an admin socket.
//!
//! # Layout
//!
//! - [`config`]: the VirtualMesh YAML plus the holder's settings and entries; validation that
//!   lists every problem with its field path.
//! - [`authority`]: root (builtin or provided), per-mesh intermediates, leaf and server signing.
//! - [`caller`]: one connection's client chain, its node identity and verification remembered.
//! - [`policy`]: pure CSR checks (signature, key, SAN, entry assignment).
//! - [`tokens`]: join tokens.
//! - [`k8s`]: node attestation with Kubernetes projected service-account tokens (TokenReview,
//!   then the token's pod's node).
//! - [`jwt`]: JWT-SVID signing keys per trust domain (rotation, JWKS) and the tokens they sign;
//!   `jwt/vault.rs` keeps the keys (files, or sealed documents shared by replicas).
//! - [`entries`]: registration entries from the config and the datastore.
//! - [`store`]: the datastore trait, SQLite (the default) and PostgreSQL (holder replicas).
//! - [`sealed`]: the key-encryption key, and the builtin and rotation roots replicas share sealed.
//! - [`status`]: the status document, its builder (from the holder's state) and its table form.
//! - [`holder`]: the running holder's state and operations, shared by both front ends; the
//!   configuration it serves is swapped as a whole on reload.
//! - [`metrics`]: Prometheus counters and the optional plaintext `/metrics` listener.
//! - [`server`]: the HTTPS API (hyper + rustls, mTLS for nodes).
//! - [`admin`]: the admin Unix socket (one handler per route) and its typed client, which
//!   the CLI (`src/cli/`, binary side) uses.
//! - [`rotation`]: root rotation phases (PREPARED, ACTIVE, RETIRED), their persistence and
//!   driver; [`rotation_admin`]: its admin endpoints and `meshcert-ca root` subcommands.
//! - [`push`]: the long-poll sync that wakes agents when entries, bundles or enforcement
//!   change.
//! - [`daemon`]: `run`: wires the tasks, signals, live reload (SIGHUP and file changes) and
//!   systemd notifications.

pub mod admin;
pub mod authority;
pub mod caller;
pub mod config;
pub mod daemon;
pub mod entries;
pub mod holder;
pub mod jwt;
pub mod k8s;
pub mod metrics;
pub mod policy;
pub mod push;
pub mod rotation;
pub mod rotation_admin;
pub mod sealed;
pub mod server;
pub mod status;
pub mod store;
pub mod tokens;

#[cfg(test)]
mod testing;
