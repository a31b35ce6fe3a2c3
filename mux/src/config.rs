//! Session configuration: limits, timeouts and the yamux core's bounds derived from them.

use netchan_mux_proto::Limits;
use std::time::Duration;

/// Every yamux stream may receive this much before its peer must wait for a window update
/// (fixed by the yamux specification).
pub(crate) const STREAM_INITIAL_WINDOW: usize = 256 * 1024;

/// Upper bound on the stream table, so that `streams × 256 KiB` cannot overflow.
const MAX_STREAMS: usize = 1 << 20;

/// Largest per-stream receive window we grant (the window field is a `u32`).
const MAX_STREAM_WINDOW: usize = 1 << 30;

/// Queued output (frames not yet handed to the byte stream) beyond which writers wait.
pub(crate) const OUT_LIMIT: usize = 1024 * 1024;

/// Settings of one [`Session`](crate::Session). Build with [`Config::default`] and the chained
/// setters (`Config::default().max_channels(1024)`).
///
/// # Memory
///
/// yamux guarantees every stream a 256 KiB receive window; we grant more only out of the
/// session-wide `receive_window_growth`. So what a peer can make a session buffer (data that
/// arrived but was not yet read) is bounded by
///
/// `streams × 256 KiB + receive_window_growth`, with
/// `streams = max_channels + 2 × max_pending_handshakes + 8`
///
/// (the stream table's size: open channels, handshakes being answered, and slack for streams
/// being refused). With the defaults that is `(64 + 64 + 8) × 256 KiB + 16 MiB` = **50 MiB**
/// per session in the worst case (every window filled and never read, which only a hostile
/// peer does). On top of that the link itself holds at most one inbound frame being read
/// (≤ `max_stream_window` + 64 KiB), one spare read buffer (≤ 256 KiB, only while bytes keep
/// arriving) and at most 1 MiB of queued output plus one frame
/// (`split_send_size`), or plus 64 KiB kept for channels that have nothing queued. A channel
/// whose reader keeps up holds far less: windows are granted back as data is consumed, so
/// memory is only used by bytes in flight. A hub serving thousands of peers should lower `max_channels` and
/// `receive_window_growth` to what each peer needs.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Config {
    /// Maximum number of open channels on this session, counting both directions and dials
    /// still waiting for their answer. Beyond it, [`Session::dial`](crate::Session::dial) fails
    /// with [`Error::TooManyChannels`](crate::Error::TooManyChannels) and inbound channels are
    /// refused one by one (the session survives). Values above 2^20 are treated as 2^20.
    /// Default: 64.
    pub max_channels: usize,
    /// Maximum number of channel-open handshakes in flight per direction. Dials beyond it wait
    /// for a slot (within `handshake_timeout`); a peer opening more streams than this before we
    /// answered gets the excess reset. Clamped to 1..=256 (Go's yamux accepts at most 256
    /// unacknowledged streams). Default: 32.
    pub max_pending_handshakes: usize,
    /// How long a dial waits for the peer's answer, and how long an inbound channel may take to
    /// send its handshake before it is dropped. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Accepted channels a [`Listener`](crate::Listener) queues before `accept` takes them.
    /// When it is full, a new inbound channel waits up to half of `handshake_timeout` for room,
    /// then is refused as busy. Values above `max_channels` act as `max_channels` (no more
    /// channels can be open). Default: 32.
    pub accept_backlog: usize,
    /// After this long without receiving anything, the session sends a ping the peer answers.
    /// `None` disables keepalive. Default: 15 s.
    pub keepalive_interval: Option<Duration>,
    /// How long after the ping is due the session waits for any inbound byte before it closes
    /// with [`CloseReason::KeepaliveTimeout`](crate::CloseReason::KeepaliveTimeout). A dead peer
    /// is thus detected within `keepalive_interval + keepalive_timeout`. Default: 10 s.
    pub keepalive_timeout: Duration,
    /// How long [`Session::close`](crate::Session::close) lets open channels finish before it
    /// ends the session anyway. Default: 5 s.
    pub close_grace: Duration,
    /// Bytes by which the receive windows of all channels together may grow beyond their
    /// initial 256 KiB. A channel's window doubles while its sender is held back by it and
    /// its reader keeps up, towards the link's bandwidth-delay product, up to
    /// `max_stream_window`, out of this budget; the growth returns to the budget when the
    /// channel closes, and half of it when the reader takes over 16 round trips (and at
    /// least 1 s) to consume a whole window, so a channel that no longer needs it gives it up. Part of the session's receive budget, see [Memory](#memory).
    /// Default: 16 MiB.
    pub receive_window_growth: usize,
    /// The largest receive window one channel may be granted. A single channel's throughput
    /// is at most `window / round-trip time` (16 MiB over 100 ms is 168 MB/s).
    /// Clamped to 256 KiB..=1 GiB. Default: 16 MiB.
    pub max_stream_window: usize,
    /// Largest yamux data frame this side sends; bigger writes are split (and no frame is
    /// larger than the peer's window allows). Larger frames mean fewer frames, reads and
    /// wake-ups per byte, smaller ones interleave channels more finely. Clamped to
    /// 1 KiB..=1 MiB. Default: 512 KiB; a stream's frames reach it only once its window has
    /// grown past the initial 256 KiB.
    pub split_send_size: usize,
    /// On a session that passes file descriptors ([`Session::with_fds`](crate::Session::with_fds)):
    /// how many received descriptors it holds at most that no channel reader has taken yet.
    /// A peer that sends more ends the session with
    /// [`Violation::TooManyFds`](crate::Violation::TooManyFds). Each one is an open file in
    /// this process, so keep it well under `RLIMIT_NOFILE`. Default: 1024.
    pub max_received_fds: usize,
    /// While another channel of this session is interactive (it receives data frames of at
    /// most 16 KiB, and has not run bulk in the last 100 ms: its window has not grown and its
    /// peer has not used more than half of it), each other channel's peer may have at most
    /// this many bytes in flight towards us, or what carries 500 MB/s at the measured round
    /// trip if that is more (across a WAN that is more than any window, and nothing
    /// changes). The interactive channel's small frames then wait behind that much of a bulk
    /// transfer on the shared link, not behind a whole window: on loopback a 64-byte round
    /// trip beside a bulk channel takes about 2× its idle time instead of 5×, and the bulk
    /// channel runs at 0.7–1.3 GB/s instead of 4–5 GB/s while it lasts (docs/performance.md,
    /// "Where the time goes"). A bulk channel gets its whole window back within about a
    /// millisecond (or four round trips) of the last small message. Clamped to at most
    /// 256 KiB; 0 turns the cap off. Default: 16 KiB.
    pub window_beside_interactive: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_channels: 64,
            max_pending_handshakes: 32,
            handshake_timeout: Duration::from_secs(10),
            accept_backlog: 32,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_timeout: Duration::from_secs(10),
            close_grace: Duration::from_secs(5),
            receive_window_growth: 16 * 1024 * 1024,
            max_stream_window: 16 * 1024 * 1024,
            split_send_size: 512 * 1024,
            max_received_fds: 1024,
            window_beside_interactive: 16 * 1024,
        }
    }
}

impl Config {
    /// Sets [`Config::max_channels`] (default: 64).
    pub fn max_channels(mut self, n: usize) -> Self {
        self.max_channels = n;
        self
    }

    /// Sets [`Config::max_pending_handshakes`] (default: 32).
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending_handshakes = n;
        self
    }

    /// Sets [`Config::handshake_timeout`] (default: 10 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Sets [`Config::accept_backlog`] (default: 32).
    pub fn accept_backlog(mut self, n: usize) -> Self {
        self.accept_backlog = n;
        self
    }

    /// Sets [`Config::keepalive_interval`]; `None` disables keepalive (default: 15 s).
    pub fn keepalive_interval(mut self, d: Option<Duration>) -> Self {
        self.keepalive_interval = d;
        self
    }

    /// Sets [`Config::keepalive_timeout`] (default: 10 s).
    pub fn keepalive_timeout(mut self, d: Duration) -> Self {
        self.keepalive_timeout = d;
        self
    }

    /// Sets [`Config::close_grace`] (default: 5 s).
    pub fn close_grace(mut self, d: Duration) -> Self {
        self.close_grace = d;
        self
    }

    /// Sets [`Config::receive_window_growth`] (default: 16 MiB).
    pub fn receive_window_growth(mut self, bytes: usize) -> Self {
        self.receive_window_growth = bytes;
        self
    }

    /// Sets [`Config::max_stream_window`] (default: 16 MiB).
    pub fn max_stream_window(mut self, bytes: usize) -> Self {
        self.max_stream_window = bytes;
        self
    }

    /// Sets [`Config::split_send_size`] (default: 512 KiB).
    pub fn split_send_size(mut self, bytes: usize) -> Self {
        self.split_send_size = bytes;
        self
    }

    /// `max_channels`, clamped so the stream table stays representable.
    pub(crate) fn channel_limit(&self) -> usize {
        self.max_channels.min(MAX_STREAMS / 2)
    }

    /// `max_pending_handshakes`, clamped to 1..=256.
    pub(crate) fn pending_limit(&self) -> usize {
        self.max_pending_handshakes.clamp(1, 256)
    }

    /// `accept_backlog`, at least 1 (a tokio channel needs capacity) and at most the channel
    /// limit: every queued channel holds a channel slot, so no more can ever wait, and tokio
    /// panics on capacities near `usize::MAX`.
    pub(crate) fn backlog(&self) -> usize {
        self.accept_backlog.min(self.channel_limit()).max(1)
    }

    /// Sets [`Config::max_received_fds`] (default: 1024).
    pub fn max_received_fds(mut self, n: usize) -> Self {
        self.max_received_fds = n;
        self
    }

    /// Sets [`Config::window_beside_interactive`] (default: 16 KiB; 0 turns the cap off).
    pub fn window_beside_interactive(mut self, bytes: usize) -> Self {
        self.window_beside_interactive = bytes;
        self
    }

    /// The stream table's size. It sits above our own channel limit with room for streams we
    /// are still refusing: up to `pending` inbound handshakes being answered, as many again
    /// whose refusal is being sent, and a few more. An inbound stream beyond it is reset
    /// (that stream only).
    pub(crate) fn max_streams(&self) -> usize {
        (self.channel_limit() + 2 * self.pending_limit() + 8).min(MAX_STREAMS)
    }

    /// The per-stream window cap, clamped.
    fn stream_window_cap(&self) -> usize {
        self.max_stream_window
            .clamp(STREAM_INITIAL_WINDOW, MAX_STREAM_WINDOW)
    }

    /// The worst-case bytes a peer can make this session buffer in its channels (see
    /// [Memory](#memory)).
    pub fn worst_case_buffered(&self) -> usize {
        self.max_streams()
            .saturating_mul(STREAM_INITIAL_WINDOW)
            .saturating_add(self.receive_window_growth)
    }

    /// The bounds the yamux core enforces for this config. Never panics.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            initial_window: STREAM_INITIAL_WINDOW as u32,
            max_window: self.stream_window_cap() as u32,
            growth_budget: self.receive_window_growth,
            max_streams: self.max_streams(),
            max_frame: self.split_send_size.clamp(1024, 1024 * 1024),
            out_limit: OUT_LIMIT,
            fds: false,
            max_fds_held: self.max_received_fds,
            window_beside_interactive: self.window_beside_interactive.min(STREAM_INITIAL_WINDOW)
                as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_never_panic_for_extreme_values() {
        for channels in [0, 1, 64, 1000, usize::MAX] {
            for pending in [0, 1, 256, usize::MAX] {
                for growth in [0, 8 << 20, usize::MAX] {
                    let cfg = Config::default()
                        .max_channels(channels)
                        .max_pending_handshakes(pending)
                        .receive_window_growth(growth)
                        .split_send_size(usize::MAX);
                    let limits = cfg.limits();
                    assert!(limits.max_streams > cfg.channel_limit());
                    assert!(limits.max_window >= limits.initial_window);
                    let _ = cfg.worst_case_buffered();
                }
            }
        }
    }

    #[test]
    fn default_worst_case_budget_matches_the_docs() {
        let cfg = Config::default();
        assert_eq!(cfg.worst_case_buffered(), 50 * 1024 * 1024);
    }
}
