//! netchan-rpc benchmarks against raw TCP (see docs/performance.md).

fn main() {}
