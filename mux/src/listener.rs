//! Listeners, and the listening side of the channel-open handshake that feeds them.

use crate::{
    channel::Conn,
    driver::Command,
    error::Error,
    handshake::{self, RequestError, Status},
    keepalive,
    session::{Session, Shared},
};
use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, OwnedSemaphorePermit},
};
use tokio_util::{
    compat::{Compat, FuturesAsyncReadCompatExt},
    sync::WaitForCancellationFutureOwned,
};
use tracing::Instrument;

/// Inbound channels dialed to one name. Created by [`Session::listen`]; dropping it frees the
/// name. Also a [`futures::Stream`] of accepted channels that ends after the session has ended.
pub struct Listener {
    name: Arc<str>,
    id: u64,
    accepted: mpsc::Receiver<Conn>,
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Keeps the session alive while somebody listens.
    session: Session,
    done: bool,
}

impl Listener {
    pub(crate) fn new(
        name: &str,
        id: u64,
        accepted: mpsc::Receiver<Conn>,
        session: Session,
    ) -> Listener {
        Listener {
            name: name.into(),
            id,
            accepted,
            ended: Box::pin(session.shared.ended.clone().cancelled_owned()),
            session,
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
            Poll::Ready(Some(conn)) => return Poll::Ready(Ok(conn)),
            Poll::Ready(None) => return Poll::Ready(Err(self.session.shared.closed_error())),
            Poll::Pending => {}
        }
        if self.session.shared.ended.is_cancelled() || self.ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.session.shared.closed_error()));
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
        self.session.shared.remove_listener(&self.name, self.id);
        tracing::debug!(name = %self.name, "listener dropped");
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("session", &self.session.shared.id)
            .finish()
    }
}

/// The listening side of one inbound stream: reads the request (within the handshake timeout),
/// decides, answers, and on acceptance queues the channel for its listener.
pub(crate) async fn serve_inbound(
    stream: yamux::Stream,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    handles: mpsc::WeakSender<Command>,
) {
    let mut io = stream.compat();
    let timeout = shared.config.handshake_timeout;
    let name = match tokio::time::timeout(timeout, handshake::read_request(&mut io)).await {
        Err(_) => {
            tracing::debug!(
                ?timeout,
                "inbound handshake not completed in time; dropping"
            );
            return;
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
    if name == handshake::KEEPALIVE_NAME {
        drop(permit);
        return keepalive::serve_echo(io, shared).await;
    }
    let span = tracing::debug_span!("channel", name = %name);
    serve_named(io, name, permit, shared, handles)
        .instrument(span)
        .await;
}

/// The decision for a well-formed request for `name`: refuse, or accept and queue.
async fn serve_named(
    mut io: Compat<yamux::Stream>,
    name: String,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    handles: mpsc::WeakSender<Command>,
) {
    let timeout = shared.config.handshake_timeout;
    if shared.is_closing() {
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
    let Some(handle) = handles.upgrade() else {
        return refuse(io, shared, Status::SessionClosing, "session is closing").await;
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
            return;
        }
    }
    drop(permit);
    let session = Session::from_parts(shared.clone(), handle);
    tracing::debug!("accepted");
    place.send(Conn::new(
        &name,
        io,
        Some(slot),
        shared.clone(),
        Some(session),
    ));
}

/// Answers a refusal and closes our side; bounded by the handshake timeout.
async fn refuse(mut io: Compat<yamux::Stream>, shared: &Shared, status: Status, reason: &str) {
    tracing::debug!(?status, reason, "refusing channel");
    let answer = async {
        io.write_all(&handshake::encode_reply(status, reason))
            .await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(shared.config.handshake_timeout, answer).await;
}
