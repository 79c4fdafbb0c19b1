//! Compiles the Workload API proto (being written).
fn main() {}
