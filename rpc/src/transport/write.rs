//! The write path: the batching [`Outbox`] every sender on a conn queues
//! its frames into, its writer task, and the reader's [`Batch`] that holds
//! the outbox while it dispatches frames that arrived together.
//!
//! Every sender appends its encoded frame to one shared buffer under a
//! short lock; a single writer task swaps the whole buffer out and writes
//! it with one `write_all`, so frames queued while a write is in progress
//! go out together in the next one (few syscalls under load). The two
//! buffers are swapped back and forth and keep their capacity, so the
//! steady state allocates nothing. A sender that finds the writer idle and
//! the queue holding only small frames writes them to the conn itself, once,
//! without waiting (see [`Outbox::write_now`]): a lone call costs no wake-up
//! of the writer task, and what the conn does not take at once is left to it. The writer gives up on a peer that
//! accepts no bytes for the write-stall bound; replies that find the write
//! queue full count against an outbound byte budget.

use std::{
    future::{poll_fn, Future},
    io::{self, IoSlice, Write},
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, MutexGuard,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::Notify,
};

use crate::{
    codec::{self, CodecError, ZERO_COPY_MIN},
    config::Config,
    config::{MAX_MESSAGE_SIZE_CAP, MIN_MESSAGE_SIZE},
    error::Error,
    fds::{FdBatch, FdLink},
    wire::{Header, CONN_ID, LEN_PREFIX, MAX_TIMEOUT, PREAMBLE},
};

/// Frames queued for the writer.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the writer (one waiter; `notify_one` keeps a permit, so a push
    /// between the writer's check and its wait is not lost).
    wake_writer: Notify,
    /// Wakes senders waiting for room (all of them, after each swap).
    room: Notify,
    /// While set, frames queued into an empty outbox do not wake the writer
    /// ([`Outbox::hold`]). Read and written beside the `state` lock: a sender
    /// reads it after appending under the lock, and [`Outbox::release`]
    /// clears it before taking the lock, so one of the two sees the other.
    held: AtomicBool,
    high_water: usize,
    /// Our own `max_message_size` (what we announce and accept).
    max_message: usize,
    /// The peer's announced `max_message_size`; 0 until it arrives (a peer
    /// that predates the announcement never sends one).
    peer_max: AtomicUsize,
    /// Most bytes of replies parked (see [`Outbox::push_reply`]).
    budget: usize,
    /// How long the writer waits for the peer to accept any bytes.
    stall: Duration,
}

/// The conn's write half, once the writer task has sent the preamble.
type Io = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Default)]
struct OutState {
    /// Encoded frames, except large shared byte blocks (see `segments`).
    buf: Vec<u8>,
    /// Large [`ByteBuf`](crate::ByteBuf) contents queued by reference, each
    /// to be written at its offset in `buf` (gather write, no copy).
    segments: Vec<Segment>,
    /// Total bytes in `segments`.
    segment_bytes: usize,
    closed: bool,
    /// Bytes of encoded replies waiting for room (not in `buf` yet).
    parked: usize,
    /// File descriptors to hand to the channel when the writer reaches their offset in
    /// `buf` (the start of an `Fds` frame), in order.
    fd_marks: Vec<FdMark>,
    /// The conn's write half while nobody writes to it: `None` before the
    /// preamble is out, while the writer task or a sender writes (whoever
    /// takes it out owns the conn's write side until it puts it back), and
    /// once the writer has ended.
    io: Option<Io>,
    /// Someone took `io` out to write (the writer task or a sender); what is
    /// queued meanwhile is theirs to hand on when they put it back.
    writing: bool,
    /// The writer task has ended: a sender holding `io` drops it instead of
    /// putting it back.
    ended: bool,
    /// A sender's direct write failed: the writer ends the conn with it.
    failed: Option<io::Error>,
    /// A sender's direct write left the conn to flush (its flush was pending).
    unflushed: bool,
    /// The empty buffer a sender's direct write puts in place of `buf`
    /// (keeps its capacity across writes).
    spare: Vec<u8>,
}

struct Segment {
    at: usize,
    bytes: Bytes,
}

struct FdMark {
    at: usize,
    fds: FdBatch,
}

impl OutState {
    fn queued(&self) -> usize {
        self.buf.len() + self.segment_bytes
    }

    /// Whether a sender that waits for room may append now: one message is
    /// always admitted into an empty queue, whatever its size.
    fn has_room(&self, high_water: usize) -> bool {
        self.queued() == 0 || self.queued() < high_water
    }

    /// Puts `rest`, bytes taken out of `buf` to be written and not
    /// written, back in front of what was queued since.
    fn unshift(&mut self, rest: &[u8]) {
        self.buf.splice(0..0, rest.iter().copied());
        for seg in &mut self.segments {
            seg.at += rest.len();
        }
        for mark in &mut self.fd_marks {
            mark.at += rest.len();
        }
    }

    /// Appends the frames of `other` (encoded elsewhere).
    fn splice(&mut self, other: OutState) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.segment_bytes += other.segment_bytes;
        self.segments
            .extend(other.segments.into_iter().map(|seg| Segment {
                at: base + seg.at,
                bytes: seg.bytes,
            }));
        self.fd_marks
            .extend(other.fd_marks.into_iter().map(|mark| FdMark {
                at: base + mark.at,
                fds: mark.fds,
            }));
    }
}

/// What [`Outbox::push_reply`] does with a reply that finds the write queue
/// full and the outbound budget spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// Drop the reply and fail with [`Error::OutboundFull`] (unary
    /// responses: the call gets a short `ResourceExhausted` status instead).
    Refuse,
    /// Wait for room anyway (stream items: their credit already bounds how
    /// many of them can wait).
    Wait,
}

/// Bytes counted against the outbound budget while a reply waits for room;
/// released on drop (also when the waiting push is cancelled).
struct Parked<'a> {
    outbox: &'a Outbox,
    len: usize,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.outbox.lock().parked -= self.len;
    }
}

/// The size limit a frame is encoded under: the smaller of ours and the
/// peer's, and whose it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit {
    max: usize,
    by_peer: bool,
}

/// The encoder's view of the outbox: an `io::Write` that refuses to grow
/// one message past the maximum message size, so an oversize message is
/// detected while encoding, before it is fully materialised.
pub(crate) struct FrameWriter<'a> {
    state: &'a mut OutState,
    /// Body bytes of this frame so far (copied and by reference).
    len: usize,
    max: usize,
    overflowed: bool,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.len + data.len() > self.max {
            self.overflowed = true;
            return Err(io::Error::other("message exceeds the maximum message size"));
        }
        self.len += data.len();
        if data.len() >= ZERO_COPY_MIN {
            if let Some(bytes) = codec::take_offered(data) {
                self.state.segment_bytes += bytes.len();
                self.state.segments.push(Segment {
                    at: self.state.buf.len(),
                    bytes,
                });
                return Ok(());
            }
        }
        self.state.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Truncates the queue back to where a frame started unless disarmed: a
/// frame whose encoding failed or panicked never reaches the wire
/// half-written.
struct Rollback<'a> {
    state: &'a mut OutState,
    start: usize,
    segments: usize,
    marks: usize,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.buf.truncate(self.start);
            for seg in self.state.segments.drain(self.segments..) {
                self.state.segment_bytes -= seg.bytes.len();
            }
            self.state.fd_marks.truncate(self.marks);
        }
    }
}

/// Descriptors for one call's message: they go in an `Fds` frame right before it.
pub(crate) struct WithFds {
    pub(crate) id: u64,
    pub(crate) fds: FdBatch,
}

/// Encodes the `Fds` frame and the message frame `encode` writes as one unit (both or
/// neither); see [`encode_frame`].
fn encode_message<F>(
    state: &mut OutState,
    fds: Option<WithFds>,
    encode: F,
    limit: Limit,
) -> Result<(), Error>
where
    F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
{
    let Some(WithFds { id, fds }) = fds.filter(|f| !f.fds.is_empty()) else {
        return encode_frame(state, encode, limit);
    };
    let mut rb = Rollback {
        start: state.buf.len(),
        segments: state.segments.len(),
        marks: state.fd_marks.len(),
        state,
        armed: true,
    };
    let at = rb.state.buf.len();
    let count = fds.len() as u32;
    rb.state.fd_marks.push(FdMark { at, fds });
    encode_frame(
        rb.state,
        |w| codec::encode_header(w, &Header::Fds { id, count }, "fds envelope"),
        limit,
    )?;
    encode_frame(rb.state, encode, limit)?;
    rb.armed = false;
    Ok(())
}

/// Encodes one frame (length prefix and the body `encode` writes) at the
/// end of `state`; on any failure `state` is left as it was.
fn encode_frame<F>(state: &mut OutState, encode: F, limit: Limit) -> Result<(), Error>
where
    F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
{
    let start = state.buf.len();
    let mut rb = Rollback {
        start,
        segments: state.segments.len(),
        marks: state.fd_marks.len(),
        state,
        armed: true,
    };
    rb.state.buf.extend_from_slice(&[0; LEN_PREFIX]);
    let mut w = FrameWriter {
        state: rb.state,
        len: 0,
        max: limit.max,
        overflowed: false,
    };
    let res = encode(&mut w);
    let (len, overflowed) = (w.len, w.overflowed);
    match res {
        Ok(()) => {}
        Err(_) if overflowed => {
            return Err(Error::MessageTooLarge {
                max: limit.max,
                by_peer: limit.by_peer,
            })
        }
        Err(e) => return Err(Error::Encode(e)),
    }
    // Fits in u32: max_message is capped far below 4 GiB.
    rb.state.buf[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    rb.armed = false;
    Ok(())
}

impl Outbox {
    /// Bytes queued for the writer.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().queued()
    }

    pub(crate) fn new(config: &Config) -> Outbox {
        Outbox {
            state: Mutex::new(OutState::default()),
            wake_writer: Notify::new(),
            room: Notify::new(),
            held: AtomicBool::new(false),
            high_water: config.write_queue_bytes.max(1),
            max_message: config.message_limit(),
            peer_max: AtomicUsize::new(0),
            budget: config.max_outbound_bytes,
            stall: config.write_stall_timeout.min(MAX_TIMEOUT),
        }
    }

    /// Queues our `max_message_size` announcement (`Credit` for
    /// [`CONN_ID`]). A client sends it first thing, a server in answer to
    /// the client's, so a peer that predates it never receives one.
    pub(crate) fn announce_limit(&self) {
        // Fits in u32: the limit is capped at 64 MiB.
        let (id, n) = (CONN_ID, self.max_message as u32);
        let _ = self
            .push_now(|w| codec::encode_header(w, &Header::Credit { id, n }, "limit announcement"));
    }

    /// Takes the peer's announced `max_message_size` (clamped as a `Config`
    /// would be): from now on no frame larger than it is queued. Returns the
    /// clamped limit, and whether it is the peer's first announcement.
    pub(crate) fn learn_peer_limit(&self, bytes: u32) -> (usize, bool) {
        let bytes = (bytes as usize).clamp(MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE_CAP);
        let first = self.peer_max.swap(bytes, Ordering::Relaxed) == 0;
        tracing::debug!(bytes, "rpc peer announced its max_message_size");
        (bytes, first)
    }

    /// The limit frames are encoded under now.
    fn limit(&self) -> Limit {
        match self.peer_max.load(Ordering::Relaxed) {
            peer if peer != 0 && peer < self.max_message => Limit {
                max: peer,
                by_peer: true,
            },
            _ => Limit {
                max: self.max_message,
                by_peer: false,
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        // A panic while holding the lock leaves the buffer consistent (see
        // `Rollback`), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one frame whose body `encode` writes, waiting while the queue
    /// is above its high-water mark. Fails with `MessageTooLarge` (nothing
    /// queued), `Encode`, or `Closed`.
    ///
    /// Cancel-safe: the frame is queued entirely or not at all.
    pub(crate) async fn push<F>(&self, encode: F) -> Result<(), Error>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        self.push_with(None, encode).await
    }

    /// [`Outbox::push`], with the call's descriptors (if any) in an `Fds` frame right before
    /// the frame `encode` writes.
    pub(crate) async fn push_with<F>(&self, fds: Option<WithFds>, encode: F) -> Result<(), Error>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        let mut encode = Some((fds, encode));
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            let appended = poll_fn(|cx| Poll::Ready(self.append(&mut encode, true, Some(cx))));
            if let Some(res) = appended.await {
                return res;
            }
            self.kick_writer();
            room.await;
        }
    }

    /// Queues one frame now, ignoring the high-water mark. For small control
    /// frames (cancel, credit) sent from places that cannot wait, such as
    /// `Drop`; each call sends at most a bounded number of them.
    pub(crate) fn push_now<F>(&self, encode: F) -> Result<(), Error>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        self.append(&mut Some((None, encode)), false, None)
            .unwrap_or(Err(Error::Closed))
    }

    /// Queues a reply (a response or a stream item) for the peer. With room
    /// in the queue it is encoded in place, as [`Outbox::push`] does.
    /// Otherwise it is encoded aside and counted against the outbound budget
    /// ([`Config::max_outbound_bytes`]) while it waits for room: over budget
    /// (and unless nothing else waits), `WhenFull::Refuse` drops it and
    /// fails with `OutboundFull`, `WhenFull::Wait` waits anyway. So replies
    /// for a peer that stops reading hold at most the budget, plus the write
    /// queue, plus one item per stream.
    ///
    /// Cancel-safe: the frame is queued entirely or not at all, and its
    /// budget is released.
    pub(crate) async fn push_reply<F>(&self, when_full: WhenFull, encode: F) -> Result<(), Error>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        self.push_reply_with(when_full, None, encode).await
    }

    /// [`Outbox::push_reply`], with the call's descriptors (if any) in an `Fds` frame right
    /// before the reply.
    pub(crate) async fn push_reply_with<F>(
        &self,
        when_full: WhenFull,
        fds: Option<WithFds>,
        encode: F,
    ) -> Result<(), Error>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        let mut encode = Some((fds, encode));
        let appended = poll_fn(|cx| Poll::Ready(self.append(&mut encode, true, Some(cx))));
        if let Some(res) = appended.await {
            return res;
        }
        let Some((fds, encode)) = encode.take() else {
            return Err(Error::Closed);
        };
        let mut frame = OutState::default();
        encode_message(&mut frame, fds, encode, self.limit())?;
        let _parked = self.park(frame.queued(), when_full)?;
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            {
                let mut st = self.lock();
                if st.closed {
                    return Err(Error::Closed);
                }
                if st.has_room(self.high_water) {
                    let was_empty = st.queued() == 0;
                    st.splice(frame);
                    drop(st);
                    if was_empty {
                        self.send_unless_held(None);
                    }
                    return Ok(());
                }
            }
            self.kick_writer();
            room.await;
        }
    }

    /// Counts `len` bytes of a waiting reply against the budget.
    fn park(&self, len: usize, when_full: WhenFull) -> Result<Parked<'_>, Error> {
        let mut st = self.lock();
        if when_full == WhenFull::Refuse
            && st.parked > 0
            && st.parked.saturating_add(len) > self.budget
        {
            return Err(Error::OutboundFull {
                len,
                waiting: st.parked,
                limit: self.budget,
            });
        }
        st.parked += len;
        Ok(Parked { outbox: self, len })
    }

    /// Queues the frame `encode` writes (unless `wait_for_room` and the
    /// queue is full: then `None`, and `encode` is left in place) and sends
    /// it on (see [`Outbox::send`]; from the calling task if `cx` is given).
    fn append<F>(
        &self,
        encode: &mut Option<(Option<WithFds>, F)>,
        wait_for_room: bool,
        cx: Option<&mut Context<'_>>,
    ) -> Option<Result<(), Error>>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        let mut st = self.lock();
        if st.closed {
            return Some(Err(Error::Closed));
        }
        if wait_for_room && !st.has_room(self.high_water) {
            return None;
        }
        let (fds, encode) = encode.take()?;
        let was_empty = st.queued() == 0;
        if let Err(e) = encode_message(&mut st, fds, encode, self.limit()) {
            return Some(Err(e));
        }
        drop(st);
        if was_empty {
            self.send_unless_held(cx);
        }
        Some(Ok(()))
    }

    /// Sends frames just queued into an empty outbox, unless it is held
    /// (then [`Outbox::release`] does): written at once from the calling
    /// task when it can (`cx`, see [`Outbox::write_now`]), else by the
    /// writer task.
    fn send_unless_held(&self, cx: Option<&mut Context<'_>>) {
        if !self.held.load(Ordering::SeqCst) {
            self.send(cx);
        }
    }

    /// Writes what is queued from the calling task if it can, else wakes
    /// the writer task unless someone is writing (they pick up what was
    /// queued meanwhile when they finish).
    fn send(&self, cx: Option<&mut Context<'_>>) {
        if let Some(cx) = cx {
            if self.write_now(cx) {
                return;
            }
        }
        if !self.lock().writing {
            self.wake_writer.notify_one();
        }
    }

    /// Writes the queue to the conn from the calling task, without waiting:
    /// only while the writer task is idle and the queue holds nothing but
    /// copied frames (no block queued by reference, no descriptors). Returns
    /// whether it did. What the conn does not take at once goes back to the
    /// front of the queue for the writer task, as does the flush a conn
    /// left pending; a write error is left for the writer task to end the
    /// conn with. The conn may keep `cx`'s waker for its write readiness
    /// (one spurious wake-up of the caller at most).
    fn write_now(&self, cx: &mut Context<'_>) -> bool {
        let (mut io, mut data) = {
            let mut st = self.lock();
            if st.writing
                || st.buf.is_empty()
                || !st.segments.is_empty()
                || !st.fd_marks.is_empty()
                || st.failed.is_some()
                || st.unflushed
            {
                return false;
            }
            let Some(io) = st.io.take() else {
                return false;
            };
            st.writing = true;
            let spare = std::mem::take(&mut st.spare);
            (io, std::mem::replace(&mut st.buf, spare))
        };
        self.room.notify_waiters();
        let mut written = 0;
        let mut failed = None;
        while written < data.len() {
            match Pin::new(&mut io).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => {
                    failed = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Poll::Pending => break,
            }
        }
        let mut unflushed = false;
        if written == data.len() && failed.is_none() {
            match Pin::new(&mut io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => failed = Some(e),
                Poll::Pending => unflushed = true,
            }
        }
        let wake = {
            let mut st = self.lock();
            st.writing = false;
            if !st.ended {
                st.io = Some(io);
            }
            if failed.is_some() {
                st.failed = failed;
            } else if written < data.len() {
                st.unshift(&data[written..]);
            }
            st.unflushed |= unflushed;
            data.clear();
            if data.capacity() <= self.high_water && st.spare.capacity() == 0 {
                st.spare = data;
            }
            (st.queued() > 0 && !self.held.load(Ordering::SeqCst))
                || st.closed
                || st.unflushed
                || st.failed.is_some()
        };
        if wake {
            self.wake_writer.notify_one();
        }
        true
    }

    /// Wakes the writer, held or not, for a sender about to wait for room:
    /// only the writer makes room, so a hold never leaves a full queue
    /// unwritten.
    fn kick_writer(&self) {
        self.wake_writer.notify_one();
    }

    /// Defers waking the writer for frames queued from now on until
    /// [`Outbox::release`] (the writer still sends them with any batch it
    /// writes meanwhile). The server's reader holds the outbox while it
    /// dispatches requests that arrived together, so that their replies
    /// leave in one write instead of one each.
    pub(crate) fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Ends a [`hold`](Outbox::hold) and sends the frames queued meanwhile:
    /// from the calling task if `cx` is given and it can (see
    /// [`Outbox::write_now`]), else by the writer task.
    pub(crate) fn release(&self, cx: Option<&mut Context<'_>>) {
        if !self.held.swap(false, Ordering::SeqCst) {
            return;
        }
        if self.lock().queued() > 0 {
            self.send(cx);
        }
    }

    /// Refuses further frames; the writer sends what is queued, shuts the
    /// write side down and ends. Waiting senders fail with `Closed`.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake_writer.notify_one();
        self.room.notify_waiters();
    }

    /// The writer: sends the preamble, then batches until closed. Returns
    /// `Ok` after a graceful close, `WriteStalled` if the peer accepts no
    /// bytes for the write-stall bound while some wait, and the error of a
    /// sender's failed direct write. Between batches it leaves `io` in the
    /// outbox for senders to write to directly ([`Outbox::write_now`]);
    /// once it returns or is cancelled nobody writes to `io` any more, and
    /// it is dropped. Not cancel-safe (a cancelled write may leave a partial
    /// frame on the wire), so cancel it only when the conn is being
    /// abandoned anyway.
    pub(crate) async fn run_writer<W>(&self, io: W, fds: &FdLink) -> Result<(), Error>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let _end = WriterEnd(self);
        let mut io: Io = Box::new(io);
        write_gathered(&mut io, &PREAMBLE, &[], self.stall).await?;
        self.flush(&mut io).await?;
        let mut io = Some(io);
        let mut spare: Vec<u8> = Vec::new();
        let mut spare_segments: Vec<Segment> = Vec::new();
        let mut spare_marks: Vec<FdMark> = Vec::new();
        loop {
            // Take the next batch and the conn, or hand the conn back to
            // senders and wait.
            let (closed, flush) = {
                let mut st = self.lock();
                if let Some(io) = io.take() {
                    st.io = Some(io);
                    st.writing = false;
                }
                if let Some(e) = st.failed.take() {
                    return Err(e.into());
                }
                let flush = std::mem::take(&mut st.unflushed);
                if !st.writing && (st.queued() > 0 || flush || st.closed) {
                    io = st.io.take();
                    st.writing = io.is_some();
                    std::mem::swap(&mut st.buf, &mut spare);
                    std::mem::swap(&mut st.segments, &mut spare_segments);
                    std::mem::swap(&mut st.fd_marks, &mut spare_marks);
                    st.segment_bytes = 0;
                } else {
                    st.unflushed |= flush;
                }
                (st.closed, flush)
            };
            let Some(conn) = io.as_mut() else {
                // Nothing to send, or a sender is writing (it wakes us when
                // it is done if anything is left).
                self.wake_writer.notified().await;
                continue;
            };
            if spare.is_empty() {
                if flush {
                    self.flush(conn).await?;
                    continue;
                }
                if closed {
                    // Best effort: the peer may already be gone.
                    let _ = conn.shutdown().await;
                    return Ok(());
                }
                continue;
            }
            self.room.notify_waiters();
            // Descriptors go to the channel exactly where their `Fds` frame starts: what is
            // before it is written first.
            let mut pos = 0;
            let mut seg = 0;
            for mark in spare_marks.drain(..) {
                let end = seg
                    + spare_segments[seg..]
                        .iter()
                        .take_while(|s| s.at <= mark.at)
                        .count();
                write_gathered_from(
                    conn,
                    &spare[..mark.at],
                    pos,
                    &spare_segments[seg..end],
                    self.stall,
                )
                .await?;
                fds.send(&mark.fds)?;
                (pos, seg) = (mark.at, end);
            }
            write_gathered_from(conn, &spare, pos, &spare_segments[seg..], self.stall).await?;
            spare_segments.clear();
            self.flush(conn).await?;
            spare.clear();
            // Keep the buffer across batches (no fresh allocations, no page
            // faults) unless one huge message inflated it.
            if spare.capacity() > 4 * self.high_water.max(self.max_message / 4) {
                spare.shrink_to(self.high_water);
            }
            tracing::trace!("rpc writer flushed a batch");
        }
    }
}

/// Ends the writer's ownership of the conn however it returns: the write
/// half is dropped, now or by the sender writing to it when it is done.
struct WriterEnd<'a>(&'a Outbox);

impl Drop for WriterEnd<'_> {
    fn drop(&mut self) {
        let io = {
            let mut st = self.0.lock();
            st.ended = true;
            st.io.take()
        };
        drop(io);
    }
}

impl Outbox {
    /// Flushes `io`, bounded by the write-stall timeout.
    async fn flush<W: AsyncWrite + Unpin>(&self, io: &mut W) -> Result<(), Error> {
        match tokio::time::timeout(self.stall, io.flush()).await {
            Ok(res) => Ok(res?),
            Err(_) => Err(Error::WriteStalled {
                after: self.stall,
                pending: 0,
            }),
        }
    }
}

/// Most frames a reader dispatches while holding the outbox: under a flood
/// of frames, what they queued still leaves at least every this many.
const MAX_BATCH: usize = 64;

/// A reader's batch: what the frames it dispatches queue (replies, and
/// requests of the callers they wake) waits in a held [`Outbox`] until the
/// reader runs out of frames, and then leaves in one write rather than one
/// write per frame.
pub(crate) struct Batch<'a> {
    outbox: &'a Outbox,
    /// Frames dispatched since the outbox was last released.
    frames: usize,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(outbox: &'a Outbox) -> Batch<'a> {
        Batch { outbox, frames: 0 }
    }

    /// Counts one frame about to be dispatched, holding the outbox.
    pub(crate) fn add(&mut self) {
        if self.frames == MAX_BATCH {
            self.outbox.release(None);
            self.frames = 0;
        }
        self.outbox.hold();
        self.frames += 1;
    }

    /// Awaits `next`, the reader's next frame. When it has to wait for
    /// bytes after several frames, the reader first lets the tasks those
    /// frames woke run (it schedules itself once more, behind them), so that
    /// what they queue joins the batch; then it releases the outbox to the
    /// writer. After a single frame it releases at once (sequential calls
    /// pay no extra scheduling).
    ///
    /// Cancel-safe if `next` is; the outbox stays held until the next
    /// [`Batch::next`] or [`Outbox::close`].
    pub(crate) async fn next<F: Future>(&mut self, next: F) -> F::Output {
        let mut next = pin!(next);
        let mut deferred = false;
        poll_fn(|cx| {
            let res = next.as_mut().poll(cx);
            if res.is_pending() && self.frames > 0 {
                // One frame is a lone call: its sender waits for nothing else,
                // and rescheduling the reader would only wake another worker.
                if deferred || self.frames == 1 {
                    self.outbox.release(Some(cx));
                    self.frames = 0;
                } else {
                    deferred = true;
                    cx.waker().wake_by_ref();
                }
            }
            res
        })
        .await
    }
}

/// Writes `buf[from..]` with each of `segments` (offsets into `buf`, none before `from`)
/// spliced in; see [`write_gathered`].
async fn write_gathered_from<W>(
    io: &mut W,
    buf: &[u8],
    from: usize,
    segments: &[Segment],
    stall: Duration,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    if from == 0 {
        return write_gathered(io, buf, segments, stall).await;
    }
    let rebased: Vec<Segment> = segments
        .iter()
        .map(|s| Segment {
            at: s.at - from,
            bytes: s.bytes.clone(),
        })
        .collect();
    write_gathered(io, &buf[from..], &rebased, stall).await
}

/// Writes `buf` with each segment spliced in at its offset, using
/// vectored writes. Fails with `WriteStalled` when one write accepts
/// nothing for `stall`: a peer that reads at all, however slowly, keeps
/// the conn.
async fn write_gathered<W>(
    io: &mut W,
    buf: &[u8],
    segments: &[Segment],
    stall: Duration,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let stalled = |pending| Error::WriteStalled {
        after: stall,
        pending,
    };
    if segments.is_empty() {
        // The common case: one contiguous buffer, no slice list to build.
        let mut rest = buf;
        while !rest.is_empty() {
            let n = tokio::time::timeout(stall, io.write(rest))
                .await
                .map_err(|_| stalled(rest.len()))??;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            rest = &rest[n..];
        }
        return Ok(());
    }
    let mut slices = Vec::with_capacity(2 * segments.len() + 1);
    let mut pos = 0;
    for seg in segments {
        if seg.at > pos {
            slices.push(IoSlice::new(&buf[pos..seg.at]));
        }
        slices.push(IoSlice::new(&seg.bytes));
        pos = seg.at;
    }
    if buf.len() > pos {
        slices.push(IoSlice::new(&buf[pos..]));
    }
    let mut pending: usize = slices.iter().map(|s| s.len()).sum();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        // A large leading slice goes alone through `write`: when the socket
        // takes only part of it, tokio learns from that partial write that the
        // send buffer is full and waits for the kernel's write-space wakeup.
        // A partial vectored write leaves the socket marked writable, so the
        // next write went out at once with the little room the peer had freed
        // meanwhile (or failed with `WouldBlock`): more, smaller writes.
        let write = if slices[0].len() >= ZERO_COPY_MIN || slices.len() == 1 {
            tokio::time::timeout(stall, io.write(&slices[0])).await
        } else {
            tokio::time::timeout(stall, io.write_vectored(slices)).await
        };
        let n = write.map_err(|_| stalled(pending))??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        pending -= n;
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::read::FrameReader;

    #[tokio::test]
    async fn frames_queued_while_the_writer_is_busy_go_out_in_one_write() {
        let outbox = Outbox::new(&Config::default());
        for i in 0..100u32 {
            outbox.push(|w| codec::encode(w, &i, "n")).await.unwrap();
        }
        outbox.close();
        let conn = SharedWrites::taking(usize::MAX);
        outbox
            .run_writer(conn.clone(), &crate::fds::FdLink::default())
            .await
            .unwrap();
        // One write for the preamble, one for all 100 frames.
        assert_eq!(conn.writes(), 2);
        let data = conn.data();
        let mut r =
            FrameReader::with_limits(&data[PREAMBLE.len()..], 1024, Duration::from_secs(30));
        for i in 0..100u32 {
            let body = r.next_frame().await.unwrap().unwrap().body();
            assert_eq!(codec::decode::<u32>(&body, "n").unwrap(), i);
        }
        assert!(r.next_frame().await.unwrap().is_none());
    }

    /// Records every write that reaches the conn (its kind and size) and
    /// what it took; takes at most `per_call` bytes per write, like a socket
    /// whose send buffer is full (`usize::MAX`: all of it).
    struct RecordingWriter {
        data: Vec<u8>,
        per_call: usize,
        /// (vectored, bytes taken) per call.
        calls: Vec<(bool, usize)>,
    }

    impl RecordingWriter {
        fn taking(per_call: usize) -> RecordingWriter {
            RecordingWriter {
                data: Vec::new(),
                per_call,
                calls: Vec::new(),
            }
        }
    }

    impl AsyncWrite for RecordingWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.per_call);
            self.data.extend_from_slice(&buf[..n]);
            self.calls.push((false, n));
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.per_call - n);
                self.data.extend_from_slice(&b[..take]);
                n += take;
            }
            self.calls.push((true, n));
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A large block queued by reference leaves with its header in one
    /// gathered write; what a short write leaves of the block goes out in
    /// plain writes of the block alone (a partial plain write tells the
    /// runtime that the socket is full), and the bytes arrive exactly.
    #[tokio::test]
    async fn a_large_block_cut_by_short_writes_continues_in_plain_writes() {
        let blob = crate::ByteBuf::from((0..300_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let outbox = Outbox::new(&Config::default());
        outbox
            .push(|w| codec::encode(w, &(7u32, &blob, 9u8), "m"))
            .await
            .unwrap();
        outbox.close();
        let conn = SharedWrites::taking(100_000);
        outbox
            .run_writer(conn.clone(), &crate::fds::FdLink::default())
            .await
            .unwrap();
        let (calls, data) = (conn.calls(), conn.data());
        let calls = &calls[1..]; // after the preamble
        assert!(
            calls[0].0,
            "the header and the block start in one gathered write"
        );
        let plain = calls.iter().filter(|c| !c.0).count();
        assert!(
            plain >= 2,
            "the rest of the block in plain writes: {calls:?}"
        );
        let mut r =
            FrameReader::with_limits(&data[PREAMBLE.len()..], 1 << 20, Duration::from_secs(30));
        let body = r.next_frame().await.unwrap().unwrap().body();
        let (a, b, c): (u32, crate::ByteBuf, u8) = codec::decode(&body, "m").unwrap();
        assert_eq!((a, c), (7, 9));
        assert!(b[..] == blob[..], "the block differs");
        assert!(r.next_frame().await.unwrap().is_none());
    }

    /// A [`RecordingWriter`] shared with the test while the outbox owns
    /// it; the test can make it stall (pending until resumed) or fail.
    #[derive(Clone)]
    struct SharedWrites(std::sync::Arc<Mutex<Shared>>);

    struct Shared {
        rec: RecordingWriter,
        /// Bytes it takes before it stalls (`usize::MAX`: never).
        budget: usize,
        stalled: Option<std::task::Waker>,
        fail: bool,
    }

    impl SharedWrites {
        fn taking(per_call: usize) -> SharedWrites {
            SharedWrites(std::sync::Arc::new(Mutex::new(Shared {
                rec: RecordingWriter::taking(per_call),
                budget: usize::MAX,
                stalled: None,
                fail: false,
            })))
        }

        fn writes(&self) -> usize {
            self.0.lock().unwrap().rec.calls.len()
        }

        fn calls(&self) -> Vec<(bool, usize)> {
            self.0.lock().unwrap().rec.calls.clone()
        }

        fn data(&self) -> Vec<u8> {
            self.0.lock().unwrap().rec.data.clone()
        }

        /// Takes `bytes` more, then stays pending until [`SharedWrites::resume`].
        fn stall_after(&self, bytes: usize) {
            self.0.lock().unwrap().budget = bytes;
        }

        fn resume(&self) {
            let mut sh = self.0.lock().unwrap();
            sh.budget = usize::MAX;
            if let Some(waker) = sh.stalled.take() {
                waker.wake();
            }
        }

        fn fail(&self) {
            self.0.lock().unwrap().fail = true;
        }
    }

    impl AsyncWrite for SharedWrites {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut sh = self.0.lock().unwrap();
            if sh.fail {
                return std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if sh.budget == 0 {
                sh.stalled = Some(cx.waker().clone());
                return std::task::Poll::Pending;
            }
            let take = buf.len().min(sh.budget);
            let res = std::pin::Pin::new(&mut sh.rec).poll_write(cx, &buf[..take]);
            if let std::task::Poll::Ready(Ok(n)) = res {
                sh.budget = sh.budget.saturating_sub(n);
            }
            res
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.0.lock().unwrap().rec).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Starts a writer task for `outbox` and waits until it has written the
    /// preamble and waits for frames, leaving the conn to direct writes (the
    /// single-threaded test runtime runs it only when the test yields).
    async fn idle_writer(outbox: &std::sync::Arc<Outbox>) -> SharedWrites {
        let conn = SharedWrites::taking(usize::MAX);
        let (o, c) = (std::sync::Arc::clone(outbox), conn.clone());
        tokio::spawn(async move { o.run_writer(c, &crate::fds::FdLink::default()).await });
        for _ in 0..100 {
            if conn.writes() == 1 && outbox.lock().io.is_some() {
                return conn;
            }
            tokio::task::yield_now().await;
        }
        panic!("the writer did not write the preamble");
    }

    #[tokio::test]
    async fn frames_queued_while_held_wait_for_the_release_and_leave_in_one_write() {
        let outbox = std::sync::Arc::new(Outbox::new(&Config::default()));
        let conn = idle_writer(&outbox).await;
        outbox.hold();
        for i in 0..10u32 {
            outbox.push(|w| codec::encode(w, &i, "n")).await.unwrap();
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(conn.writes(), 1, "a held outbox does not wake the writer");
        outbox.release(None);
        for _ in 0..100 {
            if conn.writes() > 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(conn.writes(), 2, "the ten frames leave in one write");
        let data = conn.data();
        let mut r =
            FrameReader::with_limits(&data[PREAMBLE.len()..], 1024, Duration::from_secs(30));
        for i in 0..10u32 {
            let body = r.next_frame().await.unwrap().unwrap().body();
            assert_eq!(codec::decode::<u32>(&body, "n").unwrap(), i);
        }
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_wakes_a_held_writer() {
        let config = Config::default().write_queue_bytes(1024);
        let outbox = std::sync::Arc::new(Outbox::new(&config));
        let conn = idle_writer(&outbox).await;
        outbox.hold();
        outbox.push(bytes_frame(4096)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), outbox.push(bytes_frame(16)))
            .await
            .expect("the writer made room although the outbox is held")
            .unwrap();
        assert!(conn.writes() >= 2);
    }

    #[tokio::test]
    async fn large_byte_blocks_are_queued_by_reference_and_written_in_place() {
        let outbox = Outbox::new(&Config::default());
        let blob = crate::ByteBuf::from(vec![5u8; 100_000]);
        let value = (1u8, blob.clone(), 2u8);
        outbox
            .push_now(|w| codec::encode(w, &value, "test"))
            .unwrap();
        {
            let st = outbox.lock();
            assert_eq!(st.segments.len(), 1, "the block was not copied");
            assert_eq!(st.segments[0].bytes.as_ptr(), blob.as_ptr());
        }
        // A too-large message with a block rolls back cleanly.
        let huge = (crate::ByteBuf::from(vec![0u8; 17 << 20]),);
        assert!(matches!(
            outbox.push_now(|w| codec::encode(w, &huge, "test")),
            Err(Error::MessageTooLarge { .. })
        ));
        assert_eq!(outbox.lock().segments.len(), 1);
        outbox.close();
        let conn = SharedWrites::taking(usize::MAX);
        outbox
            .run_writer(conn.clone(), &crate::fds::FdLink::default())
            .await
            .unwrap();
        let wire = conn.data();
        let mut want = PREAMBLE.to_vec();
        let mut body = Vec::new();
        codec::encode(&mut body, &(1u8, vec![5u8; 100_000], 2u8), "test").unwrap();
        want.extend_from_slice(&(body.len() as u32).to_be_bytes());
        want.extend_from_slice(&body);
        assert_eq!(wire, want);
    }

    /// Reads back the `u32` frames written after the preamble.
    async fn numbers(data: &[u8]) -> Vec<u32> {
        let mut r =
            FrameReader::with_limits(&data[PREAMBLE.len()..], 1024, Duration::from_secs(30));
        let mut got = Vec::new();
        while let Some(frame) = r.next_frame().await.unwrap() {
            got.push(codec::decode::<u32>(&frame.body(), "n").unwrap());
        }
        got
    }

    #[tokio::test]
    async fn a_frame_sent_while_the_writer_is_idle_is_written_by_its_sender_at_once() {
        let outbox = std::sync::Arc::new(Outbox::new(&Config::default()));
        let conn = idle_writer(&outbox).await;
        for i in 0..3u32 {
            outbox.push(|w| codec::encode(w, &i, "n")).await.unwrap();
            // No yield: the sender itself wrote the frame.
            assert_eq!(conn.writes(), 2 + i as usize);
        }
        assert_eq!(numbers(&conn.data()).await, [0, 1, 2]);
    }

    #[tokio::test]
    async fn what_a_stalled_conn_leaves_of_a_direct_write_goes_out_first_via_the_writer() {
        let outbox = std::sync::Arc::new(Outbox::new(&Config::default()));
        let conn = idle_writer(&outbox).await;
        conn.stall_after(3);
        outbox.push(|w| codec::encode(w, &0u32, "n")).await.unwrap();
        // Three bytes went out; the rest waits in front of the next frames.
        assert_eq!(conn.data().len(), PREAMBLE.len() + 3);
        for i in 1..4u32 {
            outbox.push(|w| codec::encode(w, &i, "n")).await.unwrap();
        }
        conn.resume();
        for _ in 0..100 {
            if numbers_ready(&conn.data(), 4) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(numbers(&conn.data()).await, [0, 1, 2, 3]);
        assert!(outbox.lock().queued() == 0 && !outbox.lock().writing);
    }

    /// Whether `data` holds the preamble and `n` one-byte-body frames.
    fn numbers_ready(data: &[u8], n: usize) -> bool {
        data.len() >= PREAMBLE.len() + n * (LEN_PREFIX + 1)
    }

    #[tokio::test]
    async fn a_failed_direct_write_ends_the_writer_with_its_error() {
        let outbox = std::sync::Arc::new(Outbox::new(&Config::default()));
        let conn = SharedWrites::taking(usize::MAX);
        let (o, c) = (std::sync::Arc::clone(&outbox), conn.clone());
        let writer =
            tokio::spawn(async move { o.run_writer(c, &crate::fds::FdLink::default()).await });
        for _ in 0..100 {
            if outbox.lock().io.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        conn.fail();
        outbox.push(|w| codec::encode(w, &1u32, "n")).await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ended")
            .unwrap();
        assert!(
            matches!(&res, Err(Error::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset),
            "{res:?}"
        );
        // The conn's write half is gone with the writer.
        assert!(outbox.lock().io.is_none());
    }

    fn bytes_frame(n: usize) -> impl FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError> {
        move |w| {
            w.write_all(&vec![1; n]).map_err(|e| CodecError::Encode {
                what: "test",
                error: Box::new(e),
            })
        }
    }

    #[tokio::test]
    async fn replies_past_the_outbound_budget_are_refused_or_wait_and_cancelled_ones_release_it() {
        let outbox = Outbox::new(
            &Config::default()
                .write_queue_bytes(1)
                .max_outbound_bytes(1000),
        );
        // The queue holds a frame, so replies have no room and park.
        outbox.push_now(bytes_frame(10)).unwrap();
        let mut first = Box::pin(outbox.push_reply(WhenFull::Refuse, bytes_frame(600)));
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert_eq!(outbox.lock().parked, 604);
        let refused = outbox.push_reply(WhenFull::Refuse, bytes_frame(600)).await;
        assert!(
            matches!(
                refused,
                Err(Error::OutboundFull {
                    len: 604,
                    waiting: 604,
                    limit: 1000
                })
            ),
            "{refused:?}"
        );
        // A stream item waits past the budget instead.
        let mut item = Box::pin(outbox.push_reply(WhenFull::Wait, bytes_frame(600)));
        assert!(futures::poll!(item.as_mut()).is_pending());
        assert_eq!(outbox.lock().parked, 1208);
        // Cancelled waits give their bytes back.
        drop(first);
        drop(item);
        assert_eq!(outbox.lock().parked, 0);
        // Once the writer takes the queue, a waiting reply goes in whole.
        let mut again = Box::pin(outbox.push_reply(WhenFull::Refuse, bytes_frame(600)));
        assert!(futures::poll!(again.as_mut()).is_pending());
        outbox.lock().buf.clear();
        outbox.room.notify_waiters();
        again.await.unwrap();
        let st = outbox.lock();
        assert_eq!((st.parked, st.buf.len()), (0, 604));
        assert_eq!(st.buf[..4], 600u32.to_be_bytes());
    }

    #[test]
    fn oversize_messages_are_refused_and_leave_nothing_queued() {
        let outbox = Outbox::new(&Config::default().max_message_size(512));
        let err = outbox
            .push_now(|w| {
                w.write_all(&[0; 513]).map_err(|e| CodecError::Encode {
                    what: "test",
                    error: Box::new(e),
                })
            })
            .unwrap_err();
        assert!(matches!(
            err,
            Error::MessageTooLarge {
                max: 512,
                by_peer: false
            }
        ));
        assert!(outbox.lock().buf.is_empty() && outbox.lock().segments.is_empty());
        outbox
            .push_now(|w| {
                w.write_all(&[7; 512]).map_err(|e| CodecError::Encode {
                    what: "test",
                    error: Box::new(e),
                })
            })
            .unwrap();
        assert_eq!(outbox.lock().buf, [&[0, 0, 2, 0][..], &[7; 512]].concat());
    }
}
