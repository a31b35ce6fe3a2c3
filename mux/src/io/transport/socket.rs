//! The read half of a TCP or unix stream socket (bytes only), which can read the rest of a
//! frame's body into a reader's buffer and the frame header after it into the link's own
//! buffer in one `readv`, through rustix's safe wrapper (no `unsafe` here).

use super::{LinkRead, Plain, ReadAhead};
use bytes::BytesMut;
use netchan_mux_proto::Fd;
use std::{
    collections::VecDeque,
    io::{self, IoSliceMut},
    os::fd::{AsFd, BorrowedFd},
    task::{ready, Context, Poll},
};
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// The owned read half of a tokio socket: its readiness, and a read made by hand that keeps
/// that readiness right.
pub(crate) trait SocketHalf: AsyncRead + Send + Unpin {
    /// Polls the socket's read readiness (registers `cx`'s waker when it is not ready).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Runs `read` (one read system call on the socket's descriptor) if the socket is read
    /// ready; a `WouldBlock` from it clears that readiness.
    fn try_read_io<R>(&self, read: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R>;
}

impl SocketHalf for tokio::net::tcp::OwnedReadHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }

    fn try_read_io<R>(&self, read: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
        let socket = self.as_ref();
        socket.try_io(Interest::READABLE, || read(socket.as_fd()))
    }
}

impl SocketHalf for tokio::net::unix::OwnedReadHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }

    fn try_read_io<R>(&self, read: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
        let socket = self.as_ref();
        socket.try_io(Interest::READABLE, || read(socket.as_fd()))
    }
}

/// A stream socket's read half, as a link's read side: reads as [`Plain`] does, and can read a
/// body's rest and the header after it in one `readv`.
pub(crate) struct Socket<R>(pub(crate) Plain<R>);

impl<R: SocketHalf> LinkRead for Socket<R> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        self.0.poll_read(cx, buf, max, fds)
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        self.0.poll_read_into(cx, dst, max, fds)
    }

    fn poll_read_into_and_ahead(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
        max: usize,
        buf: &mut BytesMut,
        ahead: usize,
    ) -> Option<Poll<io::Result<ReadAhead>>> {
        // `readv` takes initialised memory: only room the reader initialised already (a
        // reader's `Vec` or array, not a `BytesMut`'s spare capacity) is read into this way,
        // as zeroing it first would cost more than the second read saves.
        if dst.initialized().len() < dst.filled().len() + max {
            return None;
        }
        let start = buf.len();
        buf.resize(start + ahead, 0);
        let read = {
            let into = dst.initialize_unfilled_to(max);
            let mut bufs = [IoSliceMut::new(into), IoSliceMut::new(&mut buf[start..])];
            poll_readv(&self.0 .0, cx, &mut bufs)
        };
        let read = read.map_ok(|(n, drained)| {
            let into = n.min(max);
            dst.advance(into);
            ReadAhead {
                into,
                ahead: n - into,
                drained,
            }
        });
        let ahead_read = match &read {
            Poll::Ready(Ok(r)) => r.ahead,
            _ => 0,
        };
        buf.truncate(start + ahead_read);
        Some(read)
    }
}

/// One `readv` into `bufs` once the socket is read ready: the bytes read, and whether the
/// read was short and the socket then not ready (`cx`'s waker registered for its next bytes).
///
/// As tokio's own reads do on epoll, a short read clears the socket's readiness (a stream
/// socket that did not fill the room offered has nothing more), so that the next read waits
/// for the next bytes instead of making a system call that finds none.
fn poll_readv<R: SocketHalf>(
    socket: &R,
    cx: &mut Context<'_>,
    bufs: &mut [IoSliceMut<'_>],
) -> Poll<io::Result<(usize, bool)>> {
    let want: usize = bufs.iter().map(|b| b.len()).sum();
    loop {
        ready!(socket.poll_read_ready(cx))?;
        let mut short = None;
        let result = socket.try_read_io(|fd| {
            let n = loop {
                match rustix::io::readv(fd, bufs) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other?,
                }
            };
            if 0 < n && n < want {
                // Reported as `WouldBlock` so that the readiness is cleared; the count is
                // passed on beside it.
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Ok(n) => return Poll::Ready(Ok((n, false))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(n) = short {
                    // Registers the waker for the next bytes (no system call): whoever reads
                    // next is woken by them.
                    let drained = socket.poll_read_ready(cx).is_pending();
                    return Poll::Ready(Ok((n, drained)));
                }
                // Not ready after all: poll the readiness again, which registers the waker.
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netchan_testkit::{tcp_pair, within};
    use std::{future::poll_fn, mem::MaybeUninit};
    use tokio::io::AsyncWriteExt;

    /// One read into `max` bytes of initialised room and `ahead` bytes of `buf`: what it
    /// read into each, and whether it found the link drained.
    async fn read_both(
        socket: &mut Socket<tokio::net::tcp::OwnedReadHalf>,
        room: &mut [u8],
        max: usize,
        buf: &mut BytesMut,
        ahead: usize,
    ) -> ReadAhead {
        poll_fn(|cx| {
            let mut dst = ReadBuf::new(room);
            socket
                .poll_read_into_and_ahead(cx, &mut dst, max, buf, ahead)
                .expect("initialised room is read into with one readv")
        })
        .await
        .unwrap()
    }

    /// One `readv` takes the rest of a body into the reader's room and what follows it into
    /// the link's own buffer; a short read reports the link drained. Uninitialised room is
    /// left to the caller (it would have to be zeroed first).
    #[tokio::test]
    async fn one_read_takes_the_rest_of_a_body_and_what_follows_it() {
        within(10, "read into two buffers", async {
            let (ours, mut theirs) = tcp_pair().await;
            let (read, _write) = ours.into_split();
            let mut socket = Socket(Plain(read));
            let mut room = [0u8; 300];
            let mut buf = BytesMut::with_capacity(64);

            theirs
                .write_all(&[[1u8; 100], [2u8; 100]].concat()[..120])
                .await
                .unwrap();
            let got = read_both(&mut socket, &mut room, 100, &mut buf, 50).await;
            let expected = ReadAhead {
                into: 100,
                ahead: 20,
                drained: true,
            };
            assert_eq!(got, expected);
            assert_eq!(room[..100], [1u8; 100]);
            assert_eq!(buf[..], [2u8; 20]);

            // Exactly what was offered: the link may have more.
            buf.clear();
            theirs.write_all(&[3u8; 150]).await.unwrap();
            let got = read_both(&mut socket, &mut room, 100, &mut buf, 50).await;
            let expected = ReadAhead {
                into: 100,
                ahead: 50,
                drained: false,
            };
            assert_eq!(got, expected);
            assert_eq!(buf[..], [3u8; 50]);

            let mut uninit = [MaybeUninit::uninit(); 64];
            let mut dst = ReadBuf::uninit(&mut uninit);
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(socket
                .poll_read_into_and_ahead(&mut cx, &mut dst, 64, &mut buf, 16)
                .is_none());
        })
        .await;
    }
}
