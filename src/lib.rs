//! netchan: named virtual channels and bidirectional RPC over one connection.
//!
//! Firewalls and NAT let a client open one outbound connection and make it hard for anything to
//! call it back. netchan multiplexes named channels over that one connection, so both peers can
//! serve and call RPCs on the same link. This facade re-exports the two layers:
//!
//! - [`mux`] (`netchan-mux`): a [`mux::Session`] over any byte stream, where either side can
//!   [`listen`](mux::Session::listen) on a name and [`dial`](mux::Session::dial) the peer's.
//! - [`rpc`] (`netchan-rpc`): RPC over any conn, typically a mux channel: typed services
//!   ([`rpc_service`](macro@rpc::rpc_service)), deadlines, cancellation, metadata, status codes and streaming with
//!   flow control; [`rpc::Peer`] runs both directions over one session.
//!
//! and adds the links users bring, each a one-liner ([`net`]):
//!
//! - [`connect`] / [`bind`]: TCP, TLS (`tls://`), Unix socket files and abstract sockets, by
//!   [`Addr`];
//! - [`net::child`]: a session to a child process over an inherited socket.
//!
//! # The NAT callback in a few lines
//!
//! A device behind NAT connects out to a hub; the hub, while serving the device's call, calls
//! back into that very device through the same connection:
//!
//! ```
//! use netchan::mux::{Config, Session};
//! use netchan::rpc::{rpc_service, Context, Peer, Server, ServiceDef, Status};
//!
//! #[rpc_service]
//! pub trait Device {
//!     async fn name(&self, ctx: Context) -> Result<String, Status>;
//! }
//! struct Alice;
//! impl Device for Alice {
//!     async fn name(&self, _ctx: Context) -> Result<String, Status> { Ok("alice".into()) }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (out, inn) = tokio::io::duplex(64 << 10); // the TCP connection the device opened
//!     let (dialer, acceptor) = (Session::client(out, Config::default()), Session::server(inn, Config::default()));
//!     let mut hub = Server::new();
//!     hub.add(ServiceDef::new("Hub").unary("greet", |ctx: Context, ()| async move {
//!         let device = DeviceClient::new(ctx.callback()?); // the caller, called back
//!         Ok::<_, Status>(format!("hello, {}", device.name().await?))
//!     }));
//!     let mut device = Server::new();
//!     device.add(Alice.into_service());
//!     let (device, _hub) = tokio::try_join!(
//!         Peer::connect(&dialer, device),
//!         Peer::connect(&acceptor, hub),
//!     )?;
//!     let greeting: String = device.client().call("Hub.greet", &()).await?;
//!     assert_eq!(greeting, "hello, alice");
//!     Ok(())
//! }
//! ```
//!
//! Dependencies for that: `netchan`, `tokio` (features `full`), and for your own message types
//! `serde` (feature `derive`); `futures` for streams. See the repository's `README.md` and
//! `docs/guide.md` for a walk-through. [`connect`] and [`bind`] set up TCP sockets for small
//! messages themselves (`TCP_NODELAY`, see [`net`]).
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
