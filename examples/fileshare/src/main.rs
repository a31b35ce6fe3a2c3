//! The `share` binary.
fn main() {}
