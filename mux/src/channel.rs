//! `Conn`: one open channel, a tokio `AsyncRead + AsyncWrite` over a yamux stream.

use crate::{
    shared::{ChannelSlot, HandleToken},
    stream::RawStream,
};
use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One open channel of a [`Session`](crate::Session): an ordered, reliable byte stream in
/// both directions, with its own flow control (a slow reader on one channel never stalls
/// another).
///
/// Implements tokio's [`AsyncRead`] and [`AsyncWrite`]:
/// - [`shutdown`](tokio::io::AsyncWriteExt::shutdown) half-closes (yamux FIN): the peer reads
///   EOF once it has read everything, and can still write back;
/// - dropping it closes the channel like a TCP close: every byte written is still delivered,
///   then the peer reads end-of-stream; data we had not read is dropped, and the peer's
///   further writes fail with `ConnectionReset` (we answer them with a yamux RST);
/// - [`reset`](Conn::reset) aborts it instead: the peer's reads and writes fail with
///   `ConnectionReset`, never a clean EOF;
/// - it can be split with [`tokio::io::split`] and read and written from two tasks.
///
/// A write sends at most one frame: straight from the caller's buffer when the link is free,
/// otherwise copied into the session's output queue; either way it returns at once and
/// `flush` has nothing left to do. Writes wait while the channel's send window is used up
/// (the peer's reader is behind) or the session's output queue is full (the link is).
///
/// Errors: a reset by the peer reads and writes as `ConnectionReset`. Once the session ends
/// abnormally (keepalive timeout, link failure, protocol violation), pending and later reads
/// and writes fail with an [`io::Error`] whose kind matches the
/// [`CloseReason`](crate::CloseReason) (e.g. `TimedOut`); a read that already saw the peer's
/// FIN keeps returning its data and then EOF.
pub struct Conn {
    // Field order matters: the slot is released before the stream is dropped, so the driver,
    // woken by the stream's drop, already sees the lower channel count (graceful close).
    slot: Option<ChannelSlot>,
    io: RawStream,
    name: Arc<str>,
    /// Keeps the session alive while a user holds the channel.
    _token: Option<Arc<HandleToken>>,
}

impl Conn {
    pub(crate) fn new(
        name: Arc<str>,
        mut io: RawStream,
        slot: Option<ChannelSlot>,
        token: Option<Arc<HandleToken>>,
    ) -> Conn {
        io.set_name(name.clone());
        Conn {
            slot,
            io,
            name,
            _token: token,
        }
    }

    /// The channel's name (as dialed / listened on).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Aborts the channel in both directions (yamux RST). Unlike dropping it, bytes not yet
    /// sent may never arrive, and the peer's reads and writes fail with `ConnectionReset`.
    pub fn reset(self) {
        let Conn { slot, io, .. } = self;
        drop(slot);
        io.reset();
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("name", &self.name)
            .field("session", &self.io.shared().id)
            .field("stream", &self.io.id())
            .field("counted", &self.slot.is_some())
            .finish()
    }
}
