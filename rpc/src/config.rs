//! [`Config`]: limits and timeouts for one side of an rpc conn.

use std::time::Duration;

/// The largest `max_message_size` this crate accepts; larger values are
/// clamped. Decoding uses a fixed allocation limit derived from it (see
/// `codec`), so a lying length field can never claim more memory than that.
pub const MAX_MESSAGE_SIZE_CAP: usize = 64 << 20;

/// The smallest `max_message_size` honoured (smaller values are raised to
/// it), so an error status always fits in a message.
pub const MIN_MESSAGE_SIZE: usize = 512;

/// Settings for a [`Client`](crate::Client) or a [`Server`](crate::Server).
///
/// Build with `Config::default()` and the chained setters:
/// `Config::default().max_in_flight(64).handshake_timeout(Duration::from_secs(2))`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Largest encoded message (one frame: envelope plus payload) sent or
    /// accepted. Each side announces it when the conn starts, and sends
    /// nothing larger than the smaller of its own and the peer's: a larger
    /// message fails that call with `ResourceExhausted` naming whose limit
    /// it is over, before anything is written. A larger message that
    /// arrives anyway (sent before the peer learned this limit) is dropped
    /// unread and its call alone fails the same way; from a peer that
    /// announced no limit it ends the conn, before any buffer is allocated
    /// (see `docs/protocol.md`, Part 2). Values
    /// above [`MAX_MESSAGE_SIZE_CAP`] are clamped to it, values below
    /// [`MIN_MESSAGE_SIZE`] raised to it. Default: 16 MiB.
    pub max_message_size: usize,
    /// Server side: most calls one conn may have running at once; a request
    /// beyond it is answered `ResourceExhausted` without running a handler.
    /// Default: 1024.
    pub max_in_flight: usize,
    /// Server side: most request payload bytes the calls running on one
    /// conn may hold at once, counting the requests of running calls and
    /// the request items queued for bidirectional handlers that have not
    /// consumed them yet. A request that would take a conn past it is
    /// answered `ResourceExhausted` without running a handler (a request
    /// arriving while nothing is held is always admitted), and a request
    /// item that would ends its call with `ResourceExhausted`, so a peer
    /// cannot pin `max_in_flight × max_message_size` bytes with slow calls
    /// (or `stream_window` times that with unread request streams).
    /// Default: 64 MiB.
    pub max_in_flight_bytes: usize,
    /// How long to wait for the peer's preamble when a conn starts.
    /// Default: 10 s.
    pub handshake_timeout: Duration,
    /// Server-streaming flow control: how many items the client lets the
    /// server send ahead of consumption (the initial credit). The client
    /// grants more as it consumes; at most this many items are ever
    /// buffered per stream. Clamped to at least 1. Default: 16.
    pub stream_window: u32,
    /// Bytes of encoded frames queued for the writer before senders wait
    /// (one message is always admitted into an empty queue, whatever its
    /// size). Default: 256 KiB.
    pub write_queue_bytes: usize,
    /// Longest a peer may take to send one frame, from the first read that
    /// finds it incomplete to its last byte; a frame that trickles in
    /// slower ends the conn with [`Error::FrameTimeout`](crate::Error::FrameTimeout).
    /// An idle conn (between frames) is not timed. Default: 30 s.
    pub frame_timeout: Duration,
    /// Longest the writer waits for the peer to accept any bytes while it
    /// has frames to send; a peer that reads nothing for that long ends the
    /// conn with [`Error::WriteStalled`](crate::Error::WriteStalled), and
    /// every pending call with it. Default: 30 s.
    pub write_stall_timeout: Duration,
    /// Server side: most bytes of encoded responses that may wait for room
    /// in the write queue (beyond [`Config::write_queue_bytes`]) on one
    /// conn, counting stream items waiting too. A unary response that
    /// would take the conn past it is dropped and its call answered
    /// `ResourceExhausted` (a response arriving while nothing waits is
    /// always admitted); a stream item waits instead, since its stream's
    /// credit already allows at most one item to wait. So a peer that
    /// stops reading pins at most about this many reply bytes, until
    /// [`Config::write_stall_timeout`] ends its conn. Default: 64 MiB.
    pub max_outbound_bytes: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_message_size: 16 << 20,
            max_in_flight: 1024,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            stream_window: 16,
            write_queue_bytes: 256 << 10,
            frame_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(30),
            max_outbound_bytes: 64 << 20,
        }
    }
}

impl Config {
    /// Sets [`Config::max_message_size`] (default 16 MiB, clamped to
    /// [`MAX_MESSAGE_SIZE_CAP`]).
    pub fn max_message_size(mut self, bytes: usize) -> Config {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`Config::max_in_flight`] (default 1024).
    pub fn max_in_flight(mut self, calls: usize) -> Config {
        self.max_in_flight = calls;
        self
    }

    /// Sets [`Config::max_in_flight_bytes`] (default 64 MiB).
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Config {
        self.max_in_flight_bytes = bytes;
        self
    }

    /// Sets [`Config::handshake_timeout`] (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Config {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::stream_window`] (default 16).
    pub fn stream_window(mut self, items: u32) -> Config {
        self.stream_window = items;
        self
    }

    /// Sets [`Config::write_queue_bytes`] (default 256 KiB).
    pub fn write_queue_bytes(mut self, bytes: usize) -> Config {
        self.write_queue_bytes = bytes;
        self
    }

    /// Sets [`Config::frame_timeout`] (default 30 s).
    pub fn frame_timeout(mut self, timeout: Duration) -> Config {
        self.frame_timeout = timeout;
        self
    }

    /// Sets [`Config::write_stall_timeout`] (default 30 s).
    pub fn write_stall_timeout(mut self, timeout: Duration) -> Config {
        self.write_stall_timeout = timeout;
        self
    }

    /// Sets [`Config::max_outbound_bytes`] (default 64 MiB).
    pub fn max_outbound_bytes(mut self, bytes: usize) -> Config {
        self.max_outbound_bytes = bytes;
        self
    }

    /// `max_message_size` after clamping.
    pub(crate) fn message_limit(&self) -> usize {
        self.max_message_size
            .clamp(MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE_CAP)
    }

    /// `stream_window` after clamping.
    pub(crate) fn window(&self) -> u32 {
        self.stream_window.max(1)
    }
}
