//! Frame I/O shared by clients and servers: the batching [`Outbox`] and its
//! writer task, and the [`FrameReader`].
//!
//! Every sender on a conn appends its encoded frame to one shared buffer
//! under a short lock; a single writer task swaps the whole buffer out and
//! writes it with one `write_all`, so frames queued while a write is in
//! progress go out together in the next one (few syscalls under load). The
//! two buffers are swapped back and forth and keep their capacity, so the
//! steady state allocates nothing.

use std::{
    io::{self, IoSlice, Write},
    pin::pin,
    sync::{Mutex, MutexGuard},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::Notify,
};

use crate::{
    codec::{self, CodecError},
    wire::{LEN_PREFIX, PREAMBLE, VERSION},
    Config, Error,
};

/// Frames queued for the writer.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the writer (one waiter; `notify_one` keeps a permit, so a push
    /// between the writer's check and its wait is not lost).
    wake_writer: Notify,
    /// Wakes senders waiting for room (all of them, after each swap).
    room: Notify,
    high_water: usize,
    max_message: usize,
}

struct OutState {
    /// Encoded frames, except large shared byte blocks (see `segments`).
    buf: Vec<u8>,
    /// Large [`ByteBuf`](crate::ByteBuf) contents queued by reference, each
    /// to be written at its offset in `buf` (gather write, no copy).
    segments: Vec<Segment>,
    /// Total bytes in `segments`.
    segment_bytes: usize,
    closed: bool,
}

struct Segment {
    at: usize,
    bytes: Bytes,
}

impl OutState {
    fn queued(&self) -> usize {
        self.buf.len() + self.segment_bytes
    }
}

/// Blocks at least this large are queued by reference instead of copied.
const ZERO_COPY_MIN: usize = 32 << 10;

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
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.buf.truncate(self.start);
            for seg in self.state.segments.drain(self.segments..) {
                self.state.segment_bytes -= seg.bytes.len();
            }
        }
    }
}

impl Outbox {
    pub(crate) fn new(config: &Config) -> Outbox {
        Outbox {
            state: Mutex::new(OutState {
                buf: Vec::new(),
                segments: Vec::new(),
                segment_bytes: 0,
                closed: false,
            }),
            wake_writer: Notify::new(),
            room: Notify::new(),
            high_water: config.write_queue_bytes.max(1),
            max_message: config.message_limit(),
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
        let mut encode = Some(encode);
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            if let Some(res) = self.append(&mut encode, true) {
                return res;
            }
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
        self.append(&mut Some(encode), false)
            .unwrap_or(Err(Error::Closed))
    }

    fn append<F>(&self, encode: &mut Option<F>, wait_for_room: bool) -> Option<Result<(), Error>>
    where
        F: FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError>,
    {
        let mut st = self.lock();
        if st.closed {
            return Some(Err(Error::Closed));
        }
        if wait_for_room && st.queued() > 0 && st.queued() >= self.high_water {
            return None;
        }
        let encode = encode.take()?;
        let was_empty = st.queued() == 0;
        let start = st.buf.len();
        let mut rb = Rollback {
            start,
            segments: st.segments.len(),
            state: &mut st,
            armed: true,
        };
        rb.state.buf.extend_from_slice(&[0; LEN_PREFIX]);
        let mut w = FrameWriter {
            state: rb.state,
            len: 0,
            max: self.max_message,
            overflowed: false,
        };
        let res = encode(&mut w);
        let (len, overflowed) = (w.len, w.overflowed);
        match res {
            Ok(()) => {}
            Err(_) if overflowed => {
                return Some(Err(Error::MessageTooLarge {
                    max: self.max_message,
                }))
            }
            Err(e) => return Some(Err(Error::Encode(e))),
        }
        // Fits in u32: max_message is capped far below 4 GiB.
        rb.state.buf[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        rb.armed = false;
        drop(rb);
        drop(st);
        if was_empty {
            self.wake_writer.notify_one();
        }
        Some(Ok(()))
    }

    /// Refuses further frames; the writer sends what is queued, shuts the
    /// write side down and ends. Waiting senders fail with `Closed`.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake_writer.notify_one();
        self.room.notify_waiters();
    }

    /// The writer: sends the preamble, then batches until closed. Returns
    /// `Ok` after a graceful close. Not cancel-safe (a cancelled write may
    /// leave a partial frame on the wire), so cancel it only when the conn
    /// is being abandoned anyway.
    pub(crate) async fn run_writer<W>(&self, io: &mut W) -> Result<(), Error>
    where
        W: AsyncWrite + Unpin,
    {
        io.write_all(&PREAMBLE).await?;
        io.flush().await?;
        let mut spare: Vec<u8> = Vec::new();
        let mut spare_segments: Vec<Segment> = Vec::new();
        loop {
            let closed = {
                let mut st = self.lock();
                if st.queued() > 0 {
                    std::mem::swap(&mut st.buf, &mut spare);
                    std::mem::swap(&mut st.segments, &mut spare_segments);
                    st.segment_bytes = 0;
                }
                st.closed
            };
            if spare.is_empty() {
                if closed {
                    // Best effort: the peer may already be gone.
                    let _ = io.shutdown().await;
                    return Ok(());
                }
                self.wake_writer.notified().await;
                continue;
            }
            self.room.notify_waiters();
            if spare_segments.is_empty() {
                io.write_all(&spare).await?;
            } else {
                write_gathered(io, &spare, &spare_segments).await?;
                spare_segments.clear();
            }
            io.flush().await?;
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

/// Writes `buf` with each segment spliced in at its offset, using
/// vectored writes.
async fn write_gathered<W>(io: &mut W, buf: &[u8], segments: &[Segment]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
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
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

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
/// taken from a small pool: a pooled buffer is reused as soon as every view
/// of its previous frame has been dropped, so a steady stream of large
/// messages allocates (and page-faults in) nothing new.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
    big: Vec<BytesMut>,
    /// A large frame being read: its buffer and its length.
    partial: Option<(BytesMut, usize)>,
}

/// Read granularity for small frames.
const READ_CHUNK: usize = 64 << 10;
/// Frames longer than this get a buffer of their own; shorter ones are
/// slices of a shared read buffer (and keep all of it alive while held).
pub(crate) const BIG_FRAME: usize = 64 << 10;
/// Large-frame buffers kept for reuse.
const BIG_POOL: usize = 2;

fn eof_inside_frame(pending: usize) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("conn closed inside a frame ({pending} bytes pending)"),
    ))
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, max: usize) -> FrameReader<R> {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max,
            big: Vec::new(),
            partial: None,
        }
    }

    pub(crate) fn io_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// The next frame body, or `None` at a clean end of stream.
    ///
    /// Cancel-safe: bytes read so far stay buffered.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some((big, len)) = &mut self.partial {
                let len = *len;
                if big.len() >= len {
                    let frame = big.split_to(len).freeze();
                    if let Some((big, _)) = self.partial.take() {
                        if self.big.len() < BIG_POOL {
                            self.big.push(big);
                        }
                    }
                    return Ok(Some(frame));
                }
                // Read exactly the rest of this frame into its buffer.
                let want = (len - big.len()) as u64;
                let n = (&mut self.io).take(want).read_buf(big).await?;
                if n == 0 {
                    return Err(eof_inside_frame(want as usize));
                }
                continue;
            }
            if self.buf.len() >= LEN_PREFIX {
                let mut prefix = [0u8; LEN_PREFIX];
                prefix.copy_from_slice(&self.buf[..LEN_PREFIX]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len > self.max {
                    return Err(Error::FrameTooLarge {
                        len: len as u64,
                        max: self.max,
                    });
                }
                if self.buf.len() >= LEN_PREFIX + len {
                    self.buf.advance(LEN_PREFIX);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
                if len > BIG_FRAME {
                    // `len` was checked against the limit above.
                    self.buf.advance(LEN_PREFIX);
                    let mut big = self.big_buffer(len);
                    big.extend_from_slice(&self.buf);
                    self.buf.clear();
                    self.partial = Some((big, len));
                    continue;
                }
                let need = LEN_PREFIX + len - self.buf.len();
                self.buf.reserve(need.max(READ_CHUNK));
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(eof_inside_frame(self.buf.len()));
            }
        }
    }

    /// An empty buffer with room for `len` bytes: a pooled one whose
    /// previous frame is no longer referenced, or a new one.
    fn big_buffer(&mut self, len: usize) -> BytesMut {
        match self.big.iter_mut().position(|b| b.try_reclaim(len)) {
            Some(i) => self.big.swap_remove(i),
            None => BytesMut::with_capacity(len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversize_length_prefix_is_rejected_before_reading_the_body() {
        let bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let mut r = FrameReader::new(bytes, 1024);
        assert!(matches!(
            r.next_frame().await,
            Err(Error::FrameTooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        ));
    }

    #[tokio::test]
    async fn frames_are_split_and_eof_mid_frame_is_an_error() {
        let bytes: &[u8] = &[0, 0, 0, 2, b'h', b'i', 0, 0, 0, 1];
        let mut r = FrameReader::new(bytes, 1024);
        assert_eq!(&r.next_frame().await.unwrap().unwrap()[..], b"hi");
        assert!(matches!(r.next_frame().await, Err(Error::Io(_))));
    }

    /// Counts the `poll_write` calls that reach the conn.
    #[derive(Default)]
    struct CountingWriter {
        data: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
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

    #[tokio::test]
    async fn frames_queued_while_the_writer_is_busy_go_out_in_one_write() {
        let outbox = Outbox::new(&Config::default());
        for i in 0..100u32 {
            outbox.push(|w| codec::encode(w, &i, "n")).await.unwrap();
        }
        outbox.close();
        let mut conn = CountingWriter::default();
        outbox.run_writer(&mut conn).await.unwrap();
        // One write for the preamble, one for all 100 frames.
        assert_eq!(conn.writes, 2);
        let mut r = FrameReader::new(&conn.data[PREAMBLE.len()..], 1024);
        for i in 0..100u32 {
            let body = r.next_frame().await.unwrap().unwrap();
            assert_eq!(codec::decode::<u32>(&body, "n").unwrap(), i);
        }
        assert!(r.next_frame().await.unwrap().is_none());
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
        let mut wire = Vec::new();
        outbox.run_writer(&mut wire).await.unwrap();
        let mut want = PREAMBLE.to_vec();
        let mut body = Vec::new();
        codec::encode(&mut body, &(1u8, vec![5u8; 100_000], 2u8), "test").unwrap();
        want.extend_from_slice(&(body.len() as u32).to_be_bytes());
        want.extend_from_slice(&body);
        assert_eq!(wire, want);
    }

    #[tokio::test]
    async fn large_frames_reuse_their_buffer_once_released() {
        let mut wire = Vec::new();
        for fill in [1u8, 2, 3] {
            wire.extend_from_slice(&(200_000u32).to_be_bytes());
            wire.extend_from_slice(&vec![fill; 200_000]);
        }
        wire.extend_from_slice(&[0, 0, 0, 1, 9]);
        let mut r = FrameReader::new(&wire[..], 1 << 20);
        let first = r.next_frame().await.unwrap().unwrap();
        assert!(first.iter().all(|&b| b == 1) && first.len() == 200_000);
        let first_ptr = first.as_ptr();
        drop(first);
        let second = r.next_frame().await.unwrap().unwrap();
        assert!(second.iter().all(|&b| b == 2));
        assert_eq!(second.as_ptr(), first_ptr, "the released buffer is reused");
        // While `second` is alive its buffer is not reused.
        let third = r.next_frame().await.unwrap().unwrap();
        assert!(third.iter().all(|&b| b == 3));
        assert_ne!(third.as_ptr(), second.as_ptr());
        assert_eq!(&r.next_frame().await.unwrap().unwrap()[..], &[9]);
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

    #[test]
    fn oversize_messages_are_refused_and_leave_nothing_queued() {
        let outbox = Outbox::new(&Config::default().max_message_size(512));
        let err = outbox
            .push_now(|w| {
                w.write_all(&[0; 513]).map_err(|e| CodecError::Encode {
                    what: "test",
                    source: Box::new(e),
                })
            })
            .unwrap_err();
        assert!(matches!(err, Error::MessageTooLarge { max: 512 }));
        assert!(outbox.lock().buf.is_empty() && outbox.lock().segments.is_empty());
        outbox
            .push_now(|w| {
                w.write_all(&[7; 512]).map_err(|e| CodecError::Encode {
                    what: "test",
                    source: Box::new(e),
                })
            })
            .unwrap();
        assert_eq!(outbox.lock().buf, [&[0, 0, 2, 0][..], &[7; 512]].concat());
    }
}
