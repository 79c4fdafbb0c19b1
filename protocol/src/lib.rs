//! meshcert's wire contract and domain values, shared by the CA holder and the agent.
//!
//! This crate does no I/O and knows nothing of tokio: it is the vocabulary both programs speak.
//!
//! # Layout
//!
//! - [`id`]: [`SpiffeId`] and [`TrustDomain`], validated on construction.
//! - [`entry`]: registration entries, selectors, file owners and rotation hooks.
//! - [`report`]: certificate states, node reports, enforcement modes.
//! - [`api`]: the holder's HTTPS endpoints, their JSON bodies and error codes.
//! - [`jwt`]: the holder's JWT-SVID endpoints and their bodies.
//! - [`duration`]: serde for `10m`-style durations.

pub mod api;
pub mod duration;
pub mod entry;
pub mod id;
pub mod jwt;
pub mod report;

pub use entry::{Entry, Hook, Owner, Selector};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use report::{CertState, Enforcement, IdentityReport, NodeReport, NodeSvidReport};
