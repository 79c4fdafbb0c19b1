//! The agent's rotation: keeping every SVID of the node (and the node's own) fresh.
//!
//! It is split the way ntpd-rs splits its algorithm from its daemon:
//!
//! - [`core`]: a pure state machine. It takes [`core::Event`]s (a tick at `now`, a sync
//!   answered, a batch signed, an SVID installed or not, the node SVID renewed, a probe
//!   answered, a reload, a change of the volume) and returns [`core::Action`]s (sync, sign a
//!   batch, renew, install, remove a folder, run a hook, publish). No tokio, no filesystem, no
//!   clock: `now` and a random seed come in as arguments, so property tests drive it through
//!   random event sequences.
//! - [`desired`]: which entries the node should hold (the holder's plus the config's local
//!   ones), as pure functions.
//! - [`timing`]: when to rotate and how long to back off (pure), and the per-entry schedule.
//! - [`executor`]: the only part that does I/O: it owns the tasks, the channels and the clock
//!   (read once per wake-up), and performs the core's actions through small seams: the
//!   [`crate::issuer::Issuer`], an [`installer::Installer`] (the volume) and a
//!   [`clock::Clock`].
//! - [`installed`]: an installed SVID as the core holds it and the cache serves it.
//! - [`signing`]: key generation and one batched signing call (run in the executor's tasks).
//!
//! Joining and renewing the node identity live with the node identity, in [`crate::node`].

pub mod clock;
pub mod core;
pub mod desired;
pub mod executor;
pub mod installed;
pub mod installer;
pub mod signing;
pub mod timing;

#[cfg(test)]
mod testing;

pub use self::executor::{Command, Rotator, RotatorError};
pub use self::installed::GATEWAY_HINT;
pub use self::timing::{Schedule, backoff, jitter_for, refresh_at, refresh_in, sample_jitter};

/// The log target of the rotation's milestone events (`ready`), kept from the module they
/// were first logged by: operators' log filters and the end-to-end tests match it.
pub const LOG_TARGET: &str = "meshcert_agent::rotator";
