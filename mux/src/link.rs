//! The byte stream under a session, as the driver (reads) and the write side use it: any
//! tokio `AsyncRead`/`AsyncWrite`, or a unix socket that also carries file descriptors
//! (`link/unix.rs`).
//!
//! Contract of the fd-carrying kind: received descriptors are handed over in the order they
//! arrived, with the read that returned the first byte sent with them (the kernel delivers
//! `SCM_RIGHTS` that way), so by the time the driver parses the frame that announces them
//! they are there. Sent descriptors go with the first byte of the write that takes them.

#[cfg(unix)]
pub(crate) mod unix;

use crate::proto::Fd;
use bytes::{BufMut, BytesMut};
use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The read side of a link.
pub(crate) trait LinkRead: Send {
    /// Reads at most `max` bytes into the spare capacity of `buf` (the caller reserved at
    /// least that); file descriptors that arrived with the bytes are appended to `fds`.
    /// `Ok(0)` is the end of the stream.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>>;

    /// Reads into `dst` (a reader's own buffer: the read-through path); file descriptors that
    /// arrived with the bytes are appended to `fds`. `Ok(0)` is the end of the stream, unless
    /// `dst` is empty.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut [u8],
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>>;
}

/// The write side of a link.
pub(crate) trait LinkWrite: Send {
    /// Writes from `slices`. If `fds` is not empty they travel with the first byte written,
    /// and are taken (left empty) once anything was written; on `Pending` or an error they
    /// stay, to be sent with the next try.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
        fds: &mut Vec<Fd>,
    ) -> Poll<io::Result<usize>>;

    /// Flushes what was written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Shuts the write direction down (the peer reads end of stream).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A link that carries bytes only: one half of any tokio byte stream.
pub(crate) struct Plain<T>(pub(crate) T);

impl<R: AsyncRead + Send + Unpin> LinkRead for Plain<R> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
        _fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(&mut self.0), cx, &mut buf.limit(max))
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut [u8],
        _fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(dst);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl<W: AsyncWrite + Send + Unpin> LinkWrite for Plain<W> {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
        fds: &mut Vec<Fd>,
    ) -> Poll<io::Result<usize>> {
        if !fds.is_empty() {
            // The core never queues fds on a session whose link cannot carry them.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this link cannot carry file descriptors",
            )));
        }
        Pin::new(&mut self.0).poll_write_vectored(cx, slices)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
