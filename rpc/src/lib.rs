//! RPC over any conn: `netchan-rpc` runs request/response and
//! server-streaming calls over any Tokio `AsyncRead + AsyncWrite` — a
//! netchan-mux channel, a `TcpStream`, a `UnixStream`, an in-memory duplex —
//! in the spirit of Go's `net/rpc` `ServeConn`/`NewClient`, with what gRPC
//! users rely on: [`Status`] codes, deadlines that travel with the call,
//! cancellation when the caller drops the call, metadata, flow-controlled
//! server, client and bidirectional streaming, and typed services
//! ([`service!`]).
//!
//! One conn carries calls in one direction: a [`Server`] serves it, a
//! [`Client`] calls over it. For both sides to serve and call on one link,
//! use a [`Peer`] on a netchan-mux session: it sets up both directions, and
//! a handler reaches the peer that called it with [`Context::callback`]
//! (see `examples/bidirectional.rs`). [`Server::serve_incoming`] serves a
//! listener's conns with graceful shutdown.
//!
//! ```
//! use netchan_rpc::{CallOptions, Client, Code, Server, Status};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (client_io, server_io) = tokio::io::duplex(64 << 10);
//!
//! let mut server = Server::new();
//! server.register("Greeter.hello", |ctx, name: String| async move {
//!     if ctx.metadata().get("token") != Some("s3cret") {
//!         return Err(Status::unauthenticated("bad token"));
//!     }
//!     Ok(format!("hello, {name}"))
//! });
//! tokio::spawn(async move { server.serve(server_io).await });
//!
//! let client = Client::new(client_io);
//! let opts = CallOptions::default()
//!     .timeout(Duration::from_secs(5))
//!     .metadata("token", "s3cret");
//! let reply: String = client.call_with("Greeter.hello", "ada", opts).await.unwrap();
//! assert_eq!(reply, "hello, ada");
//!
//! let err = client.call::<_, String>("Greeter.bye", "ada").await.unwrap_err();
//! assert_eq!(err.code(), Code::Unimplemented);
//! # }
//! ```
//!
//! # Layout
//!
//! - `wire` — preamble, frame layout and the envelope header kinds.
//! - `codec` — the only module that knows the codec (bincode 2 via serde).
//! - `transport` — the batching outbox, its writer task and the frame reader.
//! - `client` — [`Client`] and [`CallOptions`]; `client/in_flight` holds
//!   the in-flight map and the reader, `client/streams` the client's ends
//!   of streaming calls ([`ResponseStream`], [`RequestSink`]).
//! - `stream` — what both ends of a streaming call share, and
//!   [`RequestStream`] (the server's view of a bidi call's requests).
//! - `server` — [`Server`], the method registry; `server/handler` erases
//!   typed [`Handler`]s, `server/conn` is the per-conn loop,
//!   `server/in_flight` admission and in-flight tracking, `server/call` one
//!   call's task, `server/incoming` [`Server::serve_incoming`] and its
//!   [`Incoming`] sources.
//! - `service` — [`ServiceDef`] and the [`service!`] macro.
//! - `peer` — [`Peer`]: both directions over one mux session.
//! - `context`, `status`, `metadata`, `config`, `error`, `bytebuf` — the
//!   small types ([`ByteBuf`]: a byte payload that encodes as one block).
//!
//! The wire format is documented byte for byte in `docs/protocol.md`, Part 2.

mod bytebuf;
mod client;
mod codec;
mod config;
mod context;
mod error;
mod metadata;
mod peer;
mod server;
mod service;
mod status;
mod stream;
mod transport;
mod wire;

pub use bytebuf::ByteBuf;
pub use client::{CallOptions, Client, RequestSink, ResponseStream};
pub use codec::CodecError;
pub use config::{Config, MAX_MESSAGE_SIZE_CAP, MIN_MESSAGE_SIZE};
pub use context::Context;
pub use error::Error;
pub use metadata::Metadata;
pub use peer::{Peer, PeerError, PEER_CHANNEL};
pub use server::{FromStream, Handler, Incoming, Server};
pub use service::ServiceDef;
pub use status::{Code, Status};
pub use stream::{ItemStream, RequestStream, StreamArg, StreamReturn};
