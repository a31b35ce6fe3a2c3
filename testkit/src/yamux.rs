//! A `yamux` crate connection driven in a task of its own: the baseline peer of the mux's
//! interop tests and benchmarks, and the bare peer of tests that misbehave on purpose (it
//! speaks plain yamux, none of netchan's channel handshake).

use std::task::Poll;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot},
};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A `yamux` stream as a tokio `AsyncRead + AsyncWrite`.
pub type YamuxStream = Compat<::yamux::Stream>;

/// Inbound streams kept for [`YamuxPeer::accept`]; more arriving before they are taken are
/// dropped (reset), which no test here relies on.
const INBOUND: usize = 1024;

enum Cmd {
    Open(oneshot::Sender<::yamux::Stream>),
    Close(oneshot::Sender<()>),
}

/// A `::yamux::Connection` (default config) in a task: opens streams on request, hands out the
/// peer's, closes on request, and says how it ended.
pub struct YamuxPeer {
    cmds: mpsc::Sender<Cmd>,
    inbound: mpsc::Receiver<::yamux::Stream>,
    ended: Option<oneshot::Receiver<String>>,
}

impl YamuxPeer {
    /// Starts the connection over `io` in `mode`. The task ends with the connection.
    pub fn start<T>(io: T, mode: ::yamux::Mode) -> YamuxPeer
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (cmds, mut cmd_rx) = mpsc::channel::<Cmd>(16);
        let (inbound_tx, inbound) = mpsc::channel(INBOUND);
        let (ended_tx, ended) = oneshot::channel();
        let mut conn = ::yamux::Connection::new(io.compat(), ::yamux::Config::default(), mode);
        tokio::spawn(async move {
            let mut opening: Option<oneshot::Sender<::yamux::Stream>> = None;
            let mut closing: Option<oneshot::Sender<()>> = None;
            let how = futures::future::poll_fn(|cx| loop {
                if closing.is_some() {
                    return match conn.poll_close(cx) {
                        Poll::Ready(r) => {
                            if let Some(done) = closing.take() {
                                let _ = done.send(());
                            }
                            Poll::Ready(format!("closed by us: {r:?}"))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                if opening.is_none() {
                    match cmd_rx.poll_recv(cx) {
                        Poll::Ready(Some(Cmd::Open(reply))) => opening = Some(reply),
                        Poll::Ready(Some(Cmd::Close(done))) => {
                            closing = Some(done);
                            continue;
                        }
                        _ => {}
                    }
                }
                if opening.is_some() {
                    if let Poll::Ready(Ok(stream)) = conn.poll_new_outbound(cx) {
                        if let Some(reply) = opening.take() {
                            let _ = reply.send(stream);
                        }
                        continue;
                    }
                }
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(stream))) => {
                        let _ = inbound_tx.try_send(stream);
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(format!("error: {e}")),
                    Poll::Ready(None) => return Poll::Ready("ended by the peer".to_owned()),
                    Poll::Pending => return Poll::Pending,
                }
            })
            .await;
            let _ = ended_tx.send(how);
        });
        YamuxPeer {
            cmds,
            inbound,
            ended: Some(ended),
        }
    }

    /// Opens an outbound stream; the other side sees it once something is written on it.
    /// Panics if the connection has ended.
    pub async fn open(&self) -> YamuxStream {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Open(tx))
            .await
            .expect("yamux peer ended");
        rx.await.expect("yamux peer ended").compat()
    }

    /// The next stream the other side opened; `None` once the connection has ended.
    pub async fn accept(&mut self) -> Option<YamuxStream> {
        Some(self.inbound.recv().await?.compat())
    }

    /// A stream the other side opened, if one is waiting now.
    pub fn try_accept(&mut self) -> Option<YamuxStream> {
        Some(self.inbound.try_recv().ok()?.compat())
    }

    /// Closes the connection (a yamux GoAway) and waits until it is closed.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// How the connection ended, as text: "closed by us: …", "ended by the peer" or
    /// "error: …". Waits for the end; `None` if asked twice.
    pub async fn ended(&mut self) -> Option<String> {
        self.ended.take()?.await.ok()
    }
}
