//! Session configuration: limits, timeouts and the yamux settings derived from them.

use std::time::Duration;

/// Every yamux stream may receive this much before its peer must wait for a window update
/// (fixed by the yamux specification; yamux 0.14 cannot lower it).
pub(crate) const STREAM_INITIAL_WINDOW: usize = 256 * 1024;

/// Upper bound on yamux's `max_num_streams`, so that `streams × 256 KiB` cannot overflow and
/// yamux's own configuration assertions can never fire, whatever [`Config`] says.
const MAX_YAMUX_STREAMS: usize = 1 << 20;

/// The largest yamux frame body we send: yamux rejects inbound frames over 1 MiB, and no frame
/// can exceed the initial 256 KiB stream window anyway.
const MAX_SPLIT_SEND_SIZE: usize = STREAM_INITIAL_WINDOW;

/// Settings of one [`Session`](crate::Session). Build with [`Config::default`] and the chained
/// setters (`Config::default().max_channels(1024)`).
///
/// # Memory
///
/// yamux guarantees every stream a 256 KiB receive window, so what a peer can make a session
/// buffer (data that arrived but was not yet read) is bounded by
///
/// `(max_channels + 2 × max_pending_handshakes + 8) × 256 KiB + receive_window_growth`
///
/// With the defaults that is `(64 + 64 + 8) × 256 KiB + 8 MiB` = **42 MiB** per session in the
/// worst case (every window filled and never read, which only a hostile peer does). A channel
/// whose reader keeps up holds far less: memory is only used by bytes that are in flight.
/// A hub serving thousands of peers should lower `max_channels` to what each peer needs.
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
    /// answered gets the excess reset. Clamped to 1..=256 (yamux's own limit of unacknowledged
    /// streams). Default: 32.
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
    /// initial 256 KiB (yamux auto-tunes a busy channel's window towards the bandwidth-delay
    /// product). Part of the session's receive budget, see [Memory](#memory). Default: 8 MiB.
    pub receive_window_growth: usize,
    /// Largest yamux data frame this side sends; bigger writes are split. Larger frames mean
    /// fewer frames (and wake-ups) per byte, smaller ones interleave channels more finely.
    /// The default keeps two frames per 256 KiB stream window (so the sender can refill one
    /// while the other is read) and keeps yamux's per-frame buffers just under glibc's 128 KiB
    /// `mmap` threshold (larger ones cost page faults on every frame); see docs/performance.md.
    /// Clamped to 1 KiB..=256 KiB. Default: 120 KiB.
    pub split_send_size: usize,
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
            receive_window_growth: 8 * 1024 * 1024,
            split_send_size: 120 * 1024,
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

    /// Sets [`Config::receive_window_growth`] (default: 8 MiB).
    pub fn receive_window_growth(mut self, bytes: usize) -> Self {
        self.receive_window_growth = bytes;
        self
    }

    /// Sets [`Config::split_send_size`] (default: 120 KiB).
    pub fn split_send_size(mut self, bytes: usize) -> Self {
        self.split_send_size = bytes;
        self
    }

    /// `max_channels`, clamped so the derived yamux settings stay representable.
    pub(crate) fn channel_limit(&self) -> usize {
        self.max_channels.min(MAX_YAMUX_STREAMS / 2)
    }

    /// `max_pending_handshakes`, clamped to yamux's acknowledgement backlog.
    pub(crate) fn pending_limit(&self) -> usize {
        self.max_pending_handshakes.clamp(1, 256)
    }

    /// `accept_backlog`, at least 1 (a tokio channel needs capacity) and at most the channel
    /// limit: every queued channel holds a channel slot, so no more can ever wait, and tokio
    /// panics on capacities near `usize::MAX`.
    pub(crate) fn backlog(&self) -> usize {
        self.accept_backlog.min(self.channel_limit()).max(1)
    }

    /// yamux's hard stream limit (exceeding it kills the connection). It sits above our own
    /// channel limit with room for streams we are still refusing: up to `pending` inbound
    /// handshakes being answered, as many again already answered but not yet released by
    /// yamux, and a few internal streams (keepalive).
    pub(crate) fn yamux_max_streams(&self) -> usize {
        (self.channel_limit() + 2 * self.pending_limit() + 8).min(MAX_YAMUX_STREAMS)
    }

    /// The yamux configuration this config implies. Never panics: the receive window is set
    /// from the stream limit, so yamux's `window >= 256 KiB × streams` assertion always holds.
    pub(crate) fn to_yamux(&self) -> yamux::Config {
        let streams = self.yamux_max_streams();
        let window = streams
            .saturating_mul(STREAM_INITIAL_WINDOW)
            .saturating_add(self.receive_window_growth);
        let mut cfg = yamux::Config::default();
        // Order matters: lift the window limit first so that neither setter's assertion can
        // see a window smaller than `streams × 256 KiB`.
        cfg.set_max_connection_receive_window(None);
        cfg.set_max_num_streams(streams);
        cfg.set_max_connection_receive_window(Some(window));
        cfg.set_split_send_size(self.split_send_size.clamp(1024, MAX_SPLIT_SEND_SIZE));
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yamux_config_never_panics_for_extreme_values() {
        for channels in [0, 1, 64, 1000, usize::MAX] {
            for pending in [0, 1, 256, usize::MAX] {
                for growth in [0, 8 << 20, usize::MAX] {
                    let cfg = Config::default()
                        .max_channels(channels)
                        .max_pending_handshakes(pending)
                        .receive_window_growth(growth)
                        .split_send_size(usize::MAX);
                    let _ = cfg.to_yamux();
                    assert!(cfg.yamux_max_streams() > cfg.channel_limit());
                }
            }
        }
    }

    #[test]
    fn default_worst_case_budget_matches_the_docs() {
        let cfg = Config::default();
        let worst = cfg.yamux_max_streams() * STREAM_INITIAL_WINDOW + cfg.receive_window_growth;
        assert_eq!(worst, 42 * 1024 * 1024);
    }
}
