//! Throughput and latency of netchan channels against raw TCP (see docs/performance.md).
fn main() {}
