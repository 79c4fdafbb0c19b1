//! meshcert benchmarks (being written).
fn main() {}
