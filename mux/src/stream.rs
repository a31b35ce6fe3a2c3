//! `RawStream`: one yamux stream as tokio `AsyncRead + AsyncWrite`, straight on the core.
//!
//! A read copies from the stream's receive buffer into the caller's buffer (no zeroing, no
//! intermediate buffer), or, when the link's next bytes are a large body for this stream,
//! reads them from the link straight into the caller's buffer (read-through, no copy).
//!
//! A write sends at most one frame: straight from the caller's buffer (header and body in one
//! vectored write; the slices of a vectored write together in that one frame) when the link
//! is free; otherwise a large write waits for a contended or full link, and anything else is
//! copied into the session's output queue for the driver or the next writer.

use netchan_mux_proto::StreamError;

use crate::{
    error::CloseReason,
    shared::{Shared, StreamHandle},
};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this many bytes wait for a contended or full link (see
/// `Link::wait_for_link`, `Link::try_write_direct`) instead of being copied into the output
/// queue; smaller ones are copied (cheaper than the wait, and queued small frames are what
/// keeps a small message from waiting behind bulk data).
const LINK_WAIT_MIN: usize = 16 * 1024;

/// One yamux stream of a session, owned by one user (a handshake, then a `Conn`).
pub(crate) struct RawStream {
    handle: StreamHandle,
    /// The channel name for error messages (empty until the handshake named it).
    name: Arc<str>,
}

impl RawStream {
    pub(crate) fn new(handle: StreamHandle) -> RawStream {
        RawStream {
            handle,
            name: "".into(),
        }
    }

    pub(crate) fn set_name(&mut self, name: Arc<str>) {
        self.name = name;
    }

    pub(crate) fn id(&self) -> u32 {
        self.handle.id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Aborts the stream: the peer's reads and writes fail with `ConnectionReset`.
    pub(crate) fn reset(self) {
        self.handle.reset();
    }

    /// Unwraps into the stream handle.
    pub(crate) fn into_handle(self) -> StreamHandle {
        self.handle
    }

    fn error(&self, e: StreamError) -> io::Error {
        io_error(&self.name, &self.handle.shared, e)
    }
}

/// The `io::Error` a read, write or fd send on channel `name` meets for `e`: the one wording
/// of each stream error, for the `AsyncRead`/`AsyncWrite` side and for `ConnFds` alike.
pub(crate) fn io_error(name: &str, shared: &Shared, e: StreamError) -> io::Error {
    match e {
        StreamError::Reset => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("channel {name:?} was reset by the peer"),
        ),
        StreamError::WriteClosed => io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("channel {name:?}: write after shutdown"),
        ),
        StreamError::FdsUnsupported | StreamError::TooManyFds => io::Error::new(
            io::ErrorKind::Unsupported,
            format!("channel {name:?}: file descriptors cannot be sent here"),
        ),
        StreamError::SessionEnded => shared.reason().unwrap_or(CloseReason::Local).to_io_error(),
    }
}

impl AsyncRead for RawStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shared = &this.handle.shared;
        let max = buf.remaining();
        if let Some(result) =
            shared
                .link
                .try_read_through(&shared.core, this.handle.id, buf, cx.waker())
        {
            shared
                .link
                .after_read(this.handle.id, result.is_pending(), max);
            return result.map_err(|e| this.error(e));
        }
        let mut core = shared.core();
        let queued = core.out_bytes();
        let result = core.read(this.handle.id, max, cx.waker(), crate::io::now, |s| {
            buf.put_slice(s)
        });
        // A read may have queued a window update for the driver to send.
        let wake = core.out_bytes() != queued;
        drop(core);
        if wake {
            // Sent from this task if the link is free: the window update is what the peer's
            // writer is waiting for.
            shared.link.send_now(&shared.core);
        }
        shared
            .link
            .after_read(this.handle.id, result.is_pending(), max);
        match result {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.error(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl RawStream {
    /// Writes up to one frame of the concatenation of `bufs` (see the module docs).
    fn write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.handle.shared;
        // What one frame of a direct write can carry; the queued write copies the same.
        let bufs = &bufs[..bufs.len().min(crate::io::MAX_DIRECT_SLICES)];
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if let Some(result) = shared.link.try_write_direct(
            &shared.core,
            self.handle.id,
            bufs,
            len >= LINK_WAIT_MIN,
            cx.waker(),
        ) {
            return result.map_err(|e| self.error(e));
        }
        // A large write waits for a contended link rather than be copied into the queue.
        if len >= LINK_WAIT_MIN
            && shared
                .link
                .wait_for_link(&shared.core, self.handle.id, cx.waker())
        {
            return Poll::Pending;
        }
        let result = shared
            .core()
            .write_vectored(self.handle.id, bufs, cx.waker());
        match result {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    shared.link.send_now(&shared.core);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.error(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for RawStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, &[io::IoSlice::new(buf)])
    }

    /// One frame of the slices together (header and slices in one vectored write when the
    /// link is free), so a message written as several slices leaves as one frame.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued for the link; the driver sends them without delay.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shared = &this.handle.shared;
        let result = shared.core().finish(this.handle.id);
        shared.link.wake_driver();
        Poll::Ready(result.map_err(|e| this.error(e)))
    }
}

/// The wakes between a reader reading through and the driver.
#[cfg(test)]
mod wakes {
    use super::*;
    use crate::{
        config::Config,
        io::transport,
        shared::{Mode, Shared},
    };
    use netchan_mux_proto::{FrameType, Header, HEADER_LEN, SYN};
    use netchan_testkit::counting_waker;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;

    /// A server session over a duplex pipe of `pipe` bytes whose driver is not started: the
    /// test plays the driver by hand. Returns the peer's end and the session's core.
    fn hand_driven(pipe: usize) -> (tokio::io::DuplexStream, Arc<Shared>) {
        let (peer, ours) = tokio::io::duplex(pipe);
        let (read, write) = transport::split(ours);
        let shared = Shared::new(Config::default(), Mode::Server, read, write, false);
        (peer, Arc::new(shared))
    }

    /// The peer opens stream 1 with one byte; a driver turn (played with `driver_cx`) takes it
    /// and sends our ACK, which leaves the link free for a direct write. Our end of stream 1.
    async fn opened_by_peer(
        peer: &mut tokio::io::DuplexStream,
        shared: &Arc<Shared>,
        driver_cx: &mut Context<'_>,
    ) -> RawStream {
        let header = Header::new(FrameType::Data, SYN, 1, 1).encode();
        peer.write_all(&header).await.unwrap();
        peer.write_all(&[0]).await.unwrap();
        assert_eq!(driver_turn(shared, driver_cx), [1]);
        assert_eq!(
            shared.link.poll_write(&shared.core, driver_cx).unwrap(),
            (true, true)
        );
        RawStream::new(StreamHandle {
            id: 1,
            shared: shared.clone(),
        })
    }

    /// One turn of the driver's reading, by hand: reads what the link has (into the read
    /// buffer) and parses it. Returns the streams the peer opened.
    fn driver_turn(shared: &Shared, cx: &mut Context<'_>) -> Vec<u32> {
        // As the driver does on every turn (a wake takes the registration).
        shared.link.register_driver(cx.waker());
        shared.link.fill_and_parse(&shared.core, cx)
    }

    /// How a driver on a multi-thread runtime (played by hand) and the reader it leaves a
    /// body to end up (see [`deferred_body`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Then {
        /// The reader reads with room too small for a read-through.
        SmallRoom,
        /// Nobody comes for the body.
        NobodyComes,
        /// The reader reads with room for the body.
        ReaderReads,
    }

    /// The peer opens stream 1 and sends a 64 KiB data frame whose header and first KiB the
    /// driver reads; the rest is on the link when the driver, playing a multi-thread
    /// runtime's, leaves it to the reader instead of yielding to it. Then `then` happens;
    /// every byte reaches the reader in order, by the driver or straight from the link.
    async fn deferred_body(then: Then) {
        use crate::io::{Read, ReadTurn};
        const BODY: usize = 64 * 1024;
        const START: usize = 1024;
        let (mut peer, shared) = hand_driven(1 << 20);
        shared.link.set_multi_thread(true);
        let (driver, driver_wakes) = counting_waker();
        let mut driver_cx = Context::from_waker(&driver);
        let mut stream = opened_by_peer(&mut peer, &shared, &mut driver_cx).await;
        let (reader, _) = counting_waker();
        let mut reader_cx = Context::from_waker(&reader);
        let mut room = vec![0u8; BODY];
        let mut read = |stream: &mut RawStream, max: usize| {
            let mut buf = ReadBuf::new(&mut room[..max]);
            match Pin::new(stream).poll_read(&mut reader_cx, &mut buf) {
                Poll::Ready(Ok(())) => Some(buf.filled().to_vec()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => None,
            }
        };
        assert_eq!(
            read(&mut stream, BODY),
            Some(vec![0]),
            "the byte that opened it"
        );
        assert_eq!(read(&mut stream, BODY), None, "the reader waits");

        let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
        let header = Header::new(FrameType::Data, 0, 1, BODY as u32).encode();
        peer.write_all(&header).await.unwrap();
        peer.write_all(&body[..START]).await.unwrap();
        let mut turn = ReadTurn::new();
        let drive = |cx: &mut Context<'_>, turn: &mut ReadTurn| {
            shared.link.register_driver(&driver);
            shared.link.poll_read(&shared.core, cx, turn)
        };
        assert!(matches!(drive(&mut driver_cx, &mut turn), Read::Frames(_)));
        assert_eq!(shared.core().buffered(), START);
        peer.write_all(&body[START..]).await.unwrap();
        // The rest of the body is next on the link: left to the reader, which may take it
        // straight into its own buffer. Polled again, the driver still leaves it there.
        let wakes = driver_wakes.count();
        for _ in 0..2 {
            assert!(matches!(drive(&mut driver_cx, &mut turn), Read::Nothing));
        }
        assert_eq!(
            shared.core().buffered(),
            START,
            "the driver read none of it"
        );
        assert_eq!(driver_wakes.count(), wakes);

        let mut got = Vec::new();
        match then {
            Then::SmallRoom => {
                // The reader takes what is buffered, in room it cannot read a body through:
                // the driver is woken to read the body itself.
                got.extend(read(&mut stream, START).expect("bytes buffered"));
                assert_eq!(driver_wakes.count(), wakes + 1, "the reader declines");
            }
            Then::NobodyComes => {
                // Bounded: the grace is a millisecond of paused time.
                for _ in 0..10 {
                    if driver_wakes.count() > wakes {
                        break;
                    }
                    tokio::time::advance(std::time::Duration::from_millis(1)).await;
                    tokio::task::yield_now().await;
                }
                assert_eq!(driver_wakes.count(), wakes + 1, "the grace ran out");
            }
            Then::ReaderReads => {
                // The bytes buffered first (no decline: the reader comes back)...
                got.extend(read(&mut stream, BODY).expect("bytes buffered"));
                assert_eq!(driver_wakes.count(), wakes, "nothing for the driver yet");
                // ...then the rest straight from the link.
                got.extend(read(&mut stream, BODY).expect("read through"));
                assert_eq!(shared.link.read_through_bytes(), (BODY - START) as u64);
                assert_eq!(got, body);
                return;
            }
        }
        assert!(matches!(drive(&mut driver_cx, &mut turn), Read::Frames(_)));
        // Bounded: every read takes bytes the driver buffered.
        for _ in 0..BODY {
            match read(&mut stream, BODY) {
                Some(bytes) => got.extend(bytes),
                None => break,
            }
        }
        assert!(got == body, "every byte in order");
        assert_eq!(shared.link.read_through_bytes(), 0);
    }

    /// On a multi-thread runtime the driver does not yield to the reader it leaves a body
    /// to (a yield there unparks the other worker, a context switch or two per frame): a
    /// reader that cannot take the body through wakes it to read the body itself.
    #[tokio::test]
    async fn a_reader_that_cannot_read_a_body_through_gives_it_back_to_the_driver() {
        deferred_body(Then::SmallRoom).await;
    }

    /// ...and a reader that does not come holds the link for no longer than the grace.
    #[tokio::test(start_paused = true)]
    async fn a_body_left_to_a_reader_that_does_not_come_is_read_after_the_grace() {
        deferred_body(Then::NobodyComes).await;
    }

    /// ...and a reader that comes reads the body straight into its own buffer.
    #[tokio::test]
    async fn a_body_left_to_its_reader_is_read_straight_into_its_buffer() {
        deferred_body(Then::ReaderReads).await;
    }

    /// On a multi-thread runtime a yielding driver may come back only after its worker ran
    /// everything else it holds: a reader that ends a body wakes it all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_thread_runtime_a_yielding_driver_is_woken_after_a_body() {
        let (a, _b) = tokio::io::duplex(1024);
        let session = crate::Session::new(a, Mode::Client, Config::default());
        let link = &session.shared.link;
        assert!(link.wake_after_body());
        link.set_yielding(true);
        assert!(link.wake_after_body());
    }

    /// A reader that reads a body through to its end takes what follows it on the link in
    /// the same turn (the next frame header and the start of its body, `HEADER_AHEAD`), so
    /// the next body is ready to be read through with no turn of the driver; it wakes the
    /// driver all the same (this reader may not come back, and frames behind the body must
    /// not wait for it), unless it found the link drained. A read-through that leaves part of
    /// the body does not wake it. On a current-thread runtime a driver that yields to its
    /// readers is left to come back by itself.
    #[tokio::test]
    async fn a_read_through_that_ends_a_body_takes_the_next_header_and_wakes_the_driver() {
        // Not started: the test plays the driver (on a current-thread runtime). Our window
        // updates go out to the peer (unread here) without waking the driver.
        let (mut peer, shared) = hand_driven(1 << 20);
        let (driver, driver_wakes) = counting_waker();
        shared.link.register_driver(&driver);
        // Stream 1, opened by the peer: three large bodies (within the first window).
        const FIRST: usize = 160 * 1024;
        const NEXT: usize = 40 * 1024;
        let bodies = [(SYN, FIRST, 1u8), (0, NEXT, 2u8), (0, NEXT, 3u8)];
        for (flags, len, byte) in bodies {
            let header = Header::new(FrameType::Data, flags, 1, len as u32).encode();
            peer.write_all(&header).await.unwrap();
            peer.write_all(&vec![byte; len]).await.unwrap();
        }
        let mut driver_cx = Context::from_waker(&driver);
        let mut stream = RawStream::new(StreamHandle {
            id: 1,
            shared: shared.clone(),
        });
        let (reader, _) = counting_waker();
        let mut reader_cx = Context::from_waker(&reader);
        const ROOM: usize = 256 * 1024;
        let mut room = vec![0u8; ROOM];
        // A read into `max` bytes of room, which finds bytes there.
        let mut read = |stream: &mut RawStream, max: usize| {
            let mut buf = ReadBuf::new(&mut room[..max]);
            match Pin::new(stream).poll_read(&mut reader_cx, &mut buf) {
                Poll::Ready(Ok(())) => buf.filled().to_vec(),
                other => panic!("a read with bytes there: {other:?}"),
            }
        };

        // The driver reads a chunk: the header and the first part of the body, which it
        // hands to the stream; the rest of the body stays on the link.
        assert_eq!(driver_turn(&shared, &mut driver_cx), [1]);
        let mut first = read(&mut stream, ROOM);
        assert!(first.len() < FIRST, "the part the driver read");
        let through = |shared: &Shared| shared.link.read_through_bytes();
        assert_eq!(through(&shared), 0);

        // Part of the rest, straight from the link: no wake, the body goes on.
        let wakes = driver_wakes.count();
        first.extend(read(&mut stream, 32 * 1024));
        assert_eq!(through(&shared), 32 * 1024, "read through");
        assert_eq!(
            driver_wakes.count(),
            wakes,
            "the body goes on: nothing for the driver"
        );

        // The rest, to the body's end, while the driver yields to its readers: on this
        // current-thread runtime the yield brings it back, so nobody wakes it.
        shared.link.set_yielding(true);
        first.extend(read(&mut stream, ROOM));
        assert_eq!(first, vec![1u8; FIRST], "the whole first body");
        assert_eq!(
            driver_wakes.count(),
            wakes,
            "a yielding driver comes back by itself"
        );
        shared.link.set_yielding(false);

        // The next bodies, with no turn of the driver: the start of each came with the
        // header the read before took (at most `HEADER_AHEAD`, 256 bytes), the rest is read
        // through to the end, taking the next header again. The driver, not yielding, is
        // woken after the second body, with more on the link; after the third the link is
        // drained, and its next bytes wake the driver.
        for byte in [2u8, 3] {
            let before = through(&shared);
            let wakes = driver_wakes.count();
            let mut body = read(&mut stream, ROOM);
            assert!(
                !body.is_empty() && body.len() <= 256,
                "{} bytes read with the header",
                body.len()
            );
            body.extend(read(&mut stream, ROOM));
            assert_eq!(body, vec![byte; NEXT]);
            assert!(
                through(&shared) - before >= (NEXT - 256) as u64,
                "read through"
            );
            if byte == 2 {
                assert!(
                    driver_wakes.count() > wakes,
                    "the driver is woken to read on"
                );
            } else {
                assert_eq!(driver_wakes.count(), wakes, "the link was drained");
            }
        }
        let wakes = driver_wakes.count();
        let ping = Header::new(FrameType::Ping, SYN, 0, 7).encode();
        peer.write_all(&ping).await.unwrap();
        assert!(
            driver_wakes.count() > wakes,
            "the link's next bytes wake the driver"
        );
    }

    /// The small frames a bulk sender puts between its large bodies (an rpc message's
    /// envelope) come in with the header before them, and the bodies after them are still
    /// read through: the bulk stream's bytes are not copied out of the read buffer.
    #[tokio::test]
    async fn small_frames_between_large_bodies_keep_the_bodies_read_through() {
        // Not started: the test plays the driver.
        let (mut peer, shared) = hand_driven(1 << 20);
        let (driver, _) = counting_waker();
        shared.link.register_driver(&driver);
        const LARGE: usize = 48 * 1024;
        const SMALL: usize = 40;
        let mut frames = vec![(SYN, LARGE, 1u8)];
        for byte in 2..6u8 {
            frames.push((0, SMALL, byte));
            frames.push((0, LARGE, byte));
        }
        let mut sent = Vec::new();
        for &(flags, len, byte) in &frames {
            let header = Header::new(FrameType::Data, flags, 1, len as u32).encode();
            peer.write_all(&header).await.unwrap();
            peer.write_all(&vec![byte; len]).await.unwrap();
            sent.extend(vec![byte; len]);
        }
        let mut driver_cx = Context::from_waker(&driver);
        let mut stream = RawStream::new(StreamHandle {
            id: 1,
            shared: shared.clone(),
        });
        let (reader, _) = counting_waker();
        let mut reader_cx = Context::from_waker(&reader);
        let mut room = vec![0u8; 256 * 1024];
        assert_eq!(
            shared.link.fill_and_parse(&shared.core, &mut driver_cx),
            [1]
        );
        let mut got = Vec::new();
        // Bounded: every round reads at least one byte, or the driver reads a frame header.
        for _ in 0..64 {
            if got.len() == sent.len() {
                break;
            }
            let mut buf = ReadBuf::new(&mut room);
            match Pin::new(&mut stream).poll_read(&mut reader_cx, &mut buf) {
                Poll::Ready(Ok(())) => got.extend_from_slice(buf.filled()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => {
                    shared.link.register_driver(&driver);
                    shared.link.fill_and_parse(&shared.core, &mut driver_cx);
                }
            }
        }
        assert!(got == sent, "every byte in order");
        // The first read takes the first body and the start of the second (no bulk seen
        // yet); of each later body at most the 256 bytes read with its header
        // (`HEADER_AHEAD`) are not read through.
        let through = shared.link.read_through_bytes();
        let later = (3 * LARGE) as u64;
        assert!(
            through >= later - 3 * 256,
            "{through} bytes read through of {later}"
        );
    }

    /// On a multi-thread runtime a lone writer whose link is full waits for it, as a writer
    /// on a full socket does, instead of having its next buffer copied into the output
    /// queue; the driver, woken when the socket drains, finishes the frame in flight and
    /// wakes the writer, whose next write goes straight from its buffer again. Every byte
    /// arrives in order.
    #[tokio::test]
    async fn a_lone_writer_on_a_full_link_waits_instead_of_copying() {
        netchan_testkit::within(10, "a lone writer on a full link", async {
            use tokio::io::AsyncReadExt;
            const PIPE: usize = 16 * 1024;
            const WRITE: usize = 64 * 1024;
            // Not started: the test plays the driver.
            let (mut peer, shared) = hand_driven(PIPE);
            // The test plays the driver by hand on this thread, as on a multi-thread runtime.
            shared.link.set_multi_thread(true);
            let (driver, driver_wakes) = counting_waker();
            let mut driver_cx = Context::from_waker(&driver);
            let mut stream = opened_by_peer(&mut peer, &shared, &mut driver_cx).await;
            let (writer, writer_wakes) = counting_waker();
            let mut writer_cx = Context::from_waker(&writer);
            let first = vec![1u8; WRITE];
            let second = vec![2u8; WRITE];
            let mut write = |stream: &mut RawStream, buf: &[u8]| {
                Pin::new(stream).poll_write(&mut writer_cx, buf)
            };

            // The first write goes out directly; the link takes part of it.
            assert!(matches!(write(&mut stream, &first), Poll::Ready(Ok(WRITE))));
            // The second finds the link full: it waits, and nothing of it is copied.
            assert!(write(&mut stream, &second).is_pending());
            assert_eq!(shared.core().out_bytes(), 0, "nothing queued in the core");
            assert_eq!(writer_wakes.count(), 0);

            // The peer reads; the driver, woken as the link drains, finishes the first frame,
            // and the link, idle again, wakes the writer.
            let mut got = Vec::new();
            let mut buf = vec![0u8; PIPE];
            for _ in 0..64 {
                if writer_wakes.count() > 0 {
                    break;
                }
                let n = peer.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                assert!(driver_wakes.count() > 0, "the drained link woke the driver");
                shared.link.register_driver(&driver);
                shared
                    .link
                    .poll_write(&shared.core, &mut driver_cx)
                    .unwrap();
            }
            assert_eq!(writer_wakes.count(), 1, "woken once the link is free");
            assert!(matches!(
                write(&mut stream, &second),
                Poll::Ready(Ok(WRITE))
            ));

            // On the wire: ACK, then both frames whole and in order.
            while got.len() < 3 * HEADER_LEN + 2 * WRITE {
                let n = peer.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                shared.link.register_driver(&driver);
                shared
                    .link
                    .poll_write(&shared.core, &mut driver_cx)
                    .unwrap();
            }
            assert_eq!(got.len(), 3 * HEADER_LEN + 2 * WRITE);
            let frames = &got[HEADER_LEN..];
            let first_header = Header::new(FrameType::Data, 0, 1, WRITE as u32).encode();
            assert_eq!(frames[..HEADER_LEN], first_header);
            assert!(frames[HEADER_LEN..HEADER_LEN + WRITE]
                .iter()
                .all(|b| *b == 1));
            let rest = &frames[HEADER_LEN + WRITE..];
            assert_eq!(rest[..HEADER_LEN], first_header);
            assert!(rest[HEADER_LEN..].iter().all(|b| *b == 2));
        })
        .await;
    }

    /// A vectored write leaves as one frame holding its slices in order: straight from the
    /// caller's slices when the link is free (what the socket did not take copied, from the
    /// middle of a slice on), and copied into one queued frame when the link is busy.
    #[tokio::test]
    async fn a_vectored_write_leaves_as_one_frame() {
        netchan_testkit::within(10, "vectored writes", async {
            use tokio::io::AsyncReadExt;
            const PIPE: usize = 16 * 1024;
            // Not started: the test plays the driver (current-thread: a full link copies).
            let (mut peer, shared) = hand_driven(PIPE);
            let (driver, _) = counting_waker();
            let mut driver_cx = Context::from_waker(&driver);
            let mut stream = opened_by_peer(&mut peer, &shared, &mut driver_cx).await;
            let (writer, _) = counting_waker();
            let mut writer_cx = Context::from_waker(&writer);
            let message = |n: u8| [vec![n; 30], vec![n + 1; 40 * 1024], vec![n + 2; 5]];
            let (first, second) = (message(1), message(11));
            let len: usize = first.iter().map(Vec::len).sum();
            for parts in [&first, &second] {
                let slices: Vec<_> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
                let written = Pin::new(&mut stream).poll_write_vectored(&mut writer_cx, &slices);
                assert!(matches!(written, Poll::Ready(Ok(n)) if n == len));
            }
            // The first went straight to the link, which took part of it: the rest of it and
            // the whole second one are queued.
            assert!(shared.core().out_bytes() > 0, "the second one is queued");
            let mut got = Vec::new();
            let mut buf = vec![0u8; PIPE];
            let want = HEADER_LEN + 2 * (HEADER_LEN + len);
            while got.len() < want {
                shared.link.register_driver(&driver);
                shared
                    .link
                    .poll_write(&shared.core, &mut driver_cx)
                    .unwrap();
                let n = peer.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), want);
            // Our ACK of stream 1 (a window update), then the two frames.
            let frames = &got[HEADER_LEN..];
            let frame_header = Header::new(FrameType::Data, 0, 1, len as u32).encode();
            let mut at = 0;
            for parts in [&first, &second] {
                assert_eq!(frames[at..at + HEADER_LEN], frame_header, "one frame");
                at += HEADER_LEN;
                assert!(
                    frames[at..at + len] == parts.concat()[..],
                    "the slices in order"
                );
                at += len;
            }
        })
        .await;
    }

    /// Writers waiting for a full link are woken one at a time, first come first served,
    /// not all at once; a writer given the turn that does not come back for it (its write
    /// was dropped) holds the others up for no longer than the grace, and one whose stream
    /// goes passes the turn on at once.
    #[tokio::test(start_paused = true)]
    async fn waiting_writers_take_turns_and_a_turn_left_unused_passes_on() {
        netchan_testkit::within(10, "writers taking turns", async {
            use tokio::io::AsyncReadExt;
            const PIPE: usize = 16 * 1024;
            const WRITE: usize = 64 * 1024;
            // Not started: the test plays the driver, as on a multi-thread runtime.
            let (mut peer, shared) = hand_driven(PIPE);
            shared.link.set_multi_thread(true);
            let (driver, driver_wakes) = counting_waker();
            let mut driver_cx = Context::from_waker(&driver);
            // The peer opens streams 1, 3 and 5; the driver takes them and sends the ACKs.
            for id in [1, 3, 5] {
                let header = Header::new(FrameType::Data, SYN, id, 1).encode();
                peer.write_all(&header).await.unwrap();
                peer.write_all(&[0]).await.unwrap();
            }
            let mut opened = Vec::new();
            while opened.len() < 3 {
                opened.extend(driver_turn(&shared, &mut driver_cx));
            }
            assert_eq!(opened, [1, 3, 5]);
            let drive = |cx: &mut Context<'_>| {
                shared.link.register_driver(&driver);
                shared.link.poll_write(&shared.core, cx).unwrap()
            };
            assert_eq!(drive(&mut driver_cx), (true, true));
            let mut got = 0;
            let mut buf = vec![0u8; PIPE];
            // Reads what the link holds until our side has written everything.
            let mut drain = async |peer: &mut tokio::io::DuplexStream, cx: &mut Context<'_>| loop {
                if drive(cx).1 {
                    return;
                }
                got += peer.read(&mut buf).await.unwrap();
            };
            drain(&mut peer, &mut driver_cx).await;

            let new_writer = |id| {
                let (waker, wakes) = counting_waker();
                let stream = RawStream::new(StreamHandle {
                    id,
                    shared: shared.clone(),
                });
                (stream, waker, wakes)
            };
            let (mut a, a_waker, a_wakes) = new_writer(1);
            let (mut b, b_waker, b_wakes) = new_writer(3);
            let (c, c_waker, c_wakes) = new_writer(5);
            let mut c = Some(c);
            let block = vec![7u8; WRITE];
            let write = |stream: &mut RawStream, waker: &Waker| {
                Pin::new(stream).poll_write(&mut Context::from_waker(waker), &block)
            };

            // A fills the link; then A, B and C all wait for it, in that order.
            assert!(matches!(write(&mut a, &a_waker), Poll::Ready(Ok(WRITE))));
            assert!(write(&mut a, &a_waker).is_pending());
            assert!(write(&mut b, &b_waker).is_pending());
            assert!(write(c.as_mut().unwrap(), &c_waker).is_pending());
            let wakes = || (a_wakes.count(), b_wakes.count(), c_wakes.count());
            assert_eq!(wakes(), (0, 0, 0));

            // The link drains: A alone is woken.
            drain(&mut peer, &mut driver_cx).await;
            assert_eq!(wakes(), (1, 0, 0), "one writer at a time");
            // A's write was dropped: after the grace the driver's timer passes the turn on.
            let before = driver_wakes.count();
            tokio::time::sleep(2 * crate::io::TURN_GRACE).await;
            assert!(driver_wakes.count() > before, "the driver's timer fired");
            drive(&mut driver_cx);
            assert_eq!(wakes(), (1, 1, 0), "the unused turn passed on to B");

            // B writes and fills the link, and waits again, behind C.
            assert!(matches!(write(&mut b, &b_waker), Poll::Ready(Ok(WRITE))));
            assert!(write(&mut b, &b_waker).is_pending());
            drain(&mut peer, &mut driver_cx).await;
            assert_eq!(wakes(), (1, 1, 1), "C's turn");
            // C's stream goes before it writes: the turn passes on at once.
            drop(c.take());
            drive(&mut driver_cx);
            assert_eq!(wakes(), (1, 2, 1), "B's turn again, without waiting");
            assert!(matches!(write(&mut b, &b_waker), Poll::Ready(Ok(WRITE))));
            drain(&mut peer, &mut driver_cx).await;
            // Three ACKs, three data frames whole, and the FIN of C's stream.
            let all = 4 * HEADER_LEN + 3 * (HEADER_LEN + WRITE);
            while got < all {
                got += peer.read(&mut buf).await.unwrap();
            }
            assert_eq!(got, all);
        })
        .await;
    }
}

/// Read-through end to end: large reads take bodies straight from the link.
#[cfg(test)]
mod read_through {
    use crate::{Config, Conn, Mode, Session};
    use netchan_testkit::within;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    const TOTAL: usize = 4 * 1024 * 1024;

    fn byte(i: usize) -> u8 {
        (i % 251) as u8 ^ (i >> 16) as u8
    }

    /// Both ends of a session over `a`/`b`, and a channel between them (`b` accepts).
    async fn channel<T>(a: T, b: T) -> (Session, Session, Conn, Conn)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let builder = Session::builder(b, Mode::Server, Config::default());
        let mut listener = builder.listen("bulk").unwrap();
        let server = builder.start();
        let client = Session::new(a, Mode::Client, Config::default());
        let (dialed, accepted) = tokio::join!(client.dial("bulk"), listener.accept());
        (client, server, dialed.unwrap(), accepted.unwrap())
    }

    /// Writes `TOTAL` patterned bytes in 1 MiB writes, then FIN.
    async fn send_pattern(mut conn: Conn) {
        let data: Vec<u8> = (0..TOTAL).map(byte).collect();
        for block in data.chunks(1024 * 1024) {
            conn.write_all(block).await.unwrap();
        }
        conn.shutdown().await.unwrap();
    }

    /// Reads to the end with reads of at most `size` bytes; checks every byte.
    async fn receive_pattern(conn: &mut Conn, size: usize) {
        let mut buf = vec![0u8; size];
        let mut at = 0;
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte(at + k), "byte {} differs", at + k);
            }
            at += n;
        }
        assert_eq!(at, TOTAL, "every byte, then the end");
    }

    /// Moves the pattern over a duplex with reads of at most `read_size` bytes, checking
    /// every byte; returns how many bytes the receiving session read through.
    async fn transfer(read_size: usize) -> u64 {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_client, server, dialed, mut accepted) = channel(a, b).await;
        let sender = tokio::spawn(send_pattern(dialed));
        receive_pattern(&mut accepted, read_size).await;
        sender.await.unwrap();
        server.shared.link.read_through_bytes()
    }

    #[tokio::test]
    async fn large_reads_take_bodies_straight_from_the_link_and_every_byte_arrives() {
        let through = within(30, "read-through", transfer(256 * 1024)).await;
        assert!(
            through > 0 && through <= TOTAL as u64,
            "a waiting reader with room read bodies through ({through} bytes)"
        );
    }

    /// Reads into uninitialised room (`read_buf` into a `BytesMut`, as the rpc layer reads
    /// frames) take bodies through as well, and every byte arrives in place.
    #[tokio::test]
    async fn reads_into_uninitialised_room_take_bodies_straight_from_the_link() {
        within(30, "read-through into uninitialised room", async {
            let (a, b) = tokio::io::duplex(1 << 20);
            let (_client, server, dialed, mut accepted) = channel(a, b).await;
            let sender = tokio::spawn(send_pattern(dialed));
            let mut at = 0;
            loop {
                let mut buf = bytes::BytesMut::with_capacity(512 * 1024);
                let n = accepted.read_buf(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                assert_eq!(buf.len(), n, "filled exactly what was read");
                for (k, b) in buf.iter().enumerate() {
                    assert_eq!(*b, byte(at + k), "byte {} differs", at + k);
                }
                at += n;
            }
            assert_eq!(at, TOTAL, "every byte, then the end");
            sender.await.unwrap();
            let through = server.shared.link.read_through_bytes();
            assert!(through > 0, "bodies were read through ({through} bytes)");
        })
        .await;
    }

    /// Two bulk channels of one session at once: their large frames interleave on the link,
    /// which the driver then reads in whole chunks (no read-through), and every byte of both
    /// arrives in place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interleaved_bulk_channels_deliver_every_byte() {
        within(60, "two bulk channels", async {
            let (a, b) = tokio::io::duplex(1 << 20);
            let (client, server, first_out, mut first_in) = channel(a, b).await;
            let mut listener = server.listen("second").unwrap();
            let (second_out, second_in) = tokio::join!(client.dial("second"), listener.accept());
            let mut second_in = second_in.unwrap();
            let senders = [
                tokio::spawn(send_pattern(first_out)),
                tokio::spawn(send_pattern(second_out.unwrap())),
            ];
            tokio::join!(
                receive_pattern(&mut first_in, 256 * 1024),
                receive_pattern(&mut second_in, 256 * 1024)
            );
            for sender in senders {
                sender.await.unwrap();
            }
        })
        .await;
    }

    /// Over TCP a read that ends a body takes the header after it in the same `readv` when
    /// the reader's room is initialised, and in a second read when it is not (`read_buf`
    /// into a `BytesMut`): every byte arrives in place either way.
    #[tokio::test]
    async fn reads_over_tcp_take_bodies_and_the_headers_after_them() {
        within(60, "read-through over tcp", async {
            for uninit in [false, true] {
                let (a, b) = netchan_testkit::tcp_pair().await;
                let (_client, server, dialed, mut accepted) = channel(a, b).await;
                let sender = tokio::spawn(send_pattern(dialed));
                if uninit {
                    let mut at = 0;
                    loop {
                        let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
                        let n = accepted.read_buf(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        for (k, b) in buf.iter().enumerate() {
                            assert_eq!(*b, byte(at + k), "byte {} differs", at + k);
                        }
                        at += n;
                    }
                    assert_eq!(at, TOTAL, "every byte, then the end");
                } else {
                    receive_pattern(&mut accepted, 64 * 1024).await;
                }
                sender.await.unwrap();
                let through = server.shared.link.read_through_bytes();
                assert!(through > 0, "bodies were read through ({through} bytes)");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn small_reads_are_served_from_the_buffer() {
        assert_eq!(within(60, "small reads", transfer(4096)).await, 0);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_read_through_stops_at_a_batch_of_fds() {
        use netchan_testkit::fds::{contents, unlinked_file};
        use std::os::fd::AsFd;
        within(30, "read-through and fds", async {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            let builder = Session::builder_with_fds(b, Mode::Server, Config::default());
            let mut listener = builder.listen("fds").unwrap();
            let server = builder.start();
            let client = Session::with_fds(a, Mode::Client, Config::default());
            let (dialed, accepted) = tokio::join!(client.dial("fds"), listener.accept());
            let (mut tx, mut rx) = (dialed.unwrap(), accepted.unwrap());
            const HALF: usize = 600 * 1024;
            let file = unlinked_file("after the first half");
            let sender = tokio::spawn(async move {
                tx.write_all(&vec![1u8; HALF]).await.unwrap();
                tx.send_fds(&[file.as_fd()]).unwrap();
                tx.write_all(&vec![2u8; HALF]).await.unwrap();
                tx.shutdown().await.unwrap();
            });
            let mut buf = vec![0u8; 1024 * 1024];
            let mut first = 0;
            let mut fds = Vec::new();
            while first < HALF {
                let n = rx.read(&mut buf).await.unwrap();
                assert!(n > 0 && first + n <= HALF, "no read crosses the batch");
                assert!(buf[..n].iter().all(|b| *b == 1));
                first += n;
                fds.extend(rx.take_fds());
                assert!(
                    fds.is_empty() || first == HALF,
                    "not takeable before its place"
                );
            }
            // The batch travels after the first half: once a read has returned bytes from
            // beyond it, it is certainly here (it may be before, too).
            let mut second = 0;
            loop {
                let n = rx.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                assert!(buf[..n].iter().all(|b| *b == 2));
                if second == 0 {
                    fds.extend(rx.take_fds());
                }
                second += n;
            }
            assert_eq!(fds.len(), 1, "the batch, once the bytes before it are read");
            assert_eq!(
                contents(fds.into_iter().next().unwrap()),
                "after the first half"
            );
            assert_eq!(second, HALF);
            sender.await.unwrap();
            assert!(server.shared.link.read_through_bytes() > 0);
        })
        .await;
    }
}
