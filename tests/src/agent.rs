//! Harness for a running node agent (being written).
