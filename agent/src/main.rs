//! meshcert-agent (being written).
fn main() {}
