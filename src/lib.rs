//! netchan: named virtual channels and bidirectional RPC over one connection.
//!
//! Firewalls and NAT let a client open one outbound connection and make it hard for anything to
//! call it back. netchan multiplexes named channels over that one connection, so both peers can
//! serve and call RPCs on the same link. This facade re-exports the two layers:
//!
//! - [`mux`] (`netchan-mux`): a [`mux::Session`] over any byte stream, where either side can
//!   [`listen`](mux::Session::listen) on a name and [`dial`](mux::Session::dial) the peer's.
//! - [`rpc`] (`netchan-rpc`): RPC over any conn, typically a mux channel: typed services,
//!   deadlines, cancellation, metadata, status codes and streaming with flow control.
//!
//! and adds the links users bring, each a one-liner ([`net`]):
//!
//! - [`connect`] / [`bind`]: TCP, TLS (`tls://`), Unix socket files and abstract sockets, by
//!   [`Addr`];
//! - [`net::child`]: a session to a child process over an inherited socket.
//!
//! See the repository's `README.md` and `docs/guide.md` for a walk-through.
//!
//! # Layout
//!
//! - `net.rs` and `net/` — addresses, connect, bind, TLS and the child-process link.

pub mod net;

pub use net::{bind, connect, Addr, BindOptions, ConnectOptions, Listener};
pub use netchan_mux as mux;
pub use netchan_rpc as rpc;

/// The README's examples, compiled and run as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The guide's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/guide.md")]
pub struct GuideDoctests;
