//! The read side of the link: bytes in, frames to the core. The driver reads and parses here
//! on every turn; a stream's reader may read the rest of a large data frame's body straight
//! into its own buffer instead (read-through), which saves the copy out of our read buffer.
//!
//! - **Reads** go into a `BytesMut` without zeroing, offered up to [`READ_CHUNK`] per read
//!   while the link keeps filling what is offered (64 KiB while it does not); a data
//!   frame's body is handed to the core as slices of it (no copy), piece by piece as it
//!   arrives, so no frame needs a buffer of its own size. Pieces under [`COPY_BELOW`] are
//!   copied out instead (those under 4 KiB by the core, into the stream's own buffers), so
//!   that a small piece a reader leaves unread never keeps a whole chunk alive.
//! - **Read-through**: when every byte read so far is parsed and the link's next bytes are
//!   the body of a large data frame for stream `id` whose large frame came last (one bulk
//!   stream, not several interleaved; small frames between its bodies, such as an rpc
//!   message's envelope, keep it so), the reader of `id` may take
//!   them with a read of its own (bounded by the body's end) while it holds this state's
//!   lock; the core then counts them as received and read at once
//!   ([`Connection::on_read_through`]).
//!   The driver helps by leaving such a body on the link for one turn when its reader is
//!   about to run. A read-through that ends a body takes what follows it too (the next
//!   header and [`HEADER_AHEAD`] bytes; in the same `readv` on a socket when the reader's
//!   room is initialised, else in a second read) and parses it, so the stream's next body
//!   is ready to be read through with no driver read and no hop; it still wakes the driver
//!   unless the link was drained (the reader may not come back, and the frames behind the
//!   body must not wait for it). When large frames of several streams interleave, the driver reads whole
//!   chunks instead: a header-sized read and a hand-over to another task per frame cost
//!   more than the readers' copies (half the reads, a third fewer wake-ups per GiB on eight
//!   channels).
//!
//! Whoever reads holds the lock of this state (then the core's, never the other way round),
//! so bytes are parsed in link order whichever task reads them.

use super::{
    transport::{LinkRead, ReadAhead},
    Core,
};
use bytes::{Buf, BytesMut};
use netchan_mux_proto::{
    Connection, Fd, FrameType, Header, Violation, ACK, FIN, HEADER_LEN, RST, SYN,
};
use std::{
    collections::VecDeque,
    io,
    task::{Context, Poll},
    time::Instant,
};
use tokio::io::ReadBuf;

/// Most read buffer space offered to the link per read. Large enough that a read takes a
/// 64 KiB frame with the header after it, or several frames of interleaved streams, in one
/// `recvfrom`. The buffer is reused once every slice of it is consumed; while streams hold
/// slices of it, the next read goes into a new one. A slice is at least [`COPY_BELOW`] bytes,
/// so the chunks the streams keep alive are at most `READ_CHUNK / COPY_BELOW` (16) times the
/// bytes they hold (bounded by their windows, see `Config::worst_case_buffered`), the same
/// ratio as 64 KiB chunks with 4 KiB slices.
const READ_CHUNK: usize = 256 * 1024;
/// Read buffer space offered while the link does not fill what it is offered: an idle or
/// interactive session keeps a small buffer. Each read that fills its offer doubles it, up to
/// [`READ_CHUNK`]; one that takes under a quarter of it halves it.
const READ_SMALL: usize = 64 * 1024;
/// Pieces of a frame body smaller than this are copied out of the read buffer rather than
/// sliced from it (see [`READ_CHUNK`]). Pieces under [`CORE_COPIES_BELOW`] are left to the
/// core, which gathers them into the stream's own buffers anyway.
const COPY_BELOW: usize = 16 * 1024;
/// The size under which the core copies a frame's body into its stream's own buffer.
const CORE_COPIES_BELOW: usize = 4 * 1024;
/// A large data frame is handed to its stream in pieces of at least this size as it arrives,
/// so no frame needs a contiguous buffer of its own size.
const PIECE_MIN: usize = 16 * 1024;
/// Body bytes left worth reading straight into a reader's buffer, and the least room a
/// reader's buffer must have for it: below this the copy costs less than the extra read.
pub(crate) const READ_THROUGH_MIN: usize = 16 * 1024;
/// While large bodies of one stream arrive, how many bytes a read takes beyond the next frame
/// header: a small frame between two large bodies (an rpc message's envelope, a window
/// update) then comes in the same read as the header before it, and at most this much of a
/// large body is read into our buffer (and copied out) before its reader reads the rest
/// through.
pub(crate) const HEADER_AHEAD: usize = 256;
/// Frames other than large data frames (small data frames, window updates, pings) that may
/// come in a row without ending the one-bulk-stream mode (`large`): a bulk sender's messages
/// put a small frame or two between their bodies; more than this in a row is small-message
/// traffic, which reads are not cut short for.
const SMALL_RUN_MAX: u32 = 4;

/// A data or window-update frame whose body has not all been handed on yet.
#[derive(Clone, Copy)]
struct Body {
    header: Header,
    /// Body bytes still to come.
    remaining: usize,
    /// Nothing of it has been handed on yet (the first piece carries SYN and ACK).
    first: bool,
}

impl Body {
    /// The header of the next `take` bytes, read as a frame of their own: SYN and ACK on the
    /// first piece, FIN and RST on the last, each piece consuming its own share of window.
    fn piece(&self, take: usize) -> Header {
        let last = take == self.remaining;
        if self.first && last {
            return self.header;
        }
        let mut flags = self.header.flags;
        if !self.first {
            flags &= !(SYN | ACK);
        }
        if !last {
            flags &= !(FIN | RST);
        }
        Header::new(self.header.ty, flags, self.header.stream, take as u32)
    }

    /// `take` bytes were handed on; what is left of the frame, if anything.
    fn after(self, take: usize) -> Option<Body> {
        (take < self.remaining).then_some(Body {
            remaining: self.remaining - take,
            first: false,
            ..self
        })
    }
}

/// What ended the link during a read made outside the driver, for the driver to end the
/// session with.
pub(crate) enum Failed {
    Violation(Violation),
    Io(io::Error),
}

/// The link's read half and the parse state of what was read from it.
pub(crate) struct Inbound {
    io: Box<dyn LinkRead>,
    /// Bytes read and not parsed yet.
    buf: BytesMut,
    /// The frame being received, when its header is parsed but not all of its body is here.
    body: Option<Body>,
    /// File descriptors received (on a link that carries them) whose frame has not been
    /// parsed yet, in arrival order.
    pub(crate) fds: VecDeque<Fd>,
    /// When bytes last arrived (keepalive).
    pub(crate) last_read: tokio::time::Instant,
    /// Set by a read-through that met the end of the link, an error or a violation.
    pub(crate) failed: Option<Failed>,
    /// The body the driver left on the link for its reader: (stream, bytes left) when it did.
    deferred: Option<(u32, usize)>,
    /// One bulk stream is sending: the last large data frame was of the same stream as the
    /// large one before it (not several interleaved), and at most [`SMALL_RUN_MAX`] other
    /// frames came since (see [`Inbound::note_frame`]). Reads stop shortly after the end of
    /// the next frame header, so that if that frame is another large body for a waiting
    /// reader, next to none of it lands in our buffer to be copied out again (see
    /// [`Inbound::read_limit`]).
    large: bool,
    /// The stream of the last large data frame, unless more than [`SMALL_RUN_MAX`] other
    /// frames came since.
    last_large: Option<u32>,
    /// Frames other than large data frames since the last large data frame.
    small_run: u32,
    /// Read buffer space offered per read (between [`READ_SMALL`] and [`READ_CHUNK`]).
    offer: usize,
    /// The read buffer before `buf`, kept while bytes keep arriving: once the streams have
    /// consumed the pieces sliced from it, a read that needs new room takes its memory
    /// (already paged in) instead of a fresh allocation, whose pages the kernel would fault
    /// in and zero during the read. Dropped when a read finds the link empty, so an idle
    /// session holds no spare.
    spare: Option<BytesMut>,
    /// `buf` has memory of its own (it is not a new, empty `BytesMut`).
    buf_allocated: bool,
    /// Streams the peer opened, parsed and not yet handed to the driver (a reader's read
    /// that took the frames after a body may parse them). At most the session's stream limit.
    pub(crate) accepted: Vec<u32>,
}

impl Inbound {
    pub(crate) fn new(io: Box<dyn LinkRead>) -> Inbound {
        Inbound {
            io,
            buf: BytesMut::new(),
            body: None,
            fds: VecDeque::new(),
            last_read: tokio::time::Instant::now(),
            failed: None,
            deferred: None,
            large: false,
            last_large: None,
            small_run: 0,
            offer: READ_SMALL,
            spare: None,
            buf_allocated: false,
            accepted: Vec::new(),
        }
    }

    /// Reads what the link has into the read buffer. `Ok(0)` is the end of the link.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let max = self.read_limit();
        self.make_room(max);
        let read = self.io.poll_read(cx, &mut self.buf, max, &mut self.fds);
        if read.is_pending() && self.buf.is_empty() {
            self.spare = None;
        }
        if let Poll::Ready(Ok(n)) = read {
            if n > 0 {
                self.last_read = tokio::time::Instant::now();
            }
            // Reads cut short at a header (read-through) say nothing about the link's pace.
            if max == self.offer {
                if n == max {
                    self.offer = (self.offer * 2).min(READ_CHUNK);
                } else if n < self.offer / 4 {
                    self.offer = (self.offer / 2).max(READ_SMALL);
                }
            }
        }
        read
    }

    /// Makes room in the read buffer for a read of `max` bytes.
    fn make_room(&mut self, max: usize) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * self.offer.max(max) {
            // Back to a small buffer (the large one is freed once its slices are consumed).
            self.buf = BytesMut::new();
            self.buf_allocated = false;
            self.spare = None;
        }
        if self.buf.is_empty() && !self.buf.try_reclaim(max) {
            // New room is needed: the spare's, if no stream holds a piece of it any more;
            // the buffer given up becomes the spare (unless the old spare is still in use:
            // its pieces are older, so it is the one likely to come free first).
            match &mut self.spare {
                Some(spare) => {
                    let free = spare.try_reclaim(max);
                    if free {
                        std::mem::swap(&mut self.buf, spare);
                    }
                }
                None if self.buf_allocated => self.spare = Some(std::mem::take(&mut self.buf)),
                None => {}
            }
        }
        self.buf.reserve(max);
        self.buf_allocated = true;
    }

    /// How much the next read may take. Normally the current offer; while large data frames
    /// of one stream arrive (see `large`), only up to [`HEADER_AHEAD`] bytes past the end of
    /// the next frame header, so that every large body starts at (or within a few bytes of)
    /// a read of its own, which its reader may make (read-through). A large body then costs
    /// a read for its header (and the small frames before it) and the reader's reads of its
    /// body, instead of parts of one or two chunks plus a copy.
    fn read_limit(&self) -> usize {
        if !self.large {
            return self.offer;
        }
        // What is buffered belongs to the frame in progress (a partial header, or part of
        // the pending body): read its rest and the header after it.
        let needed = match self.body {
            Some(body) => body.remaining.saturating_sub(self.buf.len()) + HEADER_LEN,
            None => HEADER_LEN.saturating_sub(self.buf.len()),
        };
        (needed + HEADER_AHEAD).min(READ_CHUNK)
    }

    /// Notes a frame of type `ty` with a body of `len` bytes on `stream`, for the
    /// one-bulk-stream mode: a large data frame of the stream whose large frame came last
    /// (or of the first stream to send one) starts or keeps the mode, a large frame of another
    /// stream ends it (bulk streams interleave), and more than [`SMALL_RUN_MAX`] other frames
    /// in a row end it.
    fn note_frame(&mut self, ty: FrameType, stream: u32, len: usize) {
        if ty == FrameType::Data && len >= READ_THROUGH_MIN {
            self.large = self.last_large.is_none_or(|id| id == stream);
            self.last_large = Some(stream);
            self.small_run = 0;
            return;
        }
        self.small_run = self.small_run.saturating_add(1);
        if self.small_run > SMALL_RUN_MAX {
            self.large = false;
            self.last_large = None;
        }
    }

    /// Whether the driver should leave the link alone for this turn: the next bytes on it are
    /// the body of a data frame whose reader is about to run and can take them straight into
    /// its own buffer. Deferred once per piece of body ([`Defer::New`]); the same piece still
    /// next on a later turn is [`Defer::Again`] (the reader has not come for it yet), and the
    /// driver decides whether to wait longer. `wanted` asks the core
    /// ([`Connection::read_through_wanted`]), only when such a body is next.
    pub(crate) fn defer_to_reader(&mut self, wanted: impl FnOnce(u32) -> bool) -> Defer {
        let Some(body) = self.read_through_body() else {
            self.deferred = None;
            return Defer::No;
        };
        let key = (body.header.stream, body.remaining);
        if self.deferred == Some(key) {
            return Defer::Again(key.0);
        }
        if !wanted(body.header.stream) {
            return Defer::No;
        }
        self.deferred = Some(key);
        Defer::New(key.0)
    }

    /// The frame whose body the link's next bytes are, if a reader may read them through.
    fn read_through_body(&self) -> Option<Body> {
        if !self.large {
            return None;
        }
        self.body.filter(|b| {
            self.buf.is_empty() && b.header.ty == FrameType::Data && b.remaining >= READ_THROUGH_MIN
        })
    }

    /// Hands every complete frame in the read buffer (and the pieces of large data frames
    /// that have arrived) to the core; the streams the peer opened go to `accepted`.
    pub(crate) fn parse(&mut self, core: &mut Connection, now: Instant) -> Result<(), Violation> {
        loop {
            let body = match self.body {
                Some(body) => body,
                None => {
                    if self.buf.len() < HEADER_LEN {
                        break;
                    }
                    let mut raw = [0u8; HEADER_LEN];
                    raw.copy_from_slice(&self.buf[..HEADER_LEN]);
                    let header = Header::decode(&raw)?;
                    let len = core.on_header(&header)?;
                    self.buf.advance(HEADER_LEN);
                    if header.ty == FrameType::Fds {
                        // Its fds came with (or before) its first byte: they are here.
                        let announced = header.length as usize;
                        if self.fds.len() < announced {
                            return Err(Violation::MissingFds {
                                stream: header.stream,
                                announced: header.length,
                                arrived: self.fds.len(),
                            });
                        }
                        let fds: Vec<Fd> = self.fds.drain(..announced).collect();
                        core.on_fds(header.stream, fds, self.fds.len())?;
                        continue;
                    }
                    self.note_frame(header.ty, header.stream, len);
                    Body {
                        header,
                        remaining: len,
                        first: true,
                    }
                }
            };
            let take = body.remaining.min(self.buf.len());
            if take < body.remaining && take < PIECE_MIN {
                // Wait for more, unless the rest may go straight to its reader: then hand on
                // what is here, so that nothing read stands before the rest. A piece the
                // read took past a header ([`HEADER_AHEAD`]) is always handed on: its reader,
                // woken by it, may then read the rest through whenever it comes.
                let through = self.large
                    && body.header.ty == FrameType::Data
                    && body.remaining - take >= READ_THROUGH_MIN
                    && (take <= HEADER_AHEAD || core.read_through_wanted(body.header.stream));
                if take == 0 || !through {
                    self.body = Some(body);
                    break;
                }
            }
            let piece = body.piece(take);
            let bytes = if (CORE_COPIES_BELOW..COPY_BELOW).contains(&take) {
                let copy = BytesMut::from(&self.buf[..take]);
                self.buf.advance(take);
                copy
            } else {
                self.buf.split_to(take)
            };
            self.body = body.after(take);
            core.on_frame(piece, bytes, now)?;
        }
        while let Some(id) = core.next_accepted() {
            self.accepted.push(id);
        }
        Ok(())
    }

    /// Whether the reader of stream `id` may read the link's next bytes through.
    pub(crate) fn may_read_through(&self, id: u32) -> bool {
        self.read_through_body()
            .is_some_and(|b| b.header.stream == id && self.failed.is_none())
    }

    /// The read-through: if the link's next bytes are the body of a data frame on stream
    /// `id`, reads up to the end of that body (and at most what `dst` has room for) straight
    /// into `dst`, with `cx` (the driver's: a link with nothing to read wakes the driver,
    /// which reads on), and has the core count them as received and read. `dst`'s room may
    /// be uninitialised.
    ///
    /// A read that takes the body to its end takes what follows it on the link too, at most
    /// `ahead` bytes (the next frame header, and the small frames or the start of the body
    /// after it), in the same system call where the link can, else in a second read, and
    /// parses them: the reader, not the driver, reads the header of the frame after a body,
    /// so a bulk stream's next body is ready to be read through with nobody woken.
    ///
    /// A violation (of the piece read, or of the frames after it) or a failed read is kept
    /// for the driver (`failed`), which ends the session.
    pub(crate) fn read_through(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
        ahead: usize,
        core: &Core,
        now: Instant,
    ) -> Through {
        let Some(body) = self.read_through_body() else {
            return Through::NotHere;
        };
        if body.header.stream != id || self.failed.is_some() {
            return Through::NotHere;
        }
        let max = body.remaining.min(dst.remaining());
        let ahead = if max == body.remaining { ahead } else { 0 };
        if ahead > 0 {
            self.make_room(ahead);
        }
        let both = match ahead {
            0 => None,
            _ => self
                .io
                .poll_read_into_and_ahead(cx, dst, max, &mut self.buf, ahead),
        };
        let one_by_one = both.is_none() && ahead > 0;
        let read = both.unwrap_or_else(|| {
            self.io
                .poll_read_into(cx, dst, max, &mut self.fds)
                .map_ok(|n| ReadAhead {
                    into: n,
                    ahead: 0,
                    drained: false,
                })
        });
        let mut read = match read {
            // The end of the link: the driver reads it again and ends the session.
            Poll::Ready(Ok(r)) if r.into == 0 => return Through::Driver,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(e)) => {
                self.failed = Some(Failed::Io(e));
                return Through::Driver;
            }
            Poll::Pending => return Through::Pending,
        };
        self.last_read = tokio::time::Instant::now();
        let ended_body = read.into == body.remaining;
        // The end of the link, or a failure, met by the read of what follows: for the driver.
        let mut for_driver = false;
        if one_by_one && ended_body {
            match self.io.poll_read(cx, &mut self.buf, ahead, &mut self.fds) {
                Poll::Ready(Ok(0)) => for_driver = true,
                Poll::Ready(Ok(n)) => read.ahead = n,
                Poll::Ready(Err(e)) => {
                    self.failed = Some(Failed::Io(e));
                    for_driver = true;
                }
                Poll::Pending => read.drained = true,
            }
        }
        let piece = body.piece(read.into);
        self.body = body.after(read.into);
        let mut core = core.lock();
        if let Err(v) = core.on_read_through(piece, now) {
            self.failed = Some(Failed::Violation(v));
            return Through::Driver;
        }
        if read.ahead > 0 {
            if let Err(v) = self.parse(&mut core, now) {
                self.failed = Some(Failed::Violation(v));
            }
        }
        drop(core);
        Through::Read {
            n: read.into,
            ended_body,
            drained: read.drained,
            for_driver: for_driver
                || self.failed.is_some()
                || !self.accepted.is_empty()
                || !self.fds.is_empty(),
        }
    }
}

/// Whether the driver leaves the link's next bytes to a reader (see
/// [`Inbound::defer_to_reader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Defer {
    /// No: the driver reads on.
    No,
    /// Yes, for the first time for this piece of body: the reader of this stream was woken.
    New(u32),
    /// The piece of body left to the reader of this stream is still next on the link.
    Again(u32),
}

/// How a read-through went.
pub(crate) enum Through {
    /// The link's next bytes are not a body this reader may take.
    NotHere,
    /// `n` bytes were read into the reader's buffer and counted as read.
    Read {
        n: usize,
        /// They were the last of their frame's body.
        ended_body: bool,
        /// The read found the link drained: the driver is woken by its next bytes.
        drained: bool,
        /// The read parsed what the driver must act on (streams the peer opened, fds), or
        /// met the end of the link, a failure or a violation.
        for_driver: bool,
    },
    /// The link has nothing yet; the driver is woken when it has.
    Pending,
    /// The link ended or failed, or the peer violated the protocol: the driver must run to
    /// end the session.
    Driver,
}
