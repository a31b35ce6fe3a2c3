//! `Conn`: one open channel, a tokio `AsyncRead + AsyncWrite` over a yamux stream.

#[cfg(unix)]
use crate::{error::Error, shared::Shared};
use crate::{
    shared::{ChannelSlot, HandleToken},
    stream::{self, RawStream},
};
use netchan_mux_proto::StreamError;
#[cfg(unix)]
use std::os::fd::{BorrowedFd, OwnedFd};
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
/// A write sends at most one frame (the slices of a vectored write, up to 15 of them, together
/// in that one frame): straight from the caller's buffer when the link is free, otherwise
/// copied into the session's output queue; either way it returns at once and
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

/// File descriptors (unix sessions made with [`Session::with_fds`](crate::Session::with_fds)).
///
/// Descriptors travel in order with the channel's bytes, like `SCM_RIGHTS` on a stream
/// socket: sent ones reach the peer ahead of the next byte written; received ones become
/// takeable once everything written before them has been read, and a read never returns
/// bytes from both sides of them. Each one received is a new descriptor (close-on-exec) for
/// the same open file, socket or memfd, owned by whoever takes it; untaken ones are closed
/// when the channel is dropped.
#[cfg(unix)]
impl Conn {
    /// Sends duplicates of `fds` to the peer, ahead of the next byte written on this channel
    /// (after everything written so far). The caller keeps its own. At most 253 at once
    /// (the kernel's limit per message). Returns at once: they leave with the session's
    /// queued output.
    ///
    /// # Errors
    ///
    /// [`Error::FdsUnsupported`] if the link or the peer cannot take them (a TCP or TLS
    /// link, a duplex, or a peer without the extension), [`Error::TooManyFds`], or the
    /// channel's own state (reset, shut down, session closed). On error nothing was sent.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        self.fds().send(fds)
    }

    /// Takes the descriptors that arrived before the bytes read so far (and any right after
    /// them). Empty if none.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.fds().take()
    }

    /// Whether descriptors can be sent on this channel now: the link carries them and the
    /// peer announced that it takes them.
    pub fn can_send_fds(&self) -> bool {
        self.fds().can_send()
    }

    /// A handle on this channel's descriptors that works apart from the `Conn` (for instance
    /// after [`tokio::io::split`], from the writing and the reading task).
    pub fn fds(&self) -> ConnFds {
        ConnFds {
            shared: self.io.shared().clone(),
            id: self.io.id(),
            name: self.name.clone(),
        }
    }
}

/// The file descriptors of one channel, apart from its bytes; from [`Conn::fds`]. Cheap to
/// clone. Once the channel is dropped, sending fails and nothing more arrives.
#[cfg(unix)]
#[derive(Clone)]
pub struct ConnFds {
    shared: Arc<Shared>,
    id: u32,
    name: Arc<str>,
}

#[cfg(unix)]
impl ConnFds {
    /// See [`Conn::send_fds`].
    ///
    /// # Errors
    ///
    /// As for [`Conn::send_fds`].
    pub fn send(&self, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let limit = netchan_mux_proto::MAX_FDS_PER_FRAME;
        if fds.len() > limit {
            return Err(Error::TooManyFds {
                name: self.name.to_string(),
                count: fds.len(),
                limit,
            });
        }
        if fds.is_empty() {
            return Ok(());
        }
        let owned = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<OwnedFd>, _>>()?;
        let (result, carries) = {
            let mut core = self.shared.core();
            (core.send_fds(self.id, owned), core.carries_fds())
        };
        match result {
            Ok(()) => {
                self.shared.link.send_now(&self.shared.core);
                Ok(())
            }
            Err(StreamError::FdsUnsupported) => Err(Error::FdsUnsupported {
                name: self.name.to_string(),
                reason: if carries {
                    "the peer did not announce that it takes them"
                } else {
                    "the link does not carry them (only a unix socket session made with \
                     Session::with_fds does)"
                },
            }),
            Err(StreamError::TooManyFds) => Err(Error::TooManyFds {
                name: self.name.to_string(),
                count: fds.len(),
                limit,
            }),
            Err(e @ (StreamError::Reset | StreamError::WriteClosed)) => {
                Err(Error::Io(stream::io_error(&self.name, &self.shared, e)))
            }
            Err(StreamError::SessionEnded) => Err(self.shared.closed_error()),
        }
    }

    /// See [`Conn::take_fds`].
    pub fn take(&self) -> Vec<OwnedFd> {
        self.shared.core().take_fds(self.id)
    }

    /// Whether the channel's session runs over a link that carries descriptors (a unix
    /// socket, [`Session::with_fds`](crate::Session::with_fds)), whatever the peer announced.
    pub fn session_carries(&self) -> bool {
        self.shared.core().carries_fds()
    }

    /// See [`Conn::can_send_fds`].
    pub fn can_send(&self) -> bool {
        let core = self.shared.core();
        core.carries_fds() && core.peer_takes_fds()
    }
}

#[cfg(unix)]
impl fmt::Debug for ConnFds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnFds")
            .field("name", &self.name)
            .field("stream", &self.id)
            .finish()
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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
