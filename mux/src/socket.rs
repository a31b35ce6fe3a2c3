//! The byte stream under yamux: bridges tokio I/O to the futures-io traits yamux uses, and
//! watches the link (every inbound byte counts as liveness for keepalive; how the link failed
//! is recorded before yamux tells the channels).

use crate::{error::CloseReason, session::Shared};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) struct Socket<T> {
    io: T,
    shared: Arc<Shared>,
}

impl<T> Socket<T> {
    pub(crate) fn new(io: T, shared: Arc<Shared>) -> Self {
        Socket { io, shared }
    }
}

impl<T: AsyncRead + Unpin> futures::io::AsyncRead for Socket<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut read_buf = ReadBuf::new(buf);
        match Pin::new(&mut this.io).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                if n > 0 {
                    this.shared.stamp_read();
                } else if !buf.is_empty() {
                    // yamux stops reading after the peer's GoAway, so an end of stream seen
                    // here means the peer went away without closing the session.
                    this.shared
                        .record_reason(CloseReason::Io(Arc::new(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the connection ended without the peer closing the session",
                        ))));
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                let recorded = io::Error::new(e.kind(), e.to_string());
                this.shared
                    .record_reason(CloseReason::Io(Arc::new(recorded)));
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> futures::io::AsyncWrite for Socket<T> {
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

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
