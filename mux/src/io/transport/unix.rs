//! A unix stream socket that carries file descriptors as `SCM_RIGHTS` ancillary data, through
//! rustix's safe `sendmsg`/`recvmsg` (no `unsafe` here).

use super::{LinkRead, LinkWrite};
use bytes::BytesMut;
use netchan_mux_proto::{Fd, MAX_FDS_PER_FRAME};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::{
    io::{AsyncWrite, Interest, ReadBuf},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
};

/// Bytes asked of the socket per read. `recvmsg` needs initialised memory, so this much is
/// zeroed before each read (tens of microseconds per megabyte: the price of fd passing).
const READ_SPACE: usize = 64 * 1024;

/// Why a received control message was cut short: the descriptors in it are lost, so the
/// session can no longer tell which frame the following ones belong to.
#[derive(Debug, thiserror::Error)]
#[error(
    "the kernel truncated a control message carrying file descriptors (MSG_CTRUNC): \
     is this process out of file descriptors (RLIMIT_NOFILE)?"
)]
pub(crate) struct Truncated;

/// The read half, with room for one full `SCM_RIGHTS` message.
pub(crate) struct UnixRead {
    io: OwnedReadHalf,
    control: Vec<MaybeUninit<u8>>,
}

impl UnixRead {
    pub(crate) fn new(io: OwnedReadHalf) -> UnixRead {
        UnixRead {
            io,
            control: vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))],
        }
    }
}

impl LinkRead for UnixRead {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        let start = buf.len();
        let len = max.min(READ_SPACE);
        buf.resize(start + len, 0);
        let result = self.poll_read_into(cx, &mut ReadBuf::new(&mut buf[start..]), len, fds);
        let n = match &result {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        buf.truncate(start + n);
        result
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
        max: usize,
        fds: &mut VecDeque<Fd>,
    ) -> Poll<io::Result<usize>> {
        let UnixRead { io, control } = self;
        // `recvmsg` takes initialised memory: room not yet initialised is zeroed first.
        let room = dst.initialize_unfilled_to(max.min(dst.remaining()));
        loop {
            ready!(io.as_ref().poll_read_ready(cx))?;
            let result = io.as_ref().try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut *room)];
                let mut cmsg = RecvAncillaryBuffer::new(control);
                let msg = rustix::net::recvmsg(
                    io.as_ref(),
                    &mut iov,
                    &mut cmsg,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut got = Vec::new();
                for message in cmsg.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        got.extend(received);
                    }
                }
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    // What did arrive is closed here (dropped with `got`).
                    return Err(io::Error::other(Truncated));
                }
                Ok((msg.bytes, got))
            });
            match result {
                Ok((n, got)) => {
                    fds.extend(got);
                    dst.advance(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                // Readiness was cleared: poll it again (registers the waker).
                Err(_) => {}
            }
        }
    }
}

/// The write half.
pub(crate) struct UnixWrite {
    io: OwnedWriteHalf,
}

impl UnixWrite {
    pub(crate) fn new(io: OwnedWriteHalf) -> UnixWrite {
        UnixWrite { io }
    }
}

impl LinkWrite for UnixWrite {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
        fds: &mut Vec<Fd>,
    ) -> Poll<io::Result<usize>> {
        if fds.is_empty() {
            return Pin::new(&mut self.io).poll_write_vectored(cx, slices);
        }
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
        loop {
            ready!(self.io.as_ref().poll_write_ready(cx))?;
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            if !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many file descriptors for one control message",
                )));
            }
            let sock = self.io.as_ref();
            let result = sock.try_io(Interest::WRITABLE, || {
                Ok(rustix::net::sendmsg(
                    sock,
                    slices,
                    &mut cmsg,
                    SendFlags::NOSIGNAL,
                )?)
            });
            match result {
                Ok(n) => {
                    drop(borrowed);
                    // Sent: the peer has its own copies; ours close here.
                    fds.clear();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
