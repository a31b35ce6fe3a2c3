//! Named virtual channels over one byte stream.
//!
//! A [`Session`] wraps any tokio byte stream (a `TcpStream`, a TLS stream, `tokio::io::duplex`)
//! and multiplexes channels over it with its own implementation of [yamux]. Whichever side opened the connection, either
//! side can [`listen`](Session::listen) on a name and [`dial`](Session::dial) the peer's names.
//! Every channel ([`Conn`]) is an ordered byte stream with its own flow control and implements
//! tokio's `AsyncRead + AsyncWrite`.
//!
//! Opening a channel runs a small handshake of ours on the new yamux stream (documented byte
//! for byte in `docs/protocol.md`): the dialer names the channel, the listening side accepts or
//! refuses with a reason. Dialing a name nobody listens on fails at once with
//! [`Error::NoListener`]. Sessions have keepalive (a silent peer is detected within
//! `keepalive_interval + keepalive_timeout`), a per-session channel limit, a
//! bounded receive budget and a graceful [`close`](Session::close); see [`Config`].
//!
//! ```
//! use netchan_mux::{Config, Session};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (a, b) = tokio::io::duplex(64 * 1024);
//! let client = Session::client(a, Config::default());
//! let server = Session::server(b, Config::default());
//!
//! let mut echo = server.listen("echo")?;
//! tokio::spawn(async move {
//!     while let Ok(mut conn) = echo.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = tokio::io::split(&mut conn);
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!         });
//!     }
//! });
//!
//! let mut conn = client.dial("echo").await?;
//! conn.write_all(b"hello").await?;
//! conn.shutdown().await?; // half-close: the echo ends after "hello"
//! let mut reply = Vec::new();
//! conn.read_to_end(&mut reply).await?;
//! assert_eq!(reply, b"hello");
//!
//! assert!(matches!(
//!     client.dial("nobody").await,
//!     Err(netchan_mux::Error::NoListener { .. })
//! ));
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Runtime
//!
//! A session runs on the tokio runtime it is created on, either flavour. Measured on 2 cores
//! (`docs/performance.md`), a `current_thread` runtime gave the better round trips and
//! multi-channel throughput for a process dominated by one session (a client), so that is
//! our recommendation there; a hub serving many sessions should use `multi_thread`, which
//! spreads the sessions' driver tasks over the cores.
//!
//! # Layout
//!
//! Protocol core under I/O under handles, each layer importing only the ones below it:
//!
//! - the crate `netchan-mux-proto` (`mux/proto/`, imported here as `proto`) — the sans-I/O
//!   yamux core: the 12-byte header, one stream's buffer, windows and half-close state, the
//!   session state machine (stream table, GoAway, Ping, what to send next), its flow-control
//!   policy, every timer of a session (keepalive, the close grace, the flush of the last
//!   frames, the wait for a GoAway: deadlines the driver sleeps to) and the order frames
//!   leave in.
//!   A crate of its own with no runtime among its dependencies: no tokio, no sockets, and it
//!   cannot import anything of this crate;
//! - `config.rs` — [`Config`] and the core's bounds derived from it;
//! - `error.rs` — [`Error`], [`CloseReason`] (and the core's [`Violation`]);
//! - `io/` — the I/O room, the only code that touches the byte stream: `mod.rs` (`Link`, and
//!   the contract of who touches the socket when), `core_lock.rs` (the core behind its lock,
//!   turning its readiness reports into wakes of the waiting tasks), `inbound.rs` (the read side, read-through),
//!   `outbound.rs` (the write side, vectored writes), `side.rs` (turns on a side between the
//!   driver and the handles), `transport.rs` and `transport/unix.rs` (the byte stream's halves,
//!   with file descriptors on a unix socket);
//! - `shared.rs` — the state one session shares ([`Mode`], the core, the link, the listener
//!   table, channel slots, stream ownership, its tasks); plain state, no I/O;
//! - `stream.rs` — one yamux stream as `AsyncRead + AsyncWrite` over the core and the link;
//! - `driver.rs` — the session's task: has the link read and write on every turn, sleeps to
//!   the core's timers and acts on them, runs the graceful end, hands new inbound streams to
//!   handshake tasks;
//! - `handshake.rs` — the channel-open handshake's wire format;
//! - `channel.rs` — [`Conn`], a channel;
//! - `listener.rs` — [`Listener`] and the listening side of the handshake;
//! - `session.rs` — [`Session`], [`SessionBuilder`] and the dialing side;
//! - `tcp.rs` — [`tune_tcp`], the socket options of a TCP connection under a session.
//!
//! [yamux]: https://github.com/hashicorp/yamux/blob/master/spec.md

mod channel;
mod config;
mod driver;
mod error;
mod handshake;
mod io;
mod listener;
mod session;
mod shared;
mod stream;
mod tcp;

pub use channel::Conn;
#[cfg(unix)]
pub use channel::ConnFds;
pub use config::Config;
pub use error::{CloseReason, Error};
pub use listener::Listener;
pub use netchan_mux_proto::Violation;
pub use session::{Mode, Session, SessionBuilder};
pub use tcp::{tune_tcp, TCP_UNSENT_LIMIT};
