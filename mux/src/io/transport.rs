//! The byte stream under a session, as the read side and the write side use it: any
//! tokio `AsyncRead`/`AsyncWrite`, or a unix socket that also carries file descriptors
//! (`transport/unix.rs`).
//!
//! Contract of the fd-carrying kind: received descriptors are handed over in the order they
//! arrived, with the read that returned the first byte sent with them (the kernel delivers
//! `SCM_RIGHTS` that way), so by the time the driver parses the frame that announces them
//! they are there. Sent descriptors go with the first byte of the write that takes them.

#[cfg(unix)]
mod socket;
#[cfg(unix)]
pub(crate) mod unix;

use bytes::{BufMut, BytesMut};
use netchan_mux_proto::Fd;
use std::{
    any::Any,
    collections::VecDeque,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
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

    /// Reads at most `max` bytes (at least one) into the unfilled part of `dst`, a reader's
    /// own buffer (the read-through path), and advances its filled part by what was read;
    /// file descriptors that arrived with the bytes are appended to `fds`. `dst`'s unfilled
    /// part may be uninitialised: a link that can read into it as it is does not zero it
    /// first. `Ok(0)` is the end of the stream.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>>;

    /// [`LinkRead::poll_read_into`] for `max` bytes (at least one) and, in the same system
    /// call, at most `ahead` bytes that follow them on the link into the spare capacity of
    /// `buf` (the caller reserved that much): `None` if this link cannot read into both in one
    /// call, or cannot without zeroing `dst`'s room first (the caller then reads them one
    /// after the other).
    fn poll_read_into_and_ahead(
        &mut self,
        _cx: &mut Context<'_>,
        _dst: &mut ReadBuf<'_>,
        _max: usize,
        _buf: &mut BytesMut,
        _ahead: usize,
    ) -> Option<Poll<io::Result<ReadAhead>>> {
        None
    }
}

/// What a [`LinkRead::poll_read_into_and_ahead`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadAhead {
    /// Bytes read into the reader's buffer.
    pub(crate) into: usize,
    /// Bytes read after them into the link's own buffer.
    pub(crate) ahead: usize,
    /// The link had no more: the read was short, and the waker passed in is registered for
    /// the link's next bytes.
    pub(crate) drained: bool,
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

/// The read and write halves of `io`, for a link that carries bytes only.
///
/// A TCP or unix stream is split into its owned halves, which the kernel serves at once: the
/// driver reads while a writer is inside a large `writev`. Any other type is split with
/// [`tokio::io::split`], whose halves share a lock, so a read waits for a write in progress
/// (as any split of a single-object stream such as TLS must).
pub(crate) fn split<T>(io: T) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn halves<R, W>((read, write): (R, W)) -> (Box<dyn LinkRead>, Box<dyn LinkWrite>)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        (Box::new(Plain(read)), Box::new(Plain(write)))
    }
    // `T` is a concrete type here; the checks compile down to a comparison of type ids.
    let mut io = Some(io);
    let slot: &mut dyn Any = &mut io;
    if let Some(tcp) = slot
        .downcast_mut::<Option<tokio::net::TcpStream>>()
        .and_then(Option::take)
    {
        let (read, write) = tcp.into_split();
        #[cfg(unix)]
        return (
            Box::new(socket::Socket(Plain(read))),
            Box::new(Plain(write)),
        );
        #[cfg(not(unix))]
        return halves((read, write));
    }
    #[cfg(unix)]
    if let Some(unix) = slot
        .downcast_mut::<Option<tokio::net::UnixStream>>()
        .and_then(Option::take)
    {
        let (read, write) = unix.into_split();
        return (
            Box::new(socket::Socket(Plain(read))),
            Box::new(Plain(write)),
        );
    }
    match io {
        Some(io) => halves(tokio::io::split(io)),
        None => unreachable!("only a branch that returned takes the stream"),
    }
}

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
        dst: &mut ReadBuf<'_>,
        max: usize,
        _fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        // Through tokio's `BufMut` for `ReadBuf`: uninitialised room is read into as it is
        // (a socket never reads what it is given), and counted as filled after the read.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.0), cx, &mut dst.limit(max))
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

#[cfg(test)]
mod tests {
    use super::*;
    use netchan_testkit::{tcp_pair, within};
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads once from `read` into a fresh buffer; what arrived (empty at the end).
    async fn read_once(read: &mut dyn LinkRead) -> Vec<u8> {
        let mut buf = BytesMut::with_capacity(64);
        let n = poll_fn(|cx| read.poll_read(cx, &mut buf, 64, &mut VecDeque::new()))
            .await
            .unwrap();
        buf[..n].to_vec()
    }

    /// A TCP stream is split into its owned halves (served by the kernel at once, no lock
    /// between them). What tells them from tokio's lock-sharing split: dropping the write
    /// half alone sends the FIN, and the read half still reads.
    #[tokio::test]
    async fn a_tcp_stream_splits_into_owned_halves() {
        within(10, "owned halves", async {
            let (ours, mut theirs) = tcp_pair().await;
            let (mut read, write) = split(ours);
            drop(write);
            let mut rest = Vec::new();
            theirs.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "the peer reads the end of our writing");
            theirs.write_all(b"still read").await.unwrap();
            assert_eq!(read_once(&mut *read).await, b"still read");
        })
        .await;
    }

    /// Any other stream goes through tokio's split and works the same way both ways.
    #[tokio::test]
    async fn other_streams_split_and_carry_bytes_both_ways() {
        within(10, "duplex halves", async {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let (mut read, mut write) = split(ours);
            let n = poll_fn(|cx| write.poll_write(cx, &[IoSlice::new(b"out")], &mut Vec::new()))
                .await
                .unwrap();
            assert_eq!(n, 3);
            let mut got = [0u8; 3];
            theirs.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"out");
            theirs.write_all(b"in").await.unwrap();
            assert_eq!(read_once(&mut *read).await, b"in");
        })
        .await;
    }
}
