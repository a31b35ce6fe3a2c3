//! The driver task: the only owner of the `yamux::Connection`.
//!
//! yamux makes no progress at all (not even writes of open streams) unless
//! `poll_next_inbound` is polled, so one task polls, in one loop: inbound streams, pending
//! outbound opens, the command queue from the handles, the keepalive timer and, once closing,
//! the graceful shutdown. Per-stream work (handshakes) runs in per-stream tasks, never here.

use crate::{
    error::CloseReason,
    keepalive::Keepalive,
    session::{Mode, Shared},
    socket::{Flusher, Socket},
    Error,
};
use futures::future::poll_fn;
use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot},
    time::Sleep,
};
use tracing::Instrument;

/// A request from a handle to the driver.
pub(crate) enum Command {
    /// Open an outbound yamux stream (the dialer then runs the handshake on it).
    Open {
        reply: oneshot::Sender<Result<yamux::Stream, Error>>,
    },
}

enum State {
    Running,
    /// Closing gracefully: refuse new channels, wait for open ones until the deadline.
    Draining {
        deadline: Pin<Box<Sleep>>,
    },
    /// yamux's own close (GoAway, flush), bounded by a deadline in case the peer stops reading.
    Closing {
        deadline: Pin<Box<Sleep>>,
    },
}

pub(crate) struct Driver<T> {
    connection: yamux::Connection<Socket<T>>,
    /// Flushes, once per poll, what yamux wrote during it (see `socket.rs`).
    flusher: Flusher<T>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    commands_closed: bool,
    /// Lets inbound handshake tasks hand out session handles without keeping the session alive.
    handles: mpsc::WeakSender<Command>,
    /// Dials waiting for yamux to hand out a stream. Bounded: each holds a dial permit.
    pending_opens: VecDeque<oneshot::Sender<Result<yamux::Stream, Error>>>,
    state: State,
    keepalive: Option<Keepalive>,
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(crate) fn new(
        io: T,
        mode: Mode,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        handles: mpsc::WeakSender<Command>,
    ) -> Self {
        let (socket, flusher) = Socket::new(io, shared.clone());
        let connection = yamux::Connection::new(socket, shared.config.to_yamux(), mode.into());
        let keepalive = Keepalive::start(&shared, handles.clone());
        Driver {
            connection,
            flusher,
            shared,
            commands,
            commands_closed: false,
            handles,
            pending_opens: VecDeque::new(),
            state: State::Running,
            keepalive,
        }
    }

    pub(crate) async fn run(mut self) {
        tracing::debug!("session started");
        let reason = poll_fn(|cx| self.poll(cx)).await;
        let reason = self.shared.finish(reason);
        for reply in self.pending_opens.drain(..) {
            let _ = reply.send(Err(Error::SessionClosed(reason.clone())));
        }
        self.commands.close();
        while let Ok(Command::Open { reply }) = self.commands.try_recv() {
            let _ = reply.send(Err(Error::SessionClosed(reason.clone())));
        }
        if reason.is_error() {
            tracing::info!(%reason, "session ended");
        } else {
            tracing::debug!(%reason, "session ended");
        }
        // Dropping the connection marks every stream closed and wakes its readers and writers.
        drop(self.connection);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        self.shared.driver_waker.register(cx.waker());
        if let Poll::Ready(reason) = self.poll_connection(cx) {
            return Poll::Ready(reason);
        }
        // Everything yamux wrote in this round leaves in as few syscalls as possible.
        match self.flusher.poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(CloseReason::Io(Arc::new(e))),
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
        }
    }

    fn poll_connection(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let State::Closing { deadline } = &mut self.state {
            return match self.connection.poll_close(cx) {
                Poll::Ready(_) => Poll::Ready(CloseReason::Local),
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    tracing::debug!("peer did not take our close in time; dropping the link");
                    Poll::Ready(CloseReason::Local)
                }
                Poll::Pending => Poll::Pending,
            };
        }

        self.poll_commands(cx);
        if self.shared.is_closing() {
            if let State::Running = self.state {
                tracing::debug!(open = self.shared.open_channels(), "closing");
                self.state = State::Draining {
                    deadline: Box::pin(tokio::time::sleep(self.shared.config.close_grace)),
                };
            }
        }
        self.poll_opens(cx);

        loop {
            match self.connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => self.on_inbound(stream),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(close_reason(e)),
                Poll::Ready(None) => return Poll::Ready(CloseReason::Peer),
                Poll::Pending => break,
            }
        }

        if let Some(keepalive) = &mut self.keepalive {
            if let Poll::Ready(reason) = keepalive.poll(cx, &self.shared) {
                return Poll::Ready(reason);
            }
        }

        if let State::Draining { deadline } = &mut self.state {
            let done = self.shared.open_channels() == 0;
            if done || deadline.as_mut().poll(cx).is_ready() {
                if !done {
                    tracing::debug!(
                        open = self.shared.open_channels(),
                        "close grace expired; cutting open channels"
                    );
                }
                for reply in self.pending_opens.drain(..) {
                    let _ = reply.send(Err(Error::SessionClosed(CloseReason::Local)));
                }
                self.state = State::Closing {
                    deadline: Box::pin(tokio::time::sleep(self.shared.config.handshake_timeout)),
                };
                // Poll again at once so yamux starts closing and registers its wake-ups.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn poll_commands(&mut self, cx: &mut Context<'_>) {
        while !self.commands_closed {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(Command::Open { reply })) => {
                    if self.shared.is_closing() && !matches!(self.state, State::Running) {
                        let _ = reply.send(Err(Error::SessionClosed(CloseReason::Local)));
                    } else {
                        self.pending_opens.push_back(reply);
                    }
                }
                Poll::Ready(None) => {
                    // Every handle, listener and channel is gone: nobody can use the session.
                    tracing::debug!("all handles dropped");
                    self.commands_closed = true;
                    self.shared.set_closing();
                }
                Poll::Pending => break,
            }
        }
    }

    fn poll_opens(&mut self, cx: &mut Context<'_>) {
        while let Some(reply) = self.pending_opens.front() {
            if reply.is_closed() {
                // The dial was abandoned (timed out or dropped) before it got its stream.
                self.pending_opens.pop_front();
                continue;
            }
            match self.connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    if let Some(reply) = self.pending_opens.pop_front() {
                        // If the dial has gone meanwhile, the stream is dropped unseen: yamux
                        // streams only become visible to the peer with their first frame.
                        let _ = reply.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(e)) => {
                    // The connection is failing; `poll_next_inbound` reports why.
                    let reason = close_reason(e);
                    for reply in self.pending_opens.drain(..) {
                        let _ = reply.send(Err(Error::SessionClosed(reason.clone())));
                    }
                }
                Poll::Pending => break,
            }
        }
    }

    fn on_inbound(&mut self, stream: yamux::Stream) {
        match self.shared.inbound_slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let span = tracing::debug_span!("inbound", stream = %stream.id());
                let task =
                    handshake_task(stream, permit, self.shared.clone(), self.handles.clone());
                tokio::spawn(task.instrument(span));
            }
            Err(_) => {
                // The peer has more handshakes in flight than we serve at once (a peer using
                // this crate never does: its dials are bounded the same way). Resetting the
                // stream keeps yamux's hard stream limit, which would kill the link, out of reach.
                tracing::debug!(stream = %stream.id(), "too many inbound handshakes; resetting");
                drop(stream);
            }
        }
    }
}

/// Serves the listening side of one inbound stream's handshake, then hands the channel over.
async fn handshake_task(
    stream: yamux::Stream,
    permit: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
    handles: mpsc::WeakSender<Command>,
) {
    tokio::select! {
        _ = crate::listener::serve_inbound(stream, permit, &shared, handles) => {}
        _ = shared.ended.cancelled() => {}
    }
}

fn close_reason(e: yamux::ConnectionError) -> CloseReason {
    match e {
        yamux::ConnectionError::Io(e) => CloseReason::Io(Arc::new(e)),
        yamux::ConnectionError::Decode(yamux::FrameDecodeError::Io(e)) => {
            CloseReason::Io(Arc::new(e))
        }
        yamux::ConnectionError::Closed => CloseReason::Peer,
        other => CloseReason::Protocol(other.to_string()),
    }
}
