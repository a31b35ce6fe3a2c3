//! Links as one-liners: [`connect`] an address to get a client [`Session`](crate::mux::Session),
//! [`bind`] one to get a [`Listener`] of server sessions, or [spawn a child
//! process](child::spawn) with a session to it over an inherited socket.
//!
//! | address | link |
//! |---|---|
//! | `host:port`, `tcp://host:port` | TCP, `TCP_NODELAY` set |
//! | `tls://host:port` | TCP under TLS, server or mutual auth ([`TlsClient`], [`TlsServer`]; feature `tls`) |
//! | `unix:/path/to.sock` | a Unix socket file (stale files handled, see [`bind`]) |
//! | `unix:@name` | a Linux abstract Unix socket |
//!
//! **Listen before the peer dials.** A session dialled on a name nobody listens on fails at
//! once with `NoListener`, and the peer may dial the moment the link is up. Register your
//! listeners in [`BindOptions::on_session`] / [`ConnectOptions::on_session`]: that setup runs
//! before the new session reads anything from the peer, so no dial can arrive before it.
//!
//! Every wait is bounded: a connect by [`ConnectOptions::timeout`], an incoming TLS handshake
//! by [`BindOptions::handshake_timeout`]. Errors name the address and what failed.
//!
//! # Layout
//!
//! - `addr.rs` — [`Addr`] and its parser;
//! - `connect.rs` — [`connect`] and [`ConnectOptions`];
//! - `listen.rs` — [`bind`], [`BindOptions`] and [`Listener`];
//! - `tls.rs` — [`TlsClient`], [`TlsServer`], PEM loading and [`TlsError`];
//! - `child.rs` — [`child`]: a session to a child process over an inherited socket, and
//!   `child/fd.rs`, the one module allowed `unsafe` (moving the socket to fd 3 in the child).
//! - `gate.rs` — holds a new session's reads until its `on_session` setup has run;
//! - `error.rs` — [`ConnectError`], [`BindError`], [`AcceptError`].

mod addr;
pub mod child;
mod connect;
mod error;
mod gate;
mod listen;
#[cfg(feature = "tls")]
pub mod tls;

pub use addr::{Addr, AddrError, AddrProblem, IntoAddr};
pub use connect::{connect, ConnectOptions};
pub use error::{AcceptError, BindError, ConnectError};
pub use listen::{bind, BindOptions, Listener};
#[cfg(feature = "tls")]
pub use tls::{TlsClient, TlsError, TlsServer};
