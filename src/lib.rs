//! netchan: named virtual channels and bidirectional RPC over one connection.
//!
//! This facade re-exports the two layers:
//! - [`mux`] (`netchan-mux`): sessions of named channels over any byte stream.
//! - [`rpc`] (`netchan-rpc`): RPC over any conn, typically a mux channel.

pub use netchan_mux as mux;
pub use netchan_rpc as rpc;
