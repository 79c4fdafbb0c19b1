//! meshcert-ca (being written).
fn main() {}
