//! The bounds the core enforces, as the session's `Config` sets them: a leaf that both the
//! state machine (`connection.rs`) and its flow policy (`flow.rs`) read.

/// The bounds a [`Connection`](super::Connection) enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Every stream's initial receive and send window (256 KiB in the spec).
    pub initial_window: u32,
    /// The largest receive window one stream may be granted.
    pub max_window: u32,
    /// Bytes by which all streams' receive windows together may exceed their initial ones.
    pub growth_budget: usize,
    /// Streams in the table at once; an inbound SYN beyond it is answered with RST.
    pub max_streams: usize,
    /// The largest data frame we send.
    pub max_frame: usize,
    /// Bytes of queued output beyond which writers wait for the link.
    pub out_limit: usize,
    /// Whether this side receives file descriptors (its link carries them): it announces so
    /// to the peer, and accepts [`FrameType::Fds`](super::frame::FrameType::Fds) frames.
    pub fds: bool,
    /// Received file descriptors held unclaimed, at most, across the session.
    pub max_fds_held: usize,
    /// While another stream is interactive, what a stream's peer may have in flight towards
    /// us (see `Flow::cap_beside_interactive` in `flow.rs`). 0: no cap.
    pub window_beside_interactive: u32,
}
