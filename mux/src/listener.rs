//! Listeners, and the listening side of the channel-open handshake that feeds them.

use crate::{
    channel::Conn,
    error::Error,
    handshake::{self, RequestError, Status},
    shared::{Accepted, HandleToken, Shared},
    stream::RawStream,
};
use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
};
use tokio::{io::AsyncWriteExt, sync::mpsc, sync::OwnedSemaphorePermit};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::Instrument;

/// Inbound channels dialed to one name. Created by [`Session::listen`](crate::Session::listen)
/// (or [`SessionBuilder::listen`](crate::SessionBuilder::listen)); dropping it frees the name.
/// Also a [`futures::Stream`] of accepted channels that ends after the session has ended.
pub struct Listener {
    name: Arc<str>,
    id: u64,
    accepted: mpsc::Receiver<Accepted>,
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Arc<Shared>,
    /// Keeps the session alive while somebody listens.
    token: Arc<HandleToken>,
    done: bool,
}

impl Listener {
    pub(crate) fn new(
        name: &str,
        id: u64,
        accepted: mpsc::Receiver<Accepted>,
        shared: Arc<Shared>,
        token: Arc<HandleToken>,
    ) -> Listener {
        Listener {
            name: name.into(),
            id,
            accepted,
            ended: Box::pin(shared.ended.clone().cancelled_owned()),
            shared,
            token,
            done: false,
        }
    }

    /// Waits for the next channel the peer dials to this name.
    ///
    /// Cancel-safe: a channel is never lost if this future is dropped. Returns
    /// [`Error::SessionClosed`] once the session has ended.
    pub async fn accept(&mut self) -> Result<Conn, Error> {
        futures::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// The name this listener serves.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Conn, Error>> {
        match self.accepted.poll_recv(cx) {
            Poll::Ready(Some(a)) => {
                let conn = Conn::new(
                    a.name,
                    RawStream::new(a.stream),
                    Some(a.slot),
                    Some(self.token.clone()),
                );
                return Poll::Ready(Ok(conn));
            }
            Poll::Ready(None) => return Poll::Ready(Err(self.shared.closed_error())),
            Poll::Pending => {}
        }
        if self.shared.ended.is_cancelled() || self.ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.shared.closed_error()));
        }
        Poll::Pending
    }
}

impl futures::Stream for Listener {
    type Item = Result<Conn, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        this.poll_accept(cx).map(|r| {
            this.done = r.is_err();
            Some(r)
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shared.remove_listener(&self.name, self.id);
        tracing::debug!(name = %self.name, "listener dropped");
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("session", &self.shared.id)
            .finish()
    }
}

/// Takes a new inbound stream from the driver: serves its handshake in a task of its own
/// (tracked by the session, and ended with it), or
/// resets it at once if too many handshakes are in flight (that stream only).
pub(crate) fn on_inbound(stream: RawStream, token: &Weak<HandleToken>) {
    let shared = stream.shared().clone();
    match shared.inbound_slots.clone().try_acquire_owned() {
        Ok(permit) => {
            let span = tracing::debug_span!("inbound", stream = stream.id());
            let token = token.clone();
            let tasks = shared.tasks.clone();
            tasks.spawn(
                async move {
                    tokio::select! {
                        _ = serve_inbound(stream, permit, &shared, token) => {}
                        _ = shared.ended.cancelled() => {}
                    }
                }
                .instrument(span),
            );
        }
        Err(_) => {
            // The peer has more handshakes in flight than we serve at once (a peer using this
            // crate never does: its dials are bounded the same way).
            tracing::debug!(
                stream = stream.id(),
                "too many inbound handshakes; resetting"
            );
            stream.reset();
        }
    }
}

/// The listening side of one inbound stream: reads the request (within the handshake timeout),
/// decides, answers, and on acceptance queues the channel for its listener.
async fn serve_inbound(
    mut io: RawStream,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    token: Weak<HandleToken>,
) {
    let timeout = shared.config.handshake_timeout;
    let name = match tokio::time::timeout(timeout, handshake::read_request(&mut io)).await {
        Err(_) => {
            tracing::debug!(
                ?timeout,
                "inbound handshake not completed in time; resetting"
            );
            return io.reset();
        }
        Ok(Err(RequestError::Io(e))) => {
            tracing::debug!(error = %e, "inbound stream ended during the handshake");
            return;
        }
        Ok(Err(RequestError::Version(v))) => {
            let reason = format!(
                "unsupported handshake version {v}; this side speaks {}",
                handshake::VERSION
            );
            return refuse(io, shared, Status::UnsupportedVersion, &reason).await;
        }
        Ok(Err(RequestError::Name(e))) => {
            return refuse(io, shared, Status::InvalidName, &e.to_string()).await;
        }
        Ok(Ok(name)) => name,
    };
    let span = tracing::debug_span!("channel", name = %name);
    serve_named(io, name, permit, shared, token)
        .instrument(span)
        .await;
}

/// The decision for a well-formed request for `name`: refuse, or accept and queue.
async fn serve_named(
    mut io: RawStream,
    name: String,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    token: Weak<HandleToken>,
) {
    let timeout = shared.config.handshake_timeout;
    if shared.is_closing() || token.upgrade().is_none() {
        return refuse(io, shared, Status::SessionClosing, "session is closing").await;
    }
    let Some(sender) = shared.listener_sender(&name) else {
        let reason = format!("no listener for channel {name:?}");
        return refuse(io, shared, Status::NoListener, &reason).await;
    };
    let Some(slot) = shared.try_channel_slot() else {
        let reason = format!(
            "too many open channels (limit {})",
            shared.config.channel_limit()
        );
        return refuse(io, shared, Status::TooManyChannels, &reason).await;
    };
    let place = match tokio::time::timeout(timeout / 2, sender.reserve_owned()).await {
        Ok(Ok(place)) => place,
        Ok(Err(_)) => {
            let reason = format!("no listener for channel {name:?}");
            return refuse(io, shared, Status::NoListener, &reason).await;
        }
        Err(_) => {
            let reason = format!("listener for {name:?} is not accepting (backlog full)");
            return refuse(io, shared, Status::Busy, &reason).await;
        }
    };
    let answer = async {
        io.write_all(&handshake::encode_reply(Status::Accepted, ""))
            .await?;
        io.flush().await
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not accept");
            return;
        }
        Err(_) => {
            tracing::debug!("could not send the acceptance in time");
            return io.reset();
        }
    }
    drop(permit);
    tracing::debug!("accepted");
    place.send(Accepted {
        stream: io.into_handle(),
        slot,
        name: name.into(),
    });
}

/// Answers a refusal and closes our side; bounded by the handshake timeout.
async fn refuse(mut io: RawStream, shared: &Shared, status: Status, reason: &str) {
    tracing::debug!(?status, reason, "refusing channel");
    let answer = async {
        io.write_all(&handshake::encode_reply(status, reason))
            .await?;
        io.shutdown().await
    };
    if tokio::time::timeout(shared.config.handshake_timeout, answer)
        .await
        .is_err()
    {
        io.reset();
    }
}
