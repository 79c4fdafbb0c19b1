//! Fault injection end-to-end tests (being written).
