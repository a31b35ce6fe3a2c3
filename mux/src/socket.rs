//! The byte stream under yamux: bridges tokio I/O to the futures-io traits yamux uses, cuts
//! the number of syscalls, and watches the link.
//!
//! - **Write coalescing.** yamux writes every frame as two writes (12-byte header, then body)
//!   and flushes after each frame; on a socket with `TCP_NODELAY` that is two syscalls and two
//!   segments per frame. Here small writes (headers, small bodies, window updates) are only
//!   copied into a buffer, a large body goes out together with whatever is buffered in one
//!   vectored write, and yamux's per-frame flushes are ignored: the driver flushes once at the
//!   end of each of its polls ([`Flusher`]), so all frames produced in one round share a
//!   syscall.
//! - **Read buffering.** yamux reads a header, then the body; reads are served from a buffer
//!   filled by large reads, except for reads at least as large as that buffer.
//! - **Liveness.** Every inbound byte counts for keepalive; how the link failed (end of stream
//!   without a GoAway, an i/o error) is recorded before yamux wakes the channels with it.

use crate::{error::CloseReason, session::Shared};
use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes smaller than this are copied into the output buffer; larger ones are written
/// directly (vectored, behind what is buffered). Frame headers and window updates are tiny.
const COPY_LIMIT: usize = 16 * 1024;
/// The output buffer is drained before it would grow beyond this.
const OUT_CAPACITY: usize = 64 * 1024;
/// Size of the read buffer. Small on purpose: a header read fills it with the start of the
/// body, which then costs an extra copy; reads of at least this size (bodies) go straight
/// into yamux's frame buffer.
const IN_CAPACITY: usize = 8 * 1024;

/// The underlying stream and the bytes written to it but not yet handed to it. Shared by the
/// [`Socket`] (inside yamux) and the [`Flusher`] (in the driver), both used only by the driver
/// task, so the lock is never contended.
struct Link<T> {
    io: T,
    out: Vec<u8>,
    /// How much of `out` has already been written.
    written: usize,
}

impl<T: AsyncWrite + Unpin> Link<T> {
    fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() > 0 {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes `buf` (a large frame body) behind the buffered bytes, in vectored writes.
    fn poll_write_behind(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let pending = self.pending();
            if pending == 0 {
                return Pin::new(&mut self.io).poll_write(cx, buf);
            }
            let slices = [IoSlice::new(&self.out[self.written..]), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < pending {
                self.written += n;
                continue;
            }
            self.out.clear();
            self.written = 0;
            if n > pending {
                return Poll::Ready(Ok(n - pending));
            }
        }
    }
}

fn lock<T>(link: &Mutex<Link<T>>) -> MutexGuard<'_, Link<T>> {
    link.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The byte stream as yamux sees it.
pub(crate) struct Socket<T> {
    link: Arc<Mutex<Link<T>>>,
    shared: Arc<Shared>,
    input: Box<[u8]>,
    /// `input[start..end]` is read but not yet consumed.
    start: usize,
    end: usize,
}

/// The driver's handle on the output buffer: flushes what yamux wrote during a poll.
pub(crate) struct Flusher<T> {
    link: Arc<Mutex<Link<T>>>,
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Hands every buffered byte to the underlying stream and flushes it.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut link = lock(&self.link);
        ready!(link.poll_drain(cx))?;
        Pin::new(&mut link.io).poll_flush(cx)
    }
}

impl<T> Socket<T> {
    pub(crate) fn new(io: T, shared: Arc<Shared>) -> (Socket<T>, Flusher<T>) {
        let link = Arc::new(Mutex::new(Link {
            io,
            out: Vec::with_capacity(OUT_CAPACITY),
            written: 0,
        }));
        let socket = Socket {
            link: link.clone(),
            shared,
            input: vec![0; IN_CAPACITY].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        (socket, Flusher { link })
    }

    fn record_read(&self, result: &io::Result<usize>, asked: usize) {
        match result {
            Ok(0) if asked > 0 => {
                // yamux stops reading after the peer's GoAway, so an end of stream seen here
                // means the peer went away without closing the session.
                self.shared
                    .record_reason(CloseReason::Io(Arc::new(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without the peer closing the session",
                    ))));
            }
            Ok(0) => {}
            Ok(_) => self.shared.stamp_read(),
            Err(e) => {
                let recorded = io::Error::new(e.kind(), e.to_string());
                self.shared
                    .record_reason(CloseReason::Io(Arc::new(recorded)));
            }
        }
    }
}

impl<T: AsyncRead + Unpin> Socket<T> {
    fn poll_read_io(
        &mut self,
        cx: &mut Context<'_>,
        into_input: bool,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut link = lock(&self.link);
        let target: &mut [u8] = if into_input { &mut self.input } else { buf };
        let asked = target.len();
        let mut read_buf = ReadBuf::new(target);
        let result = ready!(Pin::new(&mut link.io).poll_read(cx, &mut read_buf))
            .map(|()| read_buf.filled().len());
        drop(link);
        self.record_read(&result, asked);
        Poll::Ready(result)
    }
}

impl<T: AsyncRead + Unpin> futures::io::AsyncRead for Socket<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.start == this.end {
            if buf.len() >= this.input.len() {
                // Large reads (frame bodies) skip the buffer.
                return this.poll_read_io(cx, false, buf);
            }
            let n = ready!(this.poll_read_io(cx, true, &mut []))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            this.start = 0;
            this.end = n;
        }
        let n = buf.len().min(this.end - this.start);
        buf[..n].copy_from_slice(&this.input[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncWrite + Unpin> futures::io::AsyncWrite for Socket<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut link = lock(&self.link);
        if buf.len() >= COPY_LIMIT {
            return link.poll_write_behind(cx, buf);
        }
        if link.out.len() + buf.len() > OUT_CAPACITY {
            ready!(link.poll_drain(cx))?;
        }
        link.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // yamux flushes after every frame; the driver flushes once per poll instead.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut link = lock(&self.link);
        ready!(link.poll_drain(cx))?;
        Pin::new(&mut link.io).poll_shutdown(cx)
    }
}
