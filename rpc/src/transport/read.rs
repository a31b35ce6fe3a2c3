//! The read path: the peer's preamble and the [`FrameReader`].
//!
//! The reader allocates only for bytes that arrived and gives each frame a
//! completion deadline once it has begun.

use std::{io, time::Duration};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    time::Instant,
};

use crate::{
    config::Config,
    error::Error,
    wire::{Frame, Header, LEN_PREFIX, MAX_TIMEOUT, PREAMBLE, VERSION},
};

/// Reads the peer's preamble; any mismatch is a typed error.
pub(crate) async fn read_preamble<R: AsyncRead + Unpin>(io: &mut R) -> Result<(), Error> {
    let mut got = [0u8; PREAMBLE.len()];
    io.read_exact(&mut got).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "conn closed during the rpc preamble",
            ))
        } else {
            Error::Io(e)
        }
    })?;
    if got[..PREAMBLE.len() - 1] != PREAMBLE[..PREAMBLE.len() - 1] {
        return Err(Error::BadPreamble { got: got.to_vec() });
    }
    if got[PREAMBLE.len() - 1] != VERSION {
        return Err(Error::VersionMismatch {
            ours: VERSION,
            theirs: got[PREAMBLE.len() - 1],
        });
    }
    Ok(())
}

/// Reads length-prefixed frames.
///
/// Small frames are read, many per syscall, into one buffer and handed out
/// as shared slices of it. A large frame is read into a buffer of its own,
/// taken from a pool: a pooled buffer is reused as soon as every view of its
/// previous frame has been dropped, so a steady stream of large messages
/// allocates (and page-faults in) nothing new, even while its consumer holds
/// a window of them (a file read's chunks): the pool keeps up to
/// [`BIG_POOL`] buffers of at most [`BIG_POOL_BYTES`] in all. An idle conn
/// gives that memory back: once a wait between frames has lasted
/// [`BIG_IDLE`] with more than [`BIG_KEEP`] buffers pooled, it keeps only
/// [`BIG_KEEP`] free ones (the timer is armed only while the pool is above
/// that).
///
/// Memory follows the bytes that arrived, not the length a peer announces:
/// a new large-frame buffer starts small and doubles as the frame's bytes
/// come in, and each read is offered a bounded span of uninitialised spare
/// capacity (at most twice the previous read, within
/// [`READ_MIN`]..=[`READ_MAX`]). A conn type that zero-fills the span it
/// is offered (tokio-util's `Compat` does) therefore commits and clears
/// only about as much as it delivers. A frame must also complete within
/// the frame deadline once it has begun.
///
/// A conn known to write only the bytes it delivers (a mux channel, see
/// [`writes_only_what_it_delivers`]) is offered a large frame's whole rest
/// (up to [`READ_MAX`]) at once, into a buffer that holds the frame (up to
/// [`READ_MAX`] at first): a mux channel can then read the frame's bytes
/// straight from its link into that buffer, with no copy on the way.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    /// The previous shared read buffer, kept once frames read into it
    /// outlived it (a response its caller had not taken yet when the
    /// reader went on): when they are dropped, the next read goes into it
    /// instead of a new buffer. So sequential calls alternate between two
    /// buffers instead of allocating (and freeing) 64 KiB per call.
    spare: Option<BytesMut>,
    max: usize,
    /// Large-frame buffers kept for reuse (at most [`BIG_POOL`]), each with
    /// the size of its allocation.
    big: Vec<(BytesMut, usize)>,
    /// The sum of the allocation sizes in `big` (at most
    /// [`BIG_POOL_BYTES`]).
    pooled: usize,
    /// When the current wait between frames began, while more than
    /// [`BIG_KEEP`] buffers are pooled: kept across a cancelled
    /// [`FrameReader::next_frame`], cleared when bytes arrive.
    idle_since: Option<Instant>,
    /// A large frame being read: its buffer and its length.
    partial: Option<(BytesMut, usize)>,
    /// How long a begun frame may take to complete.
    frame_timeout: Duration,
    /// When the frame being read started being waited for; `None`
    /// between frames (an idle conn is not timed).
    started: Option<Instant>,
    /// Bytes to offer the next read.
    span: usize,
    /// Bytes of an over-limit frame still to be read and thrown away.
    skip: usize,
    /// The peer's announced `max_message_size` (0 until it arrives): a
    /// frame over our limit but within the peer's own was sent before the
    /// peer learned ours, and is answered alone ([`Incoming::TooLarge`]);
    /// any larger one ends the conn.
    peer_max: usize,
    /// The conn may write the whole span it is offered (zero-fill it, as
    /// tokio-util's `Compat` does), so spans follow what arrived.
    zero_fills: bool,
}

/// Whether `conn` writes only the bytes a read delivers into the room it is
/// offered (never zero-fills the rest): true for a mux
/// [`Conn`](netchan_mux::Conn), whose reads copy what its stream holds or
/// read the link straight into that room. Any other conn is assumed to
/// zero-fill, and its reader offers spans that follow what arrived.
pub(crate) fn writes_only_what_it_delivers<T: 'static>(conn: &T) -> bool {
    let any: &dyn std::any::Any = conn;
    any.is::<netchan_mux::Conn>()
}

/// What [`FrameReader::next_frame`] read.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A whole frame body.
    Frame(Bytes),
    /// A frame over the receiver's limit but within the limit the peer
    /// announced (so the peer may have sent it before it learned ours): only
    /// its first bytes, enough for the envelope header, are kept;
    /// the rest is read and dropped as it arrives, so its call can be
    /// answered alone.
    TooLarge {
        /// The first bytes of the body (at most [`TOO_LARGE_HEAD`]).
        head: Bytes,
        /// The announced body length.
        len: usize,
        /// The receiver's limit.
        max: usize,
    },
}

/// An over-limit message frame, as [`Incoming::decode`] reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Oversize {
    /// The announced body length.
    pub(crate) len: usize,
    /// The receiver's limit.
    pub(crate) max: usize,
}

impl Incoming {
    /// Decodes the frame. An over-limit frame comes back with its header
    /// and an empty payload, and its size: only a message (a `Request`,
    /// `Response` or `StreamItem`) can be answered alone, so any other kind
    /// fails with `FrameTooLarge`, as does a header not within the frame's
    /// first bytes.
    pub(crate) fn decode(&self) -> Result<(Frame<'_>, Option<Oversize>), Error> {
        match self {
            Incoming::Frame(body) => Ok((Frame::decode(body).map_err(Error::Malformed)?, None)),
            Incoming::TooLarge { head, len, max } => match Header::decode_head(head) {
                Ok(
                    header @ (Header::Request { .. }
                    | Header::Response { .. }
                    | Header::StreamItem { .. }),
                ) => Ok((
                    Frame {
                        header,
                        payload: Bytes::new(),
                    },
                    Some(Oversize {
                        len: *len,
                        max: *max,
                    }),
                )),
                _ => Err(Error::FrameTooLarge {
                    len: *len as u64,
                    max: *max,
                }),
            },
        }
    }
}

#[cfg(test)]
impl Incoming {
    /// The body of a whole frame; panics on an over-limit one.
    pub(super) fn body(self) -> Bytes {
        match self {
            Incoming::Frame(body) => body,
            other => panic!("expected a whole frame, got {other:?}"),
        }
    }
}

/// Most bytes of an over-limit frame kept to read its envelope header.
pub(crate) const TOO_LARGE_HEAD: usize = 4 << 10;

/// Read granularity for small frames.
const READ_CHUNK: usize = 64 << 10;
/// Frames longer than this get a buffer of their own; shorter ones are
/// slices of a shared read buffer (and keep all of it alive while held).
pub(crate) const BIG_FRAME: usize = 64 << 10;
/// Most large-frame buffers kept for reuse per conn: enough for a consumer
/// that holds a window of frames (a file read keeps up to 16 chunks of
/// 256 KiB in flight) while more arrive.
const BIG_POOL: usize = 32;
/// Most bytes of large-frame buffers kept for reuse per conn (a buffer that
/// would take the pool over this is dropped instead).
const BIG_POOL_BYTES: usize = 8 << 20;
/// Large-frame buffers an idle conn keeps.
const BIG_KEEP: usize = 2;
/// How long a wait between frames lasts before an idle conn trims its pool
/// to [`BIG_KEEP`] buffers.
const BIG_IDLE: Duration = Duration::from_secs(1);
/// Smallest span of spare capacity offered to one read.
const READ_MIN: usize = 4 << 10;
/// Largest span of spare capacity offered to one read.
const READ_MAX: usize = 512 << 10;
/// Initial capacity of a new large-frame buffer (it doubles as bytes
/// arrive, up to the frame's length).
const BIG_START: usize = 128 << 10;

fn eof_inside_frame(pending: usize) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("conn closed inside a frame ({pending} bytes pending)"),
    ))
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with `config`'s message limit and frame deadline.
    pub(crate) fn new(io: R, config: &Config) -> FrameReader<R> {
        FrameReader::with_limits(io, config.message_limit(), config.frame_timeout)
    }

    pub(super) fn with_limits(io: R, max: usize, frame_timeout: Duration) -> FrameReader<R> {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            spare: None,
            max,
            big: Vec::new(),
            pooled: 0,
            idle_since: None,
            partial: None,
            frame_timeout: frame_timeout.min(MAX_TIMEOUT),
            started: None,
            // Small at first: an idle conn over a zero-filling conn type
            // commits 4 KiB, not 64.
            span: READ_MIN,
            skip: 0,
            peer_max: 0,
            zero_fills: true,
        }
    }

    /// Records that the conn writes only the bytes it delivers (see
    /// [`writes_only_what_it_delivers`]): a large frame's reads are then
    /// offered its whole rest.
    pub(crate) fn writes_only_delivered(mut self, yes: bool) -> FrameReader<R> {
        self.zero_fills = !yes;
        self
    }

    /// Sets the peer's announced `max_message_size` (see
    /// [`Outbox::learn_peer_limit`](crate::transport::Outbox::learn_peer_limit)).
    pub(crate) fn set_peer_limit(&mut self, bytes: usize) {
        self.peer_max = bytes;
    }

    pub(crate) fn io_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// The next frame, or `None` at a clean end of stream. A length prefix
    /// over our limit but within the peer's announced one yields
    /// [`Incoming::TooLarge`] with the body's first bytes (the rest is
    /// dropped as it arrives, within the same frame deadline); any other
    /// over our limit fails with `FrameTooLarge` (nothing is allocated for
    /// it). Fails
    /// with `FrameTimeout` for a frame that does not complete within the
    /// frame deadline.
    ///
    /// Cancel-safe: bytes read so far stay buffered, and the frame deadline
    /// keeps running.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<Incoming>, Error> {
        loop {
            if self.skip > 0 {
                if !self.buf.is_empty() {
                    let n = self.skip.min(self.buf.len());
                    self.buf.advance(n);
                    self.skip -= n;
                    if self.skip == 0 {
                        self.started = None;
                    }
                    continue;
                }
                self.buf.reserve(READ_CHUNK);
                let started = *self.started.get_or_insert_with(Instant::now);
                let want = self.span.min(READ_CHUNK);
                let n = read_span(
                    &mut self.io,
                    &mut self.buf,
                    want,
                    deadline_after(started, self.frame_timeout),
                    self.frame_timeout,
                    0,
                )
                .await?;
                if n == 0 {
                    return Err(eof_inside_frame(self.skip));
                }
                self.span = next_span(n);
                continue;
            }
            if let Some((big, len)) = &mut self.partial {
                let len = *len;
                if big.len() >= len {
                    // The buffer starts at its allocation's start (see
                    // `big_buffer`), so this is the allocation's size.
                    let size = big.capacity();
                    let frame = big.split_to(len).freeze();
                    if let Some((big, _)) = self.partial.take() {
                        if self.big.len() < BIG_POOL && self.pooled + size <= BIG_POOL_BYTES {
                            self.big.push((big, size));
                            self.pooled += size;
                        }
                    }
                    self.started = None;
                    return Ok(Some(Incoming::Frame(frame)));
                }
                // Read at most the rest of this frame into its buffer,
                // growing it only as far as this read can fill.
                let offer = if self.zero_fills {
                    self.span.min(READ_MAX)
                } else {
                    READ_MAX
                };
                let want = (len - big.len()).min(offer);
                if big.capacity() - big.len() < want {
                    big.reserve(want.max(big.len().min(len - big.len())));
                }
                let received = LEN_PREFIX + big.len();
                let deadline = self.started.get_or_insert_with(Instant::now);
                let n = read_span(
                    &mut self.io,
                    big,
                    want,
                    deadline_after(*deadline, self.frame_timeout),
                    self.frame_timeout,
                    received,
                )
                .await?;
                if n == 0 {
                    return Err(eof_inside_frame(len - (received - LEN_PREFIX)));
                }
                self.span = next_span(n);
                continue;
            }
            if self.buf.len() >= LEN_PREFIX {
                let mut prefix = [0u8; LEN_PREFIX];
                prefix.copy_from_slice(&self.buf[..LEN_PREFIX]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len > self.max && len > self.peer_max {
                    return Err(Error::FrameTooLarge {
                        len: len as u64,
                        max: self.max,
                    });
                }
                if len > self.max {
                    let head = TOO_LARGE_HEAD.min(self.max);
                    if self.buf.len() >= LEN_PREFIX + head {
                        self.buf.advance(LEN_PREFIX);
                        let head = self.buf.split_to(head).freeze();
                        self.skip = len - head.len();
                        return Ok(Some(Incoming::TooLarge {
                            head,
                            len,
                            max: self.max,
                        }));
                    }
                    self.buf.reserve(LEN_PREFIX + head - self.buf.len());
                } else if self.buf.len() >= LEN_PREFIX + len {
                    self.buf.advance(LEN_PREFIX);
                    self.started = None;
                    return Ok(Some(Incoming::Frame(self.buf.split_to(len).freeze())));
                } else if len > BIG_FRAME {
                    // `len` was checked against the limit above.
                    self.buf.advance(LEN_PREFIX);
                    let mut big = self.big_buffer(len);
                    big.extend_from_slice(&self.buf);
                    self.buf.clear();
                    self.partial = Some((big, len));
                    continue;
                } else {
                    let need = LEN_PREFIX + len - self.buf.len();
                    self.buf.reserve(need.max(READ_CHUNK));
                }
            } else if self.buf.is_empty() {
                self.make_room();
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            // Between frames the conn may idle; inside one, the deadline runs.
            let deadline = if self.buf.is_empty() {
                None
            } else {
                let started = *self.started.get_or_insert_with(Instant::now);
                deadline_after(started, self.frame_timeout)
            };
            let want = self.span.min(READ_CHUNK);
            let received = self.buf.len();
            let read = read_span(
                &mut self.io,
                &mut self.buf,
                want,
                deadline,
                self.frame_timeout,
                received,
            );
            let n = if deadline.is_none() && self.big.len() > BIG_KEEP {
                // An idle conn gives back what its pool holds beyond
                // `BIG_KEEP` buffers.
                let since = *self.idle_since.get_or_insert_with(Instant::now);
                match since.checked_add(BIG_IDLE) {
                    Some(trim_at) => match tokio::time::timeout_at(trim_at, read).await {
                        Ok(n) => n?,
                        Err(_) => {
                            self.trim_pool();
                            continue;
                        }
                    },
                    None => read.await?,
                }
            } else {
                read.await?
            };
            self.idle_since = None;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(eof_inside_frame(self.buf.len()));
            }
            self.span = next_span(n);
        }
    }

    /// Gives the empty shared read buffer room for [`READ_CHUNK`] bytes:
    /// its own, if no frame read into it is still held; else the spare's,
    /// if none of its frames is; else a new buffer's (the old one becomes
    /// the spare, replacing one that frames still hold).
    fn make_room(&mut self) {
        if self.buf.try_reclaim(READ_CHUNK) {
            return;
        }
        if let Some(spare) = &mut self.spare {
            if spare.try_reclaim(READ_CHUNK) {
                std::mem::swap(&mut self.buf, spare);
                return;
            }
        }
        let held = std::mem::replace(&mut self.buf, BytesMut::with_capacity(READ_CHUNK));
        self.spare = Some(held);
    }

    /// An empty buffer for a `len`-byte frame, starting at its allocation's
    /// start: a pooled one whose previous frame is no longer referenced and
    /// that holds `len` bytes (reclaimed whole), or a new one of
    /// [`BIG_START`] bytes (grown as the frame arrives), or of up to
    /// [`READ_MAX`] bytes on a conn that writes only what it delivers (its
    /// first read may fill that much).
    fn big_buffer(&mut self, len: usize) -> BytesMut {
        let start = if self.zero_fills { BIG_START } else { READ_MAX };
        match self
            .big
            .iter_mut()
            .position(|(b, size)| *size >= len && b.try_reclaim(*size))
        {
            Some(i) => {
                let (big, size) = self.big.swap_remove(i);
                self.pooled -= size;
                big
            }
            None => BytesMut::with_capacity(len.min(start.max(self.buf.len()))),
        }
    }

    /// Keeps at most [`BIG_KEEP`] pooled buffers, free ones (no view of
    /// their last frame left); the others' memory goes back once their
    /// frames are dropped.
    fn trim_pool(&mut self) {
        let mut kept = 0;
        self.big.retain_mut(|(b, size)| {
            let keep = kept < BIG_KEEP && b.try_reclaim(*size);
            kept += usize::from(keep);
            keep
        });
        self.pooled = self.big.iter().map(|(_, size)| size).sum();
        self.idle_since = None;
    }
}

/// The deadline `timeout` after `started`, if it is representable.
fn deadline_after(started: Instant, timeout: Duration) -> Option<Instant> {
    started.checked_add(timeout)
}

/// The span to offer the read after one that delivered `n` bytes.
fn next_span(n: usize) -> usize {
    n.saturating_mul(2).clamp(READ_MIN, READ_MAX)
}

/// Reads once into the spare capacity of `dst`, offering the reader at
/// most `want` bytes of it (uninitialised, through tokio's `ReadBuf`), by
/// `deadline` if there is one. `received` is what arrived of the frame so
/// far, for the error.
async fn read_span<R: AsyncRead + Unpin>(
    io: &mut R,
    dst: &mut BytesMut,
    want: usize,
    deadline: Option<Instant>,
    frame_timeout: Duration,
    received: usize,
) -> Result<usize, Error> {
    let mut span = dst.limit(want);
    let read = io.read_buf(&mut span);
    let n = match deadline {
        None => read.await?,
        Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
            Ok(n) => n?,
            Err(_) => {
                return Err(Error::FrameTimeout {
                    after: frame_timeout,
                    received,
                })
            }
        },
    };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn oversize_length_prefix_is_rejected_before_reading_the_body() {
        let bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let mut r = FrameReader::with_limits(bytes, 1024, Duration::from_secs(30));
        assert!(matches!(
            r.next_frame().await,
            Err(Error::FrameTooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        ));
    }

    /// A frame over our limit but within the peer's announced one is handed
    /// out as its head, and its rest is dropped however the bytes are cut,
    /// leaving the next frame whole.
    #[tokio::test]
    async fn a_frame_within_the_peers_limit_but_over_ours_is_skipped_after_its_head() {
        let mut wire = frame_bytes(b"a");
        let mut big = vec![3u8; 9000];
        big[0] = 9;
        wire.extend(frame_bytes(&big));
        wire.extend(frame_bytes(b"b"));
        for sizes in [vec![1], vec![700, 3, 5000], vec![100_000]] {
            let io = ZeroFilling::new(cut(&wire, &sizes.repeat(40))).then_eof();
            let mut r = FrameReader::with_limits(io, 1024, Duration::from_secs(30));
            r.set_peer_limit(16 << 10);
            assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], b"a");
            match r.next_frame().await.unwrap().unwrap() {
                Incoming::TooLarge { head, len, max } => {
                    assert_eq!((head.len(), len, max), (1024, 9000, 1024));
                    assert_eq!(head[0], 9);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], b"b");
            assert!(r.next_frame().await.unwrap().is_none());
        }
    }

    fn frame_bytes(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    /// Replays `chunks` (as much of each as fits a read), then stays
    /// pending; zero-fills the span it is offered before each read, as
    /// tokio-util's `Compat` does, and records each span and delivery.
    struct ZeroFilling {
        chunks: std::collections::VecDeque<Vec<u8>>,
        spans: Vec<usize>,
        delivered: Vec<usize>,
        /// End of stream after the chunks instead of pending forever.
        eof: bool,
    }

    impl ZeroFilling {
        fn new(chunks: Vec<Vec<u8>>) -> ZeroFilling {
            ZeroFilling {
                chunks: chunks.into(),
                spans: Vec::new(),
                delivered: Vec::new(),
                eof: false,
            }
        }

        fn then_eof(mut self) -> ZeroFilling {
            self.eof = true;
            self
        }
    }

    impl AsyncRead for ZeroFilling {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let span = buf.remaining();
            self.spans.push(span);
            buf.initialize_unfilled();
            match self.chunks.pop_front() {
                Some(mut chunk) => {
                    let n = chunk.len().min(span);
                    buf.put_slice(&chunk[..n]);
                    self.delivered.push(n);
                    if n < chunk.len() {
                        self.chunks.push_front(chunk.split_off(n));
                    }
                    std::task::Poll::Ready(Ok(()))
                }
                None if self.eof => std::task::Poll::Ready(Ok(())),
                None => std::task::Poll::Pending,
            }
        }
    }

    /// `wire` cut into pieces of the given sizes (the last takes the rest).
    fn cut(wire: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut rest = wire;
        for &size in sizes {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at(size.clamp(1, rest.len()));
            chunks.push(head.to_vec());
            rest = tail;
        }
        if !rest.is_empty() {
            chunks.push(rest.to_vec());
        }
        chunks
    }

    /// A frame body: small, around the large-frame threshold, or large.
    fn arb_body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        (
            prop_oneof![0usize..200, 60_000usize..70_000, 100_000usize..300_000],
            any::<u8>(),
        )
            .prop_map(|(len, fill)| {
                let mut body = vec![fill; len];
                if let Some(first) = body.first_mut() {
                    *first = (len % 251) as u8;
                }
                body
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// Fuzz target for the envelope decoder's input side: any frames,
        /// cut anywhere, read back exactly, and the reader never holds much
        /// more than it was given.
        #[test]
        fn frames_read_back_exactly_however_the_bytes_are_cut(
            bodies in proptest::collection::vec(arb_body(), 1..6),
            sizes in proptest::collection::vec(1usize..150_000, 0..40),
        ) {
            let mut wire = Vec::new();
            for body in &bodies {
                wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
                wire.extend_from_slice(body);
            }
            let io = ZeroFilling::new(cut(&wire, &sizes)).then_eof();
            let mut r = FrameReader::with_limits(io, 1 << 20, Duration::from_secs(30));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                for body in &bodies {
                    let frame = r.next_frame().await.unwrap().unwrap().body();
                    assert!(frame[..] == body[..], "frame of {} bytes differs", body.len());
                    let offered: usize = r.io.spans.iter().sum();
                    let arrived: usize = r.io.delivered.iter().sum();
                    assert!(offered <= 2 * arrived + READ_CHUNK + READ_MIN * r.io.spans.len(),
                        "offered {offered} bytes for {arrived}");
                }
                assert!(r.next_frame().await.unwrap().is_none());
            });
        }

        /// Fuzz target: arbitrary bytes through the reader and the envelope
        /// decoder never panic; every outcome is a frame, a clean end or a
        /// typed error, and a large frame's buffer follows what arrived.
        #[test]
        fn arbitrary_bytes_through_reader_and_decoder_end_in_typed_outcomes(
            wire in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            sizes in proptest::collection::vec(1usize..512, 0..16),
        ) {
            let io = ZeroFilling::new(cut(&wire, &sizes)).then_eof();
            let mut r = FrameReader::with_limits(io, 1 << 20, Duration::from_secs(30));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                // Each frame takes at least 4 bytes, so this loop is bounded.
                for _ in 0..=wire.len() / LEN_PREFIX {
                    match r.next_frame().await {
                        Ok(Some(Incoming::Frame(body))) => {
                            let _ = crate::wire::Frame::decode(&body);
                        }
                        Ok(Some(Incoming::TooLarge { head, .. })) => {
                            assert!(head.len() <= TOO_LARGE_HEAD);
                            let _ = crate::wire::Header::decode_head(&head);
                        }
                        Ok(None) => return,
                        Err(Error::FrameTooLarge { .. }) | Err(Error::Io(_)) => {
                            if let Some((big, _)) = &r.partial {
                                assert!(big.capacity() <= BIG_START.max(4 * wire.len()));
                            }
                            return;
                        }
                        Err(e) => panic!("unexpected error {e:?}"),
                    }
                }
                panic!("the reader did not finish {} bytes", wire.len());
            });
        }
    }

    /// Regression: a 16 MiB length prefix and one byte made the reader
    /// reserve 16 MiB and offer all of it to every read, which a zero-filling
    /// conn type committed (issue 7, case 1).
    #[tokio::test]
    async fn a_huge_announced_frame_gets_memory_only_for_bytes_that_arrived() {
        let mut first = (16u32 << 20).to_be_bytes().to_vec();
        first.push(1);
        let io = ZeroFilling::new(vec![first, vec![2; 3000]]);
        let mut r = FrameReader::with_limits(io, 16 << 20, Duration::from_secs(30));
        assert!(futures::FutureExt::now_or_never(r.next_frame()).is_none());
        let (big, len) = r.partial.as_ref().expect("a large frame in progress");
        assert_eq!((big.len(), *len), (3001, 16 << 20));
        assert!(big.capacity() <= BIG_START, "{} reserved", big.capacity());
        let zeroed: usize = r.io.spans.iter().sum();
        assert!(
            zeroed <= READ_CHUNK + 3 * READ_MIN,
            "{zeroed} bytes zero-filled"
        );
    }

    #[tokio::test]
    async fn each_read_is_offered_at_most_twice_what_the_previous_one_delivered() {
        let mut wire = (300_000u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&[5; 100]);
        let mut chunks = vec![wire];
        chunks.extend((0..3).map(|_| vec![5u8; 1000]));
        chunks.push(vec![5u8; 296_900]);
        let mut r =
            FrameReader::with_limits(ZeroFilling::new(chunks), 1 << 20, Duration::from_secs(30));
        let frame = r.next_frame().await.unwrap().unwrap().body();
        assert!(frame.len() == 300_000 && frame.iter().all(|&b| b == 5));
        let (spans, delivered) = (&r.io.spans, &r.io.delivered);
        assert_eq!(spans[0], READ_MIN);
        for i in 1..spans.len() {
            assert!(
                spans[i] <= (2 * delivered[i - 1]).max(READ_MIN),
                "read {i}: offered {} after {} arrived",
                spans[i],
                delivered[i - 1]
            );
        }
        // The span grows back as reads fill it, up to the maximum.
        assert!(spans.contains(&READ_MAX) || spans.iter().max() > Some(&65_536));
        assert_eq!(next_span(usize::MAX), READ_MAX);
    }

    /// A conn that writes only what it delivers (a mux channel) is offered a
    /// large frame's whole rest at once, into a buffer that holds it, even
    /// after a read that delivered a few bytes: so a mux channel can read
    /// the frame straight from its link into that buffer.
    #[tokio::test]
    async fn a_conn_that_writes_only_what_it_delivers_is_offered_a_large_frames_rest() {
        const LEN: usize = 300_000;
        let mut first = (LEN as u32).to_be_bytes().to_vec();
        first.extend_from_slice(&[7; 10]);
        let chunks = vec![first, vec![7u8; LEN - 10], frame_bytes(b"after")];
        let mut r = FrameReader::with_limits(
            ZeroFilling::new(chunks).then_eof(),
            1 << 20,
            Duration::from_secs(30),
        )
        .writes_only_delivered(true);
        let frame = r.next_frame().await.unwrap().unwrap().body();
        assert!(frame.len() == LEN && frame.iter().all(|&b| b == 7));
        assert_eq!(r.io.delivered[..2], [14, LEN - 10]);
        assert_eq!(
            r.io.spans[1],
            LEN - 10,
            "the frame's whole rest offered at once"
        );
        assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], b"after");
        assert!(r.next_frame().await.unwrap().is_none());

        // Any other conn is offered a span that follows what arrived.
        let mut first = (LEN as u32).to_be_bytes().to_vec();
        first.extend_from_slice(&[7; 10]);
        let chunks = vec![first, vec![7u8; LEN - 10]];
        let mut r = FrameReader::with_limits(
            ZeroFilling::new(chunks).then_eof(),
            1 << 20,
            Duration::from_secs(30),
        );
        let frame = r.next_frame().await.unwrap().unwrap().body();
        assert_eq!(frame.len(), LEN);
        assert_eq!(r.io.spans[1], READ_MIN);
    }

    #[tokio::test]
    async fn only_a_mux_conn_counts_as_writing_only_what_it_delivers() {
        let (a, _b) = tokio::io::duplex(64);
        assert!(!writes_only_what_it_delivers(&a));
        assert!(!writes_only_what_it_delivers(&&[0u8][..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_trickles_in_hits_the_frame_deadline() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = FrameReader::with_limits(rx, 1024, Duration::from_secs(5));
        let start = Instant::now();
        tx.write_all(&[0, 0, 0, 100, 1]).await.unwrap();
        let trickle = tokio::spawn(async move {
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tx.write_all(&[1]).await.is_err() {
                    break;
                }
            }
        });
        let err = r.next_frame().await.unwrap_err();
        assert!(
            matches!(err, Error::FrameTimeout { after, received } if after == Duration::from_secs(5) && (8..=11).contains(&received)),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_conn_is_not_timed_and_a_slow_frame_within_the_deadline_is_whole() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::with_limits(rx, 1 << 20, Duration::from_secs(5));
        let writer = tokio::spawn(async move {
            // Idle far longer than the frame deadline, then a large frame
            // in pieces over 4 s, then a small one the same way.
            tokio::time::sleep(Duration::from_secs(60)).await;
            tx.write_all(&200_000u32.to_be_bytes()).await.unwrap();
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.write_all(&[3; 50_000]).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
            tx.write_all(&[0, 0, 0, 2, 9]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
            tx.write_all(&[9]).await.unwrap();
            tx
        });
        let big = r.next_frame().await.unwrap().unwrap().body();
        assert!(big.len() == 200_000 && big.iter().all(|&b| b == 3));
        assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], &[9, 9]);
        drop(writer.await.unwrap());
        assert!(r.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_are_split_and_eof_mid_frame_is_an_error() {
        let bytes: &[u8] = &[0, 0, 0, 2, b'h', b'i', 0, 0, 0, 1];
        let mut r = FrameReader::with_limits(bytes, 1024, Duration::from_secs(30));
        assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], b"hi");
        assert!(matches!(r.next_frame().await, Err(Error::Io(_))));
    }

    #[tokio::test]
    async fn large_frames_reuse_their_buffer_once_released() {
        let mut wire = Vec::new();
        for fill in [1u8, 2, 3] {
            wire.extend_from_slice(&(200_000u32).to_be_bytes());
            wire.extend_from_slice(&vec![fill; 200_000]);
        }
        wire.extend_from_slice(&[0, 0, 0, 1, 9]);
        let mut r = FrameReader::with_limits(&wire[..], 1 << 20, Duration::from_secs(30));
        let first = r.next_frame().await.unwrap().unwrap().body();
        assert!(first.iter().all(|&b| b == 1) && first.len() == 200_000);
        let first_ptr = first.as_ptr();
        drop(first);
        let second = r.next_frame().await.unwrap().unwrap().body();
        assert!(second.iter().all(|&b| b == 2));
        assert_eq!(second.as_ptr(), first_ptr, "the released buffer is reused");
        // While `second` is alive its buffer is not reused.
        let third = r.next_frame().await.unwrap().unwrap().body();
        assert!(third.iter().all(|&b| b == 3));
        assert_ne!(third.as_ptr(), second.as_ptr());
        assert_eq!(&r.next_frame().await.unwrap().unwrap().body()[..], &[9]);
        assert!(r.next_frame().await.unwrap().is_none());
    }

    /// A consumer that holds a window of large frames (a file read's
    /// chunks) and then drops them gets the next window in the same
    /// buffers, and the pool stays within its byte bound.
    #[tokio::test]
    async fn a_window_of_held_large_frames_is_read_into_pooled_buffers_once_dropped() {
        const WINDOW: usize = 16;
        let mut wire = Vec::new();
        for i in 0..3 * WINDOW {
            wire.extend_from_slice(&frame_bytes(&vec![i as u8; 200_000]));
        }
        for _ in 0..12 {
            wire.extend_from_slice(&frame_bytes(&vec![7; 1 << 20]));
        }
        let mut r = FrameReader::with_limits(&wire[..], 2 << 20, Duration::from_secs(30));
        let mut first = Vec::new();
        for i in 0..WINDOW {
            let frame = r.next_frame().await.unwrap().unwrap().body();
            assert!(frame.len() == 200_000 && frame.iter().all(|&b| b == i as u8));
            first.push(frame);
        }
        let ptrs: Vec<*const u8> = first.iter().map(|f| f.as_ptr()).collect();
        drop(first);
        for window in 1..3 {
            let mut held = Vec::new();
            for i in 0..WINDOW {
                let frame = r.next_frame().await.unwrap().unwrap().body();
                assert!(frame.iter().all(|&b| b == (window * WINDOW + i) as u8));
                assert!(ptrs.contains(&frame.as_ptr()), "frame {i}: a new buffer");
                held.push(frame);
            }
        }
        // Frames of 1 MiB, all held: the pool keeps only what fits its bound.
        let mut held = Vec::new();
        for _ in 0..12 {
            held.push(r.next_frame().await.unwrap().unwrap().body());
        }
        assert!(r.big.len() <= BIG_POOL);
        assert!(r.pooled <= BIG_POOL_BYTES, "{} bytes pooled", r.pooled);
        assert_eq!(r.pooled, r.big.iter().map(|(_, size)| size).sum::<usize>());
        assert!(r.next_frame().await.unwrap().is_none());
    }

    /// An idle conn keeps at most `BIG_KEEP` large-frame buffers once a wait
    /// between frames has lasted `BIG_IDLE`, even when that wait is
    /// cancelled and resumed; a conn that keeps receiving keeps its pool.
    #[tokio::test(start_paused = true)]
    async fn an_idle_conn_trims_its_large_frame_pool_after_a_second() {
        let (mut tx, rx) = tokio::io::duplex(4 << 20);
        let mut r = FrameReader::with_limits(rx, 1 << 20, Duration::from_secs(30));
        for i in 0..6u8 {
            tx.write_all(&frame_bytes(&vec![i; 200_000])).await.unwrap();
        }
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(r.next_frame().await.unwrap().unwrap().body());
        }
        drop(held);
        assert_eq!(r.big.len(), 6);
        let start = Instant::now();
        let wait = tokio::time::timeout(Duration::from_millis(900), r.next_frame());
        assert!(wait.await.is_err(), "no frame was sent");
        assert_eq!(r.big.len(), 6, "not trimmed before {BIG_IDLE:?}");
        let wait = tokio::time::timeout(Duration::from_secs(5), r.next_frame());
        assert!(wait.await.is_err(), "no frame was sent");
        assert_eq!(r.big.len(), BIG_KEEP);
        assert_eq!(r.pooled, r.big.iter().map(|(_, size)| size).sum::<usize>());
        assert!(start.elapsed() >= BIG_IDLE);
        // The kept buffers are free and take the next frames.
        let kept: Vec<*const u8> = r.big.iter().map(|(b, _)| b.as_ptr()).collect();
        tx.write_all(&frame_bytes(&[9; 200_000])).await.unwrap();
        let frame = r.next_frame().await.unwrap().unwrap().body();
        assert!(frame.iter().all(|&b| b == 9));
        assert!(kept.contains(&frame.as_ptr()), "a kept buffer takes it");
        assert_eq!(r.big.len(), BIG_KEEP);
        drop((frame, tx));
        assert!(r.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn preamble_checks_magic_and_version() {
        let mut ok: &[u8] = &PREAMBLE;
        read_preamble(&mut ok).await.unwrap();
        let mut wrong_version: &[u8] = b"NCRPC\x09";
        assert!(matches!(
            read_preamble(&mut wrong_version).await,
            Err(Error::VersionMismatch {
                ours: VERSION,
                theirs: 9
            })
        ));
        let mut http: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_preamble(&mut http).await,
            Err(Error::BadPreamble { .. })
        ));
    }
}
