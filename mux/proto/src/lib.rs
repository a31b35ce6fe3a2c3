//! The sans-I/O yamux core of `netchan-mux`: frame codec, stream states, flow control and
//! timers, as a deterministic state machine.
//!
//! Nothing here touches a socket, a clock, a waker or a runtime, and the crate depends on no
//! runtime, so the compiler keeps it that way. The core talks to the outside only through
//! its calls' arguments and results:
//!
//! - **Time** comes in as `now` arguments, all on one clock (`std::time::Instant`, which the
//!   caller may read from any source: netchan-mux reads tokio's, so paused-time tests drive
//!   the core too). Every timer of a session is the core's (keepalive, the close grace, the
//!   flush of the last frames, the wait for the peer's GoAway after a failed write): the core
//!   reports its earliest deadline ([`Connection::poll_timeout`]) and runs what passed when
//!   told ([`Connection::handle_timeout`]), handing back what each asks for ([`Due`]); the
//!   caller keeps no deadline of its own.
//! - **Readiness**: a stream operation that cannot make progress returns
//!   `Poll::Pending` (the plain `std` enum: nothing is registered anywhere), and the core
//!   later reports it ready ([`Ready`], from [`Connection::drain_ready`]) when a frame or a
//!   call changes what it waits for. The caller keeps the waiting tasks' wakers and wakes
//!   them on those reports.
//! - **Output**: the frames to send ([`Connection::take_output`]).
//!
//! Who drives what: `netchan-mux`'s I/O layer is the only caller of
//! [`Connection::on_header`], [`Connection::on_frame`] and [`Connection::take_output`] (it
//! decodes frames from the byte stream and writes the frames the core queued); its stream
//! handles call the stream operations ([`Connection::read`], [`Connection::write`],
//! [`Connection::finish`], [`Connection::reset`], [`Connection::drop_handle`]). The caller
//! serialises all calls (`netchan-mux` holds a mutex for the duration of one call, never
//! across an `.await` or a syscall) and drains the readiness reports after them (it does
//! when it lets go of the mutex).
//!
//! Only what `netchan-mux` needs is public; the crate has no other user.
//!
//! # Layout
//!
//! - `frame.rs` — the 12-byte header ([`Header`], [`FrameType`], the flags);
//! - `stream.rs` — one stream's receive buffer, windows and half-close state;
//! - `connection.rs` — [`Connection`], the session state machine: stream table, GoAway,
//!   Ping, what to send next;
//! - `flow.rs` — its flow-control policy: grants, window tuning, round-trip probes, the cap
//!   beside an interactive stream;
//! - `keepalive.rs` — the Ping timer, a deadline in [`Connection::poll_timeout`];
//! - `timers.rs` — the timers of the session's end (close grace, flush, the wait for a
//!   GoAway) and [`Due`], what a deadline that passed asks for;
//! - `output.rs` — the order queued frames leave in;
//! - `ids.rs` — maps keyed by stream id ([`IdMap`], also netchan-mux's for its wakers);
//! - `limits.rs` — [`Limits`], the bounds the core keeps;
//! - this file — [`Violation`], how a peer broke the protocol.

mod connection;
mod flow;
mod frame;
mod ids;
mod keepalive;
mod limits;
mod output;
mod stream;
mod timers;

pub use connection::{Connection, Frame, OpenError, Ready, Side, StreamError};
pub use frame::{FrameType, GoAwayCode, Header, ACK, FIN, HEADER_LEN, MAX_FDS_PER_FRAME, RST, SYN};
pub use ids::{IdHash, IdHasher, IdMap};
pub use limits::Limits;
pub use timers::Due;

/// A file descriptor travelling with a stream's bytes (unix only; elsewhere no value exists).
#[cfg(unix)]
pub type Fd = std::os::fd::OwnedFd;
/// A file descriptor travelling with a stream's bytes (unix only; elsewhere no value exists).
#[cfg(not(unix))]
#[derive(Debug)]
pub enum Fd {}

/// How a peer broke the yamux protocol. The session that received it ends (in netchan-mux,
/// with `CloseReason::ProtocolViolation`), after sending a GoAway with the protocol-error
/// code; other sessions are unaffected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A frame header with a version other than 0.
    #[error("frame with unknown yamux version {version}")]
    BadVersion {
        /// The version byte received.
        version: u8,
    },
    /// A frame header with a type other than Data, WindowUpdate, Ping or GoAway.
    #[error("frame with unknown type {ty}")]
    BadType {
        /// The type byte received.
        ty: u8,
    },
    /// A Data or WindowUpdate frame on stream 0, which only Ping and GoAway may use.
    #[error("{frame} frame on stream 0")]
    StreamZero {
        /// The frame type.
        frame: &'static str,
    },
    /// A Ping or GoAway frame on a stream other than 0.
    #[error("{frame} frame on stream {stream}, which must use stream 0")]
    ControlOnStream {
        /// The frame type.
        frame: &'static str,
        /// The stream id it carried.
        stream: u32,
    },
    /// A window update that would take a send window past `u32::MAX`.
    #[error("window update on stream {stream} overflows its send window")]
    WindowOverflow {
        /// The stream.
        stream: u32,
    },
    /// A data frame larger than the receive window we granted.
    #[error("stream {stream}: {len}-byte data frame exceeds the {window}-byte window we granted")]
    WindowExceeded {
        /// The stream.
        stream: u32,
        /// The frame's body length.
        len: u32,
        /// The window left when it arrived.
        window: u32,
    },
    /// The peer opened a stream with an id of our parity (client ids are odd, server ids even).
    #[error("peer opened stream {stream}, an id of our parity")]
    WrongParity {
        /// The stream id.
        stream: u32,
    },
    /// A SYN for a stream id that is already open.
    #[error("duplicate SYN for stream {stream}")]
    DuplicateSyn {
        /// The stream id.
        stream: u32,
    },
    /// A file-descriptor frame from a peer we never told we take them.
    #[error("file descriptors sent on stream {stream}, but this session does not take them")]
    UnexpectedFds {
        /// The stream.
        stream: u32,
    },
    /// A file-descriptor frame announcing none, or more than the kernel can carry at once.
    #[error("file-descriptor frame on stream {stream} announces {count} fds (1..=253 allowed)")]
    BadFdCount {
        /// The stream.
        stream: u32,
        /// The count announced.
        count: u32,
    },
    /// A file-descriptor frame announcing more fds than arrived with it.
    #[error(
        "file-descriptor frame on stream {stream} announces {announced} fds, {arrived} arrived"
    )]
    MissingFds {
        /// The stream.
        stream: u32,
        /// The count announced.
        announced: u32,
        /// The fds that had arrived.
        arrived: usize,
    },
    /// More received file descriptors than the session holds unclaimed
    /// ([`Limits::max_fds_held`], netchan-mux's `Config::max_received_fds`).
    #[error("peer sent more file descriptors than the {limit} this session holds unclaimed")]
    TooManyFds {
        /// The limit.
        limit: usize,
    },
    /// Frames that carry nothing, or pings the peer does not let us answer, in a run.
    #[error("flood of {count} {what}")]
    Flood {
        /// What kind of frames.
        what: &'static str,
        /// How many in a row.
        count: u32,
    },
}
