//! `RawStream`: one yamux stream as tokio `AsyncRead + AsyncWrite`, straight on the core.
//!
//! A read copies from the stream's receive buffer into the caller's buffer (no zeroing, no
//! intermediate buffer), or, when the link's next bytes are a large body for this stream,
//! reads them from the link straight into the caller's buffer (read-through, no copy).
//!
//! A write sends at most one frame: straight from the caller's buffer (header and body in one
//! vectored write) when the link is free; otherwise a large write waits for a contended link,
//! and anything else is copied into the session's output queue for the driver or the next
//! writer.

use crate::{
    error::CloseReason,
    proto::StreamError,
    shared::{Shared, StreamHandle},
};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this many bytes wait for a contended link (see `Shared::wait_for_link`)
/// instead of being copied into the output queue; smaller ones are copied (cheaper than the
/// wait, and queued small frames are what keeps a small message from waiting behind bulk
/// data).
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
        match e {
            StreamError::Reset => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("channel {:?} was reset by the peer", self.name),
            ),
            StreamError::WriteClosed => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("channel {:?}: write after shutdown", self.name),
            ),
            StreamError::FdsUnsupported | StreamError::TooManyFds => io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "channel {:?}: file descriptors cannot be sent here",
                    self.name
                ),
            ),
            StreamError::SessionEnded => self
                .handle
                .shared
                .reason()
                .unwrap_or(CloseReason::Local)
                .to_io_error(),
        }
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
        if let Some(result) = shared.try_read_through(this.handle.id, buf, cx.waker()) {
            return result.map_err(|e| this.error(e));
        }
        let mut core = shared.core();
        let max = buf.remaining();
        let queued = core.out_bytes();
        let result = core.read(
            this.handle.id,
            max,
            cx.waker(),
            std::time::Instant::now,
            |s| buf.put_slice(s),
        );
        // A read may have queued a window update for the driver to send.
        let wake = core.out_bytes() != queued;
        drop(core);
        if wake {
            // Sent from this task if the link is free: the window update is what the peer's
            // writer is waiting for.
            shared.send_now();
        }
        match result {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.error(e))),
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
        let this = self.get_mut();
        let shared = &this.handle.shared;
        if let Some(result) = shared.try_write_direct(this.handle.id, buf, cx.waker()) {
            return result.map_err(|e| this.error(e));
        }
        // A large write waits for a contended link rather than be copied into the queue.
        if buf.len() >= LINK_WAIT_MIN && shared.wait_for_link(this.handle.id, cx.waker()) {
            return Poll::Pending;
        }
        let result = shared.core().write(this.handle.id, buf, cx.waker());
        match result {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    shared.send_now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.error(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued for the link; the driver sends them without delay.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shared = &this.handle.shared;
        let result = shared.core().finish(this.handle.id);
        shared.driver_waker.wake();
        Poll::Ready(result.map_err(|e| this.error(e)))
    }
}
