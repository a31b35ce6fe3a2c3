//! [`Gated`]: a byte stream whose reads wait until a setup step is done, so a session's
//! listeners are registered before the session reads the peer's first dial.

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

use crate::mux::Session;

/// A setup step run on each new session before it reads anything from the peer.
#[derive(Clone)]
pub(crate) struct OnSession(pub(crate) Arc<dyn Fn(&Session) + Send + Sync>);

impl fmt::Debug for OnSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnSession(..)")
    }
}

/// Starts a session over `io` in `mode`, running `setup` (if any) before the session reads
/// from the peer.
pub(crate) fn start<T>(
    io: T,
    mode: crate::mux::Mode,
    config: crate::mux::Config,
    setup: Option<&OnSession>,
) -> Session
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Some(setup) = setup else {
        return Session::new(io, mode, config);
    };
    let (open, gate) = oneshot::channel();
    let session = Session::new(
        Gated {
            io,
            gate: Some(gate),
        },
        mode,
        config,
    );
    (setup.0)(&session);
    let _ = open.send(());
    session
}

/// Reads wait for the gate; writes pass straight through.
struct Gated<T> {
    io: T,
    gate: Option<oneshot::Receiver<()>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Gated<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(gate) = &mut self.gate {
            // Opened or dropped, the setup is over either way.
            let _ = ready!(Pin::new(gate).poll(cx));
            self.gate = None;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gated<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
