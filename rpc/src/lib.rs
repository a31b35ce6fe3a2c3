//! RPC over any conn: `netchan-rpc` runs unary (request/response),
//! server-streaming, client-streaming and bidi-streaming calls over any
//! Tokio `AsyncRead + AsyncWrite` — a
//! netchan-mux channel, a `TcpStream`, a `UnixStream`, an in-memory duplex —
//! in the spirit of Go's `net/rpc` `ServeConn`/`NewClient`, with what gRPC
//! users rely on: [`Status`] codes, deadlines that travel with the call,
//! cancellation when the caller drops the call, metadata, flow-controlled
//! server, client and bidi streaming, and typed services
//! ([`rpc_service`]).
//!
//! One conn carries calls in one direction: a [`Server`] serves it, a
//! [`Client`] calls over it. For both sides to serve and call on one link,
//! use a [`Peer`] on a netchan-mux session: it sets up both directions, and
//! a handler reaches the peer that called it with [`Context::callback`]
//! (see [`Peer`]'s example). [`Server::serve_all`] serves a listener's
//! conns; [`Server::serve_incoming`] adds graceful shutdown.
//!
//! ```
//! use netchan_rpc::{CallOptions, Client, Code, Server, ServiceDef, Status};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (client_io, server_io) = tokio::io::duplex(64 << 10);
//!
//! let mut server = Server::new();
//! server.add(ServiceDef::new("Greeter").unary("hello", |ctx, name: String| async move {
//!     if ctx.metadata().get("token") != Some("s3cret") {
//!         return Err(Status::unauthenticated("bad token"));
//!     }
//!     Ok(format!("hello, {name}"))
//! }));
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
//! # Words
//!
//! - **conn**: one ordered byte stream a [`Server`] serves or a [`Client`]
//!   calls over. A netchan-mux channel (the mux's `Conn` type) is one kind
//!   of conn; a `TcpStream` is another.
//! - **bidi**: a streaming *kind* of call, with a stream of requests and a
//!   stream of responses in one call ([`ServiceDef::bidi`],
//!   [`Client::call_bidi`]).
//! - **bidirectional**: two *peers* that each serve and call the other over
//!   one link ([`Peer`]).
//! - [`Client`] and [`Server`] are roles in one conn's calls; they have
//!   nothing to do with the mux's `Session::client`/`Session::server`,
//!   which only say which end opened the link.
//!
//! # Layout
//!
//! The source, for readers of the code (these modules are private; what
//! they define is re-exported at the crate root):
//!
//! - `wire` — preamble, frame layout and the envelope header kinds.
//! - `codec` — the only module that knows the codec (bincode 2 via serde).
//! - `transport` — frame I/O: `transport/write` the batching outbox and its
//!   writer task, `transport/read` the preamble check and the frame reader.
//! - `client` — [`Client`] and [`CallOptions`]; `client/in_flight` holds
//!   the in-flight map and the reader, `client/streams` the client's ends
//!   of streaming calls ([`ResponseStream`], [`PendingResponse`],
//!   [`RequestSink`]).
//! - `stream` — what both ends of a streaming call share, and
//!   [`RequestStream`] (the server's view of a bidi call's requests).
//! - `server` — [`Server`], the method registry; `server/handler` erases
//!   typed [`Handler`]s, `server/conn` is the per-conn loop,
//!   `server/in_flight` admission and in-flight tracking, `server/call` one
//!   call's task, `server/incoming` [`Server::serve_incoming`] and its
//!   [`Incoming`] sources.
//! - `service` — [`ServiceDef`] and what `#[rpc_service]` expands to relies
//!   on (the attribute itself lives in the `netchan-rpc-macros` crate).
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
mod fds;
mod metadata;
mod peer;
mod server;
mod service;
mod status;
mod stream;
mod transport;
mod wire;

pub use bytebuf::ByteBuf;
pub use client::{CallOptions, Client, PendingResponse, RequestSink, ResponseStream};
pub use codec::CodecError;
pub use config::{Config, MAX_MESSAGE_SIZE_CAP, MIN_MESSAGE_SIZE};
pub use context::{Context, EndReason};
pub use error::{chain, Error};
pub use fds::MAX_FDS_PER_MESSAGE;
pub use metadata::{Interceptor, Metadata};
/// Declares a typed service from a trait: the trait to implement, a typed
/// client (`{Trait}Client`) and a registration (`into_service`), in the
/// spirit of `#[tarpc::service]`.
///
/// Each method is `async fn name(&self, ctx: Context, args...) -> Result<T, E>`:
///
/// - any number of arguments (none, one, several: several travel as a
///   tuple); all owned and serializable, checked with a clear message;
/// - `E` is [`Status`] or any type with `From<E> for Status`;
/// - the kind follows from the types: returning [`ItemStream<T>`] makes a
///   server-streaming method; taking one [`RequestStream<T>`] argument a
///   client-streaming method (returning `T`) or a bidi-streaming one
///   (returning `ItemStream<T>`).
///
/// The client has one method per service method with the same arguments,
/// resolving as tonic's do: a streaming-request method takes any `Stream`
/// of requests (sent while the call runs, see [`Client::call_bidi`]); a
/// client-streaming one resolves with the answer, a bidi or
/// server-streaming one with a [`ResponseStream`] once the server's
/// handler accepted the call (its early error is the call's error). On the wire the methods are `"Trait.method"`.
///
/// The generated code names this crate as the calling crate's `Cargo.toml`
/// does: `netchan_rpc` (or its renamed name) for a direct dependency, else
/// `netchan::rpc` through the facade crate `netchan`. Where that guess is
/// wrong (a re-export of your own), name the path:
/// `#[rpc_service(crate = "my_lib::rpc")]`.
///
/// ```
/// use futures::StreamExt;
/// use netchan_rpc::{rpc_service, Client, Context, ItemStream, RequestStream, Server, Status};
///
/// /// Counts things.
/// #[rpc_service]
/// pub trait Counter {
///     /// `a + b`.
///     async fn add(&self, ctx: Context, a: u64, b: u64) -> Result<u64, Status>;
///     /// Counts from zero to `n`.
///     async fn upto(&self, ctx: Context, n: u64) -> Result<ItemStream<u64>, Status>;
///     /// Adds up the numbers sent.
///     async fn sum(&self, ctx: Context, ns: RequestStream<u64>) -> Result<u64, Status>;
/// }
///
/// struct MyCounter;
///
/// impl Counter for MyCounter {
///     async fn add(&self, _ctx: Context, a: u64, b: u64) -> Result<u64, Status> {
///         a.checked_add(b).ok_or_else(|| Status::out_of_range("overflow"))
///     }
///     async fn upto(&self, _ctx: Context, n: u64) -> Result<ItemStream<u64>, Status> {
///         Ok(Box::pin(futures::stream::iter((0..n).map(Ok))))
///     }
///     async fn sum(&self, _ctx: Context, mut ns: RequestStream<u64>) -> Result<u64, Status> {
///         let mut total = 0;
///         while let Some(n) = ns.next().await {
///             total += n?;
///         }
///         Ok(total)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = tokio::io::duplex(64 << 10);
/// let mut server = Server::new();
/// server.add(MyCounter.into_service());
/// tokio::spawn(async move { server.serve(b).await });
///
/// let counter = CounterClient::new(Client::new(a));
/// assert_eq!(counter.add(40, 2).await?, 42);
/// let all: Vec<u64> = counter.upto(3).await?.map(|r| r.unwrap()).collect().await;
/// assert_eq!(all, [0, 1, 2]);
/// assert_eq!(counter.sum(futures::stream::iter([1, 2, 3])).await?, 6);
/// # Ok(())
/// # }
/// ```
#[doc(inline)]
pub use netchan_rpc_macros::rpc_service;
pub use peer::{Peer, PeerError, PEER_CHANNEL};
pub use server::{FromStream, Handler, Incoming, Server};
#[doc(hidden)]
pub use service::__private;
pub use service::ServiceDef;
pub use status::{Code, Status};
pub use stream::{ItemStream, RequestStream};
