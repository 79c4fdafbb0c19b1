//! meshcert-agent: the node daemon that keeps every SVID on its node fresh.
//!
//! The agent joins the CA holder once with a join token (on Kubernetes: with its pod's
//! service-account token, whenever it needs to), keeps its node identity in a state
//! folder, syncs the node's registration entries, generates a fresh key for every entry on the
//! node, has the holder sign a CSR for it, and installs the result atomically into a shared
//! volume, rotating it long before it expires.
//!
//! # Layout
//!
//! - [`config`]: the agent's YAML config, command-line overrides and their validation.
//! - [`keys`]: private keys (generated on the node, zeroized, never printed).
//! - [`csr`]: PKCS#10 requests for an identity.
//! - [`svid`]: checks an issued SVID before install (chain, SPIFFE ID, key match).
//! - [`issuer`]: the [`issuer::Issuer`] seam and its HTTPS implementation (the CA holder).
//! - [`node`]: the node identity and last sync kept in the state folder.
//! - [`k8s`]: on Kubernetes, joining with the pod's projected service-account token.
//! - [`kubelet`]: on Kubernetes, the caller's pod from the kubelet's pod list (`k8s:`
//!   selectors).
//! - [`rotation`]: the single writer of credentials, as a pure core (events in, actions out:
//!   sync, batched signing, install, node renewal) and an executor that owns the tasks, the
//!   clock and the seams (issuer, volume).
//! - [`reachability`]: whether the CA holder answers, and when to probe it during an outage
//!   (pure).
//! - [`volume`]: the atomic writer of the shared volume.
//! - [`folder`]: file operations relative to an open folder, never through a symlink.
//! - [`worker`]: the thread that runs the volume's file operations, with a timeout.
//! - [`changes`]: the volume's watcher, and which entry folders someone else changed (its
//!   events without the agent's own installs).
//! - [`hook`]: what runs after a rotation (signal a process, or run a command).
//! - [`report`]: the state sent upward to the holder.
//! - [`push`]: the long-poll watch of the holder that triggers a sync when something changed.
//! - [`reissue`]: when a root rotation makes an SVID due (pure).
//! - [`trust`]: the holder's roots: the configured bundle plus the synced ones.
//! - [`systemd`]: `sd_notify` messages (from `meshcert-daemon`).
//! - [`sys`]: every `nix` call of the agent core.
//! - [`heap`]: the C allocator's settings (tunables set by a restart in place, one arena,
//!   freed pages returned after bursts).
//! - [`restart`]: the restart in place at start (allocator tunables, join token out of argv).
//! - [`daemon`]: wires everything together and handles signals.
//! - [`cache`]: the snapshot of installed SVIDs and bundles every reader serves from.
//! - [`workload`]: the SPIFFE Workload API on a Unix socket, callers attested by the kernel.
//! - [`jwt`]: JWT-SVIDs: tokens the holder signs, cached per identity and audience set; the
//!   JWKS; token validation.
//! - [`admin`]: the admin socket (HTTP/JSON): status, health, readiness, metrics.
//! - [`metrics`]: Prometheus metrics, on the admin socket and an optional plaintext listener.
//!
//! The binary (`main.rs`) adds `math.rs`: the C math functions it defines itself, so that it
//! does not load `libm.so.6`.

pub mod admin;
pub mod cache;
pub mod changes;
pub mod config;
pub mod csr;
pub mod daemon;
pub mod folder;
pub mod heap;
pub mod hook;
pub mod issuer;
pub mod jwt;
pub mod k8s;
pub mod keys;
pub mod kubelet;
pub mod metrics;
pub mod node;
pub mod push;
pub mod reachability;
pub mod reissue;
pub mod report;
pub mod restart;
pub mod rotation;
pub mod svid;
pub mod sys;
pub use meshcert_daemon::systemd;
pub mod trust;
pub mod volume;
pub mod worker;
pub mod workload;
