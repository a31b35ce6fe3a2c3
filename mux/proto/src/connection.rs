//! [`Connection`]: the state machine of one yamux session, without I/O.

use super::{
    flow::{self, Flow},
    frame::{FrameType, GoAwayCode, Header, ACK, FD_ANNOUNCE, FIN, MAX_FDS_PER_FRAME, RST, SYN},
    ids::IdMap,
    keepalive::Keepalive,
    limits::Limits,
    output::{Output, LANE_COST},
    stream::Stream,
    timers::{Due, EndTimers},
    Fd, Violation,
};
use bytes::{Bytes, BytesMut};
use std::{
    collections::VecDeque,
    task::Poll,
    time::{Duration, Instant},
};

/// Consecutive frames that carry nothing (no data, no credit, no flags) before the peer is
/// considered to flood us. A correct peer never sends even two in a row.
const EMPTY_FRAME_LIMIT: u32 = 1024;

/// Ping answers we may have queued but not yet sent before the peer is considered to flood
/// us: a peer that pings without reading our answers would otherwise grow our output.
const PING_ANSWER_LIMIT: u32 = 64;

/// Room in the output queue beyond `out_limit` for the writes of streams that have nothing
/// queued. Without it a writer that keeps the queue full (a bulk transfer on a busy link) takes
/// every bit of room the link frees, and a small write on another stream waits behind it for
/// as long as it keeps writing: one 64-byte write beside a bulk channel waited for ever. With
/// it such a write is queued at once and leaves at its stream's next turn (see `output.rs`).
/// Streams that already have frames queued wait for the queue to drain below `out_limit`.
pub(crate) const OUT_RESERVE: usize = 64 * 1024;

/// Which end of the session we are; decides the parity of the stream ids we allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Allocates odd ids.
    Client,
    /// Allocates even ids.
    Server,
}

/// A frame ready to be written: header and body, sent together, and for an
/// [`FrameType::Fds`] frame the file descriptors that go with its first byte.
#[derive(Debug)]
pub struct Frame {
    /// The encoded header.
    pub header: [u8; super::HEADER_LEN],
    /// The body: a data frame's bytes, empty for every other type.
    pub body: Bytes,
    /// For an [`FrameType::Fds`] frame, the descriptors that go with its first byte; empty
    /// for every other type.
    pub fds: Vec<Fd>,
}

impl Frame {
    /// Bytes on the wire: header and body.
    // A frame always has its 12-byte header: an `is_empty` would always say no.
    #[allow(clippy::len_without_is_empty)]
    #[inline]
    pub fn len(&self) -> usize {
        self.header.len() + self.body.len()
    }

    /// What the frame holds in memory while queued: the frame itself (header and the body's
    /// handle) plus the body. A control frame is 12 bytes on the wire but about four times
    /// that in the queue, so the output limit counts this, not the wire size: a peer that
    /// makes us queue RSTs or window updates by the thousand is bounded by what they really
    /// hold.
    pub(crate) fn cost(&self) -> usize {
        std::mem::size_of::<Frame>() + self.body.len() + std::mem::size_of_val(&self.fds[..])
    }
}

/// Why a stream operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// The peer does not take file descriptors (it never announced it does).
    FdsUnsupported,
    /// More file descriptors than one frame carries.
    TooManyFds,
    /// The peer reset the stream.
    Reset,
    /// We already half-closed the stream (write after shutdown).
    WriteClosed,
    /// The session has ended.
    SessionEnded,
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The peer sent GoAway: it accepts no new streams.
    GoAway,
    /// We sent GoAway (closing).
    Closing,
    /// The stream table is full.
    TooMany,
    /// All stream ids of our parity are used up.
    IdsExhausted,
    /// The session has ended.
    Ended,
}

/// A stream operation that returned [`Poll::Pending`] may make progress now: the caller of
/// that operation is to be woken (see [`Connection::drain_ready`]). Each pending operation is
/// reported at most once, at the first change that may concern it: data, file descriptors,
/// the end of the stream or its reset for a reader; send window, room in the output queue or
/// a reset for a writer; the end of the session for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// The reader of this stream.
    Read(u32),
    /// The writer of this stream.
    Write(u32),
}

/// The yamux state of one session. See the crate docs for who calls what.
#[derive(Debug)]
pub struct Connection {
    side: Side,
    limits: Limits,
    next_id: u32,
    streams: IdMap<Stream>,
    /// Frames to send: session frames and credit first, then streams in turn (see
    /// `output.rs`); `out.bytes()` is the memory they hold ([`Frame::cost`]).
    out: Output,
    /// Streams whose writer waits for room in `out` (see [`Connection::out_room`]), each at
    /// most once.
    out_waiters: Vec<u32>,
    /// Pending operations that may make progress now, for the caller to wake
    /// ([`Connection::drain_ready`]). Bounded: an entry is added only for an operation
    /// waiting, and a waiting operation is reported once (a stream's reader, its writer
    /// waiting for window, its writer waiting for room: at most three per stream).
    ready: Vec<Ready>,
    /// Receive-window growth handed out, across all streams.
    growth_used: usize,
    /// Inbound streams the I/O layer has not yet picked up.
    accepted: VecDeque<u32>,
    goaway_sent: bool,
    goaway_received: Option<u32>,
    empty_frames: u32,
    ping_answers_queued: u32,
    /// The flow-control policy: round-trip measurement, window tuning, the cap beside an
    /// interactive stream.
    flow: Flow,
    /// The keepalive timer, once started.
    keepalive: Option<Keepalive>,
    /// The timers of the session's end.
    end: EndTimers,
    /// The peer announced that it takes file descriptors.
    peer_fds: bool,
    ended: bool,
    /// A tail buffer of tiny frames some stream read to its end, for the next stream that
    /// needs one (see `RecvBuffer::read`): one per session, so small messages cost no
    /// allocation while no idle stream holds one.
    spare_tail: Option<BytesMut>,
}

impl Connection {
    /// The core of a new session on `side`, keeping `limits`. If the limits say the link
    /// carries file descriptors, the first frame queued tells the peer so.
    pub fn new(side: Side, limits: Limits) -> Connection {
        let mut c = Connection {
            next_id: match side {
                Side::Client => 1,
                Side::Server => 2,
            },
            side,
            flow: Flow::new(&limits),
            keepalive: None,
            end: EndTimers::default(),
            limits,
            streams: IdMap::default(),
            out: Output::default(),
            out_waiters: Vec::new(),
            ready: Vec::new(),
            growth_used: 0,
            accepted: VecDeque::new(),
            goaway_sent: false,
            goaway_received: None,
            empty_frames: 0,
            ping_answers_queued: 0,
            peer_fds: false,
            ended: false,
            spare_tail: None,
        };
        if c.limits.fds {
            // First thing on the wire, so the peer knows before any stream exists.
            c.ping(FD_ANNOUNCE);
        }
        c
    }

    /// Whether this session's link carries file descriptors.
    #[inline]
    pub fn carries_fds(&self) -> bool {
        self.limits.fds
    }

    /// Whether the peer takes file descriptors (it announced so).
    #[inline]
    pub fn peer_takes_fds(&self) -> bool {
        self.peer_fds
    }

    /// Open streams (in the table: not yet dropped by their handle, or reset).
    #[cfg(test)]
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The peer's GoAway code, once it sent one.
    #[inline]
    pub fn goaway_received(&self) -> Option<u32> {
        self.goaway_received
    }

    /// Total bytes of receive window granted beyond the streams' initial windows.
    #[cfg(test)]
    pub(crate) fn growth_used(&self) -> usize {
        self.growth_used
    }

    /// Bytes received on all streams and not yet read.
    pub fn buffered(&self) -> usize {
        self.streams.values().map(|s| s.recv.len()).sum()
    }

    /// Queued output, in bytes of memory held: each frame's body plus what the frame itself
    /// holds in the queue, so queued control frames count too.
    #[inline]
    pub fn out_bytes(&self) -> usize {
        self.out.bytes()
    }

    fn queue(&mut self, header: Header, body: Bytes) {
        self.queue_frame(Frame {
            header: header.encode(),
            body,
            fds: Vec::new(),
        });
    }

    fn queue_frame(&mut self, frame: Frame) {
        self.out.push(frame);
    }

    /// Queues a control frame for `id`, carrying SYN if the peer has not seen the stream yet.
    fn queue_update(&mut self, id: u32, flags: u16, delta: u32) {
        let syn = match self.streams.get_mut(&id) {
            Some(s) if s.syn_pending => {
                s.syn_pending = false;
                SYN
            }
            _ => 0,
        };
        self.queue(
            Header::new(FrameType::WindowUpdate, flags | syn, id, delta),
            Bytes::new(),
        );
    }

    /// Moves queued frames, up to about `max_bytes` (at least one frame), to the I/O layer's
    /// write queue: session frames and window credit first, then one frame per stream per
    /// turn, so a stream with much queued cannot hold back another's small frame.
    pub fn take_output(&mut self, max_bytes: usize, into: &mut VecDeque<Frame>) {
        let mut taken = 0;
        while taken < max_bytes {
            let Some(frame) = self.out.pop() else {
                break;
            };
            if frame.header[1] == FrameType::Ping as u8 && frame.header[3] & ACK as u8 != 0 {
                self.ping_answers_queued = self.ping_answers_queued.saturating_sub(1);
            }
            taken += frame.len();
            into.push_back(frame);
        }
        // Report the writers that may queue now.
        let queued = self.out.bytes();
        let limit = self.limits.out_limit;
        if queued < limit + OUT_RESERVE {
            let out = &self.out;
            let ready = &mut self.ready;
            self.out_waiters.retain(|&id| {
                let go = queued < limit || !out.has_lane(id);
                if go {
                    ready.push(Ready::Write(id));
                }
                !go
            });
        }
    }

    /// How many bytes stream `id` may queue now, or `None` if it must wait for the output
    /// queue to drain: any stream may while the queue holds less than `out_limit`; beyond it,
    /// only a stream with nothing queued, and only within [`OUT_RESERVE`]. So the queue holds
    /// at most `out_limit` plus one frame, or `out_limit` plus the reserve.
    fn out_room(&self, id: u32) -> Option<usize> {
        let queued = self.out.bytes();
        if queued < self.limits.out_limit {
            return Some(usize::MAX);
        }
        if self.out.has_lane(id) {
            return None;
        }
        // What a frame and a new lane hold besides the body count too (see `Frame::cost`).
        let room = (self.limits.out_limit + OUT_RESERVE)
            .saturating_sub(queued + std::mem::size_of::<Frame>() + LANE_COST);
        (room > 0).then_some(room)
    }

    /// Notes that the writer of stream `id` waits for room in the output queue.
    fn wait_for_room(&mut self, id: u32) {
        if !self.out_waiters.contains(&id) {
            self.out_waiters.push(id);
        }
    }

    /// Whether pending operations may make progress now ([`Connection::drain_ready`]).
    #[inline]
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The pending operations that may make progress now, in the order their changes
    /// happened, each reported once: the caller wakes whoever waits for them. The core
    /// keeps no wakers; any call may add to this, so the caller drains it after every call
    /// (`netchan-mux` does when it lets go of the core's lock).
    #[inline]
    pub fn drain_ready(&mut self) -> std::vec::Drain<'_, Ready> {
        self.ready.drain(..)
    }

    /// Opens an outbound stream. The peer learns of it with the first frame sent on it.
    pub fn open(&mut self) -> Result<u32, OpenError> {
        if self.ended {
            return Err(OpenError::Ended);
        }
        if self.goaway_received.is_some() {
            return Err(OpenError::GoAway);
        }
        if self.goaway_sent {
            return Err(OpenError::Closing);
        }
        if self.streams.len() >= self.limits.max_streams {
            return Err(OpenError::TooMany);
        }
        let id = self.next_id;
        self.next_id = id.checked_add(2).ok_or(OpenError::IdsExhausted)?;
        self.streams
            .insert(id, Stream::new(self.limits.initial_window, true));
        Ok(id)
    }

    /// The next inbound stream the peer opened, if any.
    pub fn next_accepted(&mut self) -> Option<u32> {
        self.accepted.pop_front()
    }

    /// Checks a decoded header before its body is read; returns the body length to read.
    /// Only Data frames have a body, and it must fit the window we granted (or, for a stream
    /// we do not know, the largest window we ever grant), so a hostile length cannot make the
    /// I/O layer buffer more than that.
    pub fn on_header(&self, h: &Header) -> Result<usize, Violation> {
        match h.ty {
            FrameType::Data => {
                if h.stream == 0 {
                    return Err(Violation::StreamZero { frame: "data" });
                }
                let window = match self.streams.get(&h.stream) {
                    Some(s) if !s.reset => s.recv_window,
                    _ if h.has(SYN) => self.limits.initial_window,
                    _ => self.limits.max_window,
                };
                if h.length > window {
                    return Err(Violation::WindowExceeded {
                        stream: h.stream,
                        len: h.length,
                        window,
                    });
                }
                Ok(h.length as usize)
            }
            FrameType::Fds => {
                if !self.limits.fds {
                    return Err(Violation::UnexpectedFds { stream: h.stream });
                }
                if h.stream == 0 {
                    return Err(Violation::StreamZero { frame: "fds" });
                }
                if h.length == 0 || h.length as usize > MAX_FDS_PER_FRAME {
                    return Err(Violation::BadFdCount {
                        stream: h.stream,
                        count: h.length,
                    });
                }
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    /// The file descriptors announced by an [`FrameType::Fds`] frame on stream `id` (checked
    /// by [`on_header`](Self::on_header)), taken by the I/O layer from what arrived with it.
    /// `unframed` is how many more the I/O layer holds, received but not yet framed: with
    /// them, the session may hold at most `max_fds_held`. Fds for a stream that is gone, reset
    /// or finished are closed.
    pub fn on_fds(&mut self, id: u32, fds: Vec<Fd>, unframed: usize) -> Result<(), Violation> {
        self.empty_frames = 0;
        let held: usize = self.streams.values().map(|s| s.fds.held()).sum();
        if held + unframed + fds.len() > self.limits.max_fds_held {
            return Err(Violation::TooManyFds {
                limit: self.limits.max_fds_held,
            });
        }
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.reset && !s.remote_fin {
                s.fds.on_fds(fds);
                s.wake_reader(id, &mut self.ready);
            }
        }
        Ok(())
    }

    /// The latest round-trip time measured, if any.
    #[cfg(test)]
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.flow.rtt()
    }

    /// Handles one frame (for Data, with its body) that arrived at `now`.
    pub fn on_frame(&mut self, h: Header, body: BytesMut, now: Instant) -> Result<(), Violation> {
        let empty = match h.ty {
            FrameType::Data => h.length == 0 && h.flags == 0,
            FrameType::WindowUpdate => h.length == 0 && h.flags == 0,
            _ => false,
        };
        if empty {
            self.empty_frames += 1;
            if self.empty_frames > EMPTY_FRAME_LIMIT {
                return Err(Violation::Flood {
                    what: "empty frames",
                    count: self.empty_frames,
                });
            }
        } else {
            self.empty_frames = 0;
        }
        match h.ty {
            FrameType::Ping => self.on_ping(h, now),
            FrameType::GoAway => {
                if h.stream != 0 {
                    return Err(Violation::ControlOnStream {
                        frame: "go-away",
                        stream: h.stream,
                    });
                }
                self.goaway_received.get_or_insert(h.length);
                Ok(())
            }
            FrameType::Data => {
                self.on_stream_frame(h, Some(body))?;
                self.note_arrival(h, now, true);
                Ok(())
            }
            FrameType::WindowUpdate => self.on_stream_frame(h, Some(body)),
            // Handled by `on_fds`, which gets the descriptors too; no peer can get here with
            // one unless the I/O layer passes it, and it carries nothing else.
            FrameType::Fds => Ok(()),
        }
    }

    fn on_ping(&mut self, h: Header, now: Instant) -> Result<(), Violation> {
        if h.stream != 0 {
            return Err(Violation::ControlOnStream {
                frame: "ping",
                stream: h.stream,
            });
        }
        if h.has(SYN) {
            if h.length == FD_ANNOUNCE {
                self.peer_fds = true;
            }
            self.ping_answers_queued += 1;
            if self.ping_answers_queued > PING_ANSWER_LIMIT {
                return Err(Violation::Flood {
                    what: "pings not let answered",
                    count: self.ping_answers_queued,
                });
            }
            self.queue(Header::new(FrameType::Ping, ACK, 0, h.length), Bytes::new());
        } else if h.has(ACK) {
            self.flow.on_pong(h.length, now);
        }
        Ok(())
    }

    /// Sets the round-trip sample (tests of window tuning).
    #[cfg(test)]
    pub(crate) fn set_rtt(&mut self, rtt: Duration, now: Instant) {
        self.flow.set_rtt(rtt, now);
    }

    /// Answers a round-trip probe of ours (tests).
    #[cfg(test)]
    pub(crate) fn probe_answered(&mut self, sent: Instant, now: Instant) {
        self.flow.probe_answered(sent, now);
    }

    /// Queues a round-trip probe if the policy wants one now.
    fn maybe_probe(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if let Some(opaque) = self.flow.probe_due(now) {
            self.ping(opaque);
        }
    }

    fn peer_parity(&self, id: u32) -> bool {
        match self.side {
            Side::Client => id % 2 == 0,
            Side::Server => id % 2 == 1,
        }
    }

    /// A piece of a data frame that the I/O layer read straight from the link into the reader's
    /// own buffer (see [`Connection::read_through_wanted`]): it counts as received and read at
    /// once, with the same checks and flags as any data frame, and nothing is buffered.
    ///
    /// The reader is the caller, about to return what it read: it no longer waits, so neither
    /// this piece nor a frame parsed after it under the same lock reports it ready. (Woken
    /// while it runs, its task would be rescheduled behind the others, and on a multi-thread
    /// runtime another worker would be unparked to steal it.)
    pub fn on_read_through(&mut self, h: Header, now: Instant) -> Result<(), Violation> {
        let (id, n) = (h.stream, h.length as usize);
        if let Some(s) = self.streams.get_mut(&id) {
            s.read_waiting = false;
        }
        self.on_stream_frame(h, None)?;
        self.note_arrival(h, now, false);
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.reset {
                s.fds.consumed(n);
                self.consumed(id, n, || now);
            }
        }
        Ok(())
    }

    /// Whether another stream than `id` is interactive at `now` (it received small data
    /// frames lately, so `id`'s window is capped beside it, see `Limits::window_beside_interactive`).
    pub fn beside_interactive(&self, id: u32, now: Instant) -> bool {
        self.flow.cap_beside_interactive(id, now).is_some()
    }

    /// Whether stream `id` has a reader who would take the rest of a data frame's body
    /// straight from the link: it is open for reading and its reader is either waiting or
    /// about to run for the data already buffered. Reports that reader ready if it waits.
    #[inline]
    pub fn read_through_wanted(&mut self, id: u32) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if s.reset || s.remote_fin || (!s.read_waiting && s.recv.len() == 0) {
            return false;
        }
        s.wake_reader(id, &mut self.ready);
        true
    }

    /// Whether a read on stream `id` would wait (open for reading, nothing buffered, not at a
    /// batch of fds); if so, its reader waits, as after a pending read ([`Ready::Read`]).
    #[inline]
    pub fn wait_readable(&mut self, id: u32) -> bool {
        let ended = self.ended;
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if ended || s.reset || s.remote_fin || s.recv.len() > 0 || s.fds.limit(1) == 0 {
            return false;
        }
        s.read_waiting = true;
        true
    }

    /// `body`: `None` for a piece the reader already has (see [`Connection::on_read_through`]).
    fn on_stream_frame(&mut self, h: Header, body: Option<BytesMut>) -> Result<(), Violation> {
        let id = h.stream;
        if id == 0 {
            return Err(Violation::StreamZero {
                frame: "window-update",
            });
        }
        if h.has(SYN) {
            if !self.peer_parity(id) {
                return Err(Violation::WrongParity { stream: id });
            }
            // Only a stream still open is a duplicate: ids need not arrive in order (a peer
            // may open 1 then 3 and send on 3 first, its SYN riding on the first frame).
            if self.streams.contains_key(&id) {
                return Err(Violation::DuplicateSyn { stream: id });
            }
            if self.goaway_sent || self.ended || self.streams.len() >= self.limits.max_streams {
                // Refused: that stream only. Its data is dropped with the body.
                if !h.has(RST) {
                    self.queue(
                        Header::new(FrameType::WindowUpdate, RST, id, 0),
                        Bytes::new(),
                    );
                }
                return Ok(());
            }
            self.streams
                .insert(id, Stream::new(self.limits.initial_window, false));
            self.accepted.push_back(id);
            self.queue(
                Header::new(FrameType::WindowUpdate, ACK, id, 0),
                Bytes::new(),
            );
        }
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream we dropped or never had: whoever still sends data on it must stop,
            // rather than stall once its window is used up.
            if h.ty == FrameType::Data && h.length > 0 && !h.has(RST) {
                self.queue(
                    Header::new(FrameType::WindowUpdate, RST, id, 0),
                    Bytes::new(),
                );
            }
            return Ok(());
        };
        if s.reset {
            return Ok(());
        }
        match h.ty {
            FrameType::WindowUpdate => {
                s.send_window = s
                    .send_window
                    .checked_add(h.length)
                    .ok_or(Violation::WindowOverflow { stream: id })?;
                if h.length > 0 {
                    s.wake_writer(id, &mut self.ready);
                }
            }
            FrameType::Data => {
                // `on_header` checked the length against the window.
                s.recv_window -= h.length;
                if s.remote_fin {
                    // Data after FIN is dropped; it still consumed window, which we return.
                    s.credit += h.length;
                } else if let Some(body) = body {
                    s.fds.on_data(body.len());
                    s.recv.push(body, &mut self.spare_tail);
                    s.wake_reader(id, &mut self.ready);
                } else {
                    s.fds.on_data(h.length as usize);
                }
            }
            _ => unreachable!("only stream frames get here"),
        }
        if h.has(FIN) {
            s.remote_fin = true;
            s.wake_reader(id, &mut self.ready);
        }
        if h.has(RST) {
            s.reset = true;
            s.recv.clear();
            s.fds.clear();
            s.wake_reader(id, &mut self.ready);
            s.wake_writer(id, &mut self.ready);
        }
        Ok(())
    }

    /// Reads up to `max` bytes of stream `id` into `sink`; `now` tells the time, asked only
    /// when bytes are read. `Ok(0)` is the end of the stream (the peer's FIN after all its
    /// data). Pending: the reader waits, until [`Ready::Read`].
    pub fn read(
        &mut self,
        id: u32,
        max: usize,
        now: impl FnOnce() -> Instant,
        sink: impl FnMut(&[u8]),
    ) -> Poll<Result<usize, StreamError>> {
        let ended = self.ended;
        let Some(s) = self.streams.get_mut(&id) else {
            return Poll::Ready(Err(StreamError::SessionEnded));
        };
        if s.reset {
            return Poll::Ready(Err(StreamError::Reset));
        }
        let max = s.fds.limit(max);
        if s.recv.len() > 0 && max > 0 {
            let n = s.recv.read(max, &mut self.spare_tail, sink);
            s.fds.consumed(n);
            self.consumed(id, n, now);
            return Poll::Ready(Ok(n));
        }
        if s.remote_fin || max == 0 {
            return Poll::Ready(Ok(0));
        }
        if ended {
            return Poll::Ready(Err(StreamError::SessionEnded));
        }
        s.read_waiting = true;
        Poll::Pending
    }

    /// The reader of stream `id` consumed `n` more bytes at `now`, which is asked only when
    /// the stream's first read or a window update needs it (not on most small reads).
    fn consumed(&mut self, id: u32, n: usize, now: impl FnOnce() -> Instant) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.credit += n as u32;
        s.consumed += n as u64;
        // What `maybe_grant` would find before it looks at the time.
        if s.epoch.is_some() && (s.remote_fin || s.reset || !flow::grant_due(s)) {
            return;
        }
        let now = now();
        s.epoch.get_or_insert(now);
        self.maybe_grant(id, now);
    }

    /// Notes a data frame's arrival on its stream, for the cap beside an interactive stream.
    fn note_arrival(&mut self, h: Header, now: Instant, whole: bool) {
        if let Some(s) = self.streams.get_mut(&h.stream) {
            self.flow.on_data(h, s, whole, now);
        }
    }

    /// Grants the peer what the reader of stream `id` consumed, once it is worth a frame,
    /// with the window resized and capped as the flow policy decides (see `flow.rs`).
    fn maybe_grant(&mut self, id: u32, now: Instant) {
        let budget_left = self.limits.growth_budget.saturating_sub(self.growth_used);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.remote_fin || s.reset || !flow::grant_due(s) {
            return;
        }
        let Some(grant) = self.flow.grant(id, s, budget_left, now) else {
            return;
        };
        let delta = grant.credit + grant.extra - grant.shrink;
        s.credit -= grant.credit;
        s.window = s.window + grant.extra - grant.shrink;
        s.recv_window += delta;
        self.growth_used =
            (self.growth_used + grant.extra as usize).saturating_sub(grant.shrink as usize);
        if delta > 0 {
            self.queue_update(id, 0, delta);
        }
        self.maybe_probe(now);
    }

    /// Writes up to one frame of `buf` on stream `id` into the output queue (copying it);
    /// returns how much was taken. Pending: the writer waits, until [`Ready::Write`].
    pub fn write(&mut self, id: u32, buf: &[u8]) -> Poll<Result<usize, StreamError>> {
        match self.reserve(id, buf.len()) {
            Poll::Ready(Ok(Some(header))) => {
                let n = header.length as usize;
                self.queue(header, Bytes::copy_from_slice(&buf[..n]));
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(0)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`Connection::write`] of the concatenation of `bufs`: up to one frame of them, copied
    /// into one body; returns how much was taken.
    pub fn write_vectored(
        &mut self,
        id: u32,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<Result<usize, StreamError>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        match self.reserve(id, len) {
            Poll::Ready(Ok(Some(header))) => {
                let n = header.length as usize;
                let mut body = BytesMut::with_capacity(n);
                for b in bufs {
                    let take = b.len().min(n - body.len());
                    body.extend_from_slice(&b[..take]);
                    if body.len() == n {
                        break;
                    }
                }
                self.queue(header, body.freeze());
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(0)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Whether frames of streams other than `id` wait in the output queue.
    #[inline]
    pub fn others_queued(&self, id: u32) -> bool {
        self.out.others_queued(id)
    }

    /// Whether a write on stream `id` would take bytes now (open for writing, send window
    /// left, output not congested).
    #[inline]
    pub fn can_write_now(&mut self, id: u32) -> bool {
        self.out_room(id).is_some() && self.writable(id).is_ok_and(|s| s.send_window > 0)
    }

    /// Takes send window for one data frame of up to `len` bytes on stream `id` and returns
    /// its header, for a caller that writes the header and its own buffer to the link at
    /// once. Only while nothing else is queued (`None` then, and nothing is taken), so the
    /// frame cannot overtake queued ones; the caller queues what it could not write.
    pub fn write_direct(
        &mut self,
        id: u32,
        len: usize,
    ) -> Option<Poll<Result<Option<Header>, StreamError>>> {
        if !self.out.is_empty() {
            return None;
        }
        Some(self.reserve(id, len))
    }

    /// Takes send window for one frame of up to `len` bytes on stream `id`. Pending: the
    /// writer waits for window or for room in the output queue, until [`Ready::Write`].
    fn reserve(&mut self, id: u32, len: usize) -> Poll<Result<Option<Header>, StreamError>> {
        let room = self.out_room(id);
        let max_frame = self.limits.max_frame;
        let s = match self.writable(id) {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if len == 0 {
            return Poll::Ready(Ok(None));
        }
        if s.send_window == 0 {
            s.write_waiting = true;
            return Poll::Pending;
        }
        let Some(room) = room else {
            self.wait_for_room(id);
            return Poll::Pending;
        };
        let n = len.min(s.send_window as usize).min(max_frame).min(room);
        s.send_window -= n as u32;
        let flags = if std::mem::take(&mut s.syn_pending) {
            SYN
        } else {
            0
        };
        Poll::Ready(Ok(Some(Header::new(FrameType::Data, flags, id, n as u32))))
    }

    /// Queues file descriptors for stream `id`, to reach the peer ahead of the stream's next
    /// data byte (after everything written so far). Empty `fds` is a no-op.
    pub fn send_fds(&mut self, id: u32, fds: Vec<Fd>) -> Result<(), StreamError> {
        let peer_fds = self.peer_fds;
        let syn_pending = self.writable(id)?.syn_pending;
        if !peer_fds {
            return Err(StreamError::FdsUnsupported);
        }
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(StreamError::TooManyFds);
        }
        if fds.is_empty() {
            return Ok(());
        }
        if syn_pending {
            // The peer must know the stream before fds can be delivered to it.
            self.queue_update(id, 0, 0);
        }
        self.queue_frame(Frame {
            header: Header::new(FrameType::Fds, 0, id, fds.len() as u32).encode(),
            body: Bytes::new(),
            fds,
        });
        Ok(())
    }

    /// Takes the file descriptors the reader of stream `id` has reached (all that arrived
    /// before the bytes it has read, and any after the last of them).
    pub fn take_fds(&mut self, id: u32) -> Vec<Fd> {
        match self.streams.get_mut(&id) {
            Some(s) => s.fds.take(),
            None => Vec::new(),
        }
    }

    /// Stream `id`, if it may still be written to: not reset, not half-closed by us, and the
    /// session not ended.
    fn writable(&mut self, id: u32) -> Result<&mut Stream, StreamError> {
        let ended = self.ended;
        let s = self.streams.get_mut(&id).ok_or(StreamError::SessionEnded)?;
        if s.reset {
            return Err(StreamError::Reset);
        }
        if s.local_fin {
            return Err(StreamError::WriteClosed);
        }
        if ended {
            return Err(StreamError::SessionEnded);
        }
        Ok(s)
    }

    /// Half-closes stream `id` (FIN after everything written so far).
    pub fn finish(&mut self, id: u32) -> Result<(), StreamError> {
        let ended = self.ended;
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(StreamError::SessionEnded);
        };
        if s.reset {
            return Err(StreamError::Reset);
        }
        if s.local_fin {
            return Ok(());
        }
        if ended {
            return Err(StreamError::SessionEnded);
        }
        s.local_fin = true;
        self.queue_update(id, FIN, 0);
        Ok(())
    }

    /// Aborts stream `id` in both directions (RST) and forgets it.
    pub fn reset(&mut self, id: u32) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        self.release(&s);
        if !s.reset && !s.syn_pending && !self.ended {
            self.queue(
                Header::new(FrameType::WindowUpdate, RST, id, 0),
                Bytes::new(),
            );
        }
    }

    /// The handle of stream `id` is gone: like a TCP close, everything written is still
    /// delivered and then FIN is sent; unread data is dropped, and its window granted back so
    /// that a peer still writing learns (from our RST to its next data) that nobody reads.
    pub fn drop_handle(&mut self, id: u32) {
        let Some(mut s) = self.streams.remove(&id) else {
            return;
        };
        self.release(&s);
        if s.reset || self.ended || s.syn_pending {
            // Reset, ended, or never seen by the peer: nothing to tell it.
            return;
        }
        let unread = s.recv.clear() as u32 + s.credit;
        let delta = if s.remote_fin { 0 } else { unread };
        if !s.local_fin || delta > 0 {
            let fin = if s.local_fin { 0 } else { FIN };
            s.local_fin = true;
            self.queue(
                Header::new(FrameType::WindowUpdate, fin, id, delta),
                Bytes::new(),
            );
        }
    }

    fn release(&mut self, s: &Stream) {
        let grown = s.window.saturating_sub(self.limits.initial_window) as usize;
        self.growth_used = self.growth_used.saturating_sub(grown);
    }

    /// Queues a GoAway (once): the peer may open no more streams.
    pub fn go_away(&mut self, code: GoAwayCode) {
        if !self.goaway_sent {
            self.goaway_sent = true;
            self.queue(
                Header::new(FrameType::GoAway, 0, 0, code as u32),
                Bytes::new(),
            );
        }
    }

    /// Queues a Ping the peer must answer.
    pub(crate) fn ping(&mut self, opaque: u32) {
        self.queue(Header::new(FrameType::Ping, SYN, 0, opaque), Bytes::new());
    }

    /// Starts the keepalive timer at `now`: a Ping after `interval` of silence, and the peer
    /// given up on after a further `timeout` (see `keepalive.rs`).
    pub fn start_keepalive(&mut self, interval: Duration, timeout: Duration, now: Instant) {
        self.keepalive = Some(Keepalive::new(interval, timeout, now));
    }

    /// Starts a graceful close at `now`: queues a GoAway (normal; once), so the peer opens no
    /// more streams, and gives the open ones until `now + grace`, when
    /// [`handle_timeout`](Self::handle_timeout) reports [`Due::CloseGraceOver`]. A second
    /// call keeps the first deadline.
    pub fn close(&mut self, now: Instant, grace: Duration) {
        self.go_away(GoAwayCode::Normal);
        self.end.close(now, grace);
    }

    /// The session ends once its queued frames are written: gives the peer until
    /// `now + within` to take them, when [`handle_timeout`](Self::handle_timeout) reports
    /// [`Due::FlushOver`]. Ends the close grace.
    pub fn flush_by(&mut self, now: Instant, within: Duration) {
        self.end.flush_by(now, within);
    }

    /// A write failed as if the peer had gone: the peer may have sent a GoAway just before,
    /// still unread. Waits for it until `now + within`, when
    /// [`handle_timeout`](Self::handle_timeout) reports [`Due::GoAwayWaitOver`].
    pub fn await_goaway(&mut self, now: Instant, within: Duration) {
        self.end.await_goaway(now, within);
    }

    /// When the core's timers next want [`Connection::handle_timeout`] called, if ever: the
    /// earliest deadline of keepalive and the session's end.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let keepalive = self.keepalive.as_ref().map(Keepalive::deadline);
        match (self.end.deadline(), keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the first timer whose deadline has passed at `now` and returns what it asks for
    /// (the session's end before keepalive); call again until `None` for the others. Each
    /// end timer is reported once. `last_read` is when bytes last arrived (the I/O layer
    /// stamps them, as it reads without the core). A keepalive Ping that is due is queued,
    /// and returned as [`Due::Ping`]; [`Due::Dead`] says the peer has been silent for too
    /// long, and is reported again on every call until the session ends.
    pub fn handle_timeout(&mut self, now: Instant, last_read: Instant) -> Option<Due> {
        if let Some(due) = self.end.on_timeout(now) {
            return Some(due);
        }
        let due = self.keepalive.as_mut()?.on_timeout(now, last_read)?;
        if let Due::Ping(opaque) = due {
            self.ping(opaque);
        }
        Some(due)
    }

    /// Ends the session: every stream operation fails from now on, and every waiting one is
    /// reported ready.
    pub fn terminate(&mut self) {
        self.ended = true;
        // Nothing more is written: close the fds queued for the peer now.
        self.out.clear();
        for (&id, s) in self.streams.iter_mut() {
            s.wake_reader(id, &mut self.ready);
            s.wake_writer(id, &mut self.ready);
        }
        self.ready
            .extend(self.out_waiters.drain(..).map(Ready::Write));
    }
}

#[cfg(test)]
mod tests;
