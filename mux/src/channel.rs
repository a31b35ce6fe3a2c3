//! `Conn`: one open channel, a tokio `AsyncRead + AsyncWrite` over a yamux stream.

use crate::session::{ChannelSlot, Session, Shared};
use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::{compat::Compat, sync::WaitForCancellationFutureOwned};

/// One open channel of a [`Session`]: an ordered, reliable byte stream in both directions,
/// with its own flow control (a slow reader on one channel never stalls another).
///
/// Implements tokio's [`AsyncRead`] and [`AsyncWrite`]:
/// - [`shutdown`](tokio::io::AsyncWriteExt::shutdown) half-closes: the peer reads EOF once it
///   has read everything, and can still write back;
/// - dropping it closes the channel: the peer reads end-of-stream after the data already
///   sent, and its further writes fail with `BrokenPipe` (a yamux reset, unless we had
///   half-closed first);
/// - it can be split with [`tokio::io::split`] and read and written from two tasks.
///
/// Errors: once the session ends abnormally (keepalive timeout, link failure, protocol
/// violation), pending and later reads and writes fail with an [`io::Error`] whose kind
/// matches the [`CloseReason`](crate::CloseReason) (e.g. `TimedOut`). Writing to a channel the
/// peer has closed fails with `BrokenPipe`.
///
/// A caveat inherited from yamux: if the peer half-closes and then drops its end, our further
/// writes are discarded by the peer, and a writer can stall once the flow-control window
/// (256 KiB) is used up; protocols should stop writing when they see the peer's EOF.
pub struct Conn {
    // Field order matters: the slot is released before the stream is dropped, so the driver,
    // woken by the stream's drop, already sees the lower channel count (graceful close).
    slot: Option<ChannelSlot>,
    io: Compat<yamux::Stream>,
    name: Arc<str>,
    shared: Arc<Shared>,
    /// Session-end notifications for the read and the write side: after a graceful close
    /// yamux does not wake streams, so a pending read or write must learn it here. Two, so
    /// that the halves of a split `Conn` never overwrite each other's waker.
    read_ended: Pin<Box<WaitForCancellationFutureOwned>>,
    write_ended: Pin<Box<WaitForCancellationFutureOwned>>,
    /// We read EOF while the stream was only half-closed by the peer: a clean end of data.
    fin_seen: bool,
    write_shut: bool,
    /// Keeps the session alive while a user holds the channel (`None` for internal channels).
    _session: Option<Session>,
}

impl Conn {
    pub(crate) fn new(
        name: &str,
        io: Compat<yamux::Stream>,
        slot: Option<ChannelSlot>,
        shared: Arc<Shared>,
        session: Option<Session>,
    ) -> Conn {
        Conn {
            slot,
            io,
            name: name.into(),
            read_ended: Box::pin(shared.ended.clone().cancelled_owned()),
            write_ended: Box::pin(shared.ended.clone().cancelled_owned()),
            shared,
            fin_seen: false,
            write_shut: false,
            _session: session,
        }
    }

    /// The channel's name (as dialed / listened on).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The error a read or write gets once the session has ended, if it ended abnormally.
    fn abnormal_end(&self) -> Option<io::Error> {
        self.shared
            .reason()
            .filter(|reason| reason.is_error())
            .map(|reason| reason.to_io_error())
    }

    fn session_gone(&mut self, cx: &mut Context<'_>, read: bool) -> bool {
        if self.shared.ended.is_cancelled() {
            return true;
        }
        let ended = if read {
            &mut self.read_ended
        } else {
            &mut self.write_ended
        };
        ended.as_mut().poll(cx).is_ready()
    }

    fn ended_error(&self) -> io::Error {
        self.abnormal_end().unwrap_or_else(|| {
            self.shared
                .reason()
                .unwrap_or(crate::CloseReason::Local)
                .to_io_error()
        })
    }

    fn write_error(&self, e: io::Error) -> io::Error {
        if let Some(err) = self.abnormal_end() {
            return err;
        }
        if self.shared.ended.is_cancelled() {
            return self.ended_error();
        }
        if self.write_shut {
            return io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("channel {:?}: write after shutdown", self.name),
            );
        }
        if self.io.get_ref().is_closed() {
            return io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("channel {:?} was closed by the peer", self.name),
            );
        }
        e
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let eof = buf.filled().len() == before && buf.remaining() > 0;
                if eof && !this.fin_seen {
                    if !this.io.get_ref().is_closed() {
                        // Half-closed by the peer while the session is fine: a clean EOF.
                        this.fin_seen = true;
                    } else if let Some(err) = this.abnormal_end() {
                        // The link died (or keepalive gave up): the data may be truncated.
                        return Poll::Ready(Err(err));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            Poll::Pending => {
                if this.session_gone(cx, true) {
                    return Poll::Ready(Err(this.ended_error()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            // yamux would send an empty data frame.
            return Poll::Ready(Ok(0));
        }
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            Poll::Pending => {
                if this.session_gone(cx, false) {
                    return Poll::Ready(Err(this.ended_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            Poll::Pending => {
                if this.session_gone(cx, false) {
                    return Poll::Ready(Err(this.ended_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_shut {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                this.write_shut = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            Poll::Pending => {
                if this.session_gone(cx, false) {
                    return Poll::Ready(Err(this.ended_error()));
                }
                Poll::Pending
            }
        }
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("name", &self.name)
            .field("session", &self.shared.id)
            .field("stream", &self.io.get_ref().id().val())
            .field("counted", &self.slot.is_some())
            .finish()
    }
}
