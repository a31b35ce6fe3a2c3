//! [`ResponseStream`]: the client side of a server-streaming call.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use bytes::Bytes;
use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, time::Instant};

use crate::{codec, error::chain, Client, Status};

/// What the reader hands a stream: an item's payload or the end.
pub(crate) enum StreamEvent {
    Item(Bytes),
    End(Option<Status>),
}

/// A boxed stream of items or a status, what server-streaming handlers
/// return (`Ok(Box::pin(stream))`).
pub type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The items of a server-streaming call, as returned by
/// [`Client::call_stream`].
///
/// Yields `Ok(item)`s, then ends; a failed call yields one `Err(status)`
/// (the server's, `DeadlineExceeded`, or `Unavailable` on conn loss) and
/// then ends. Consuming items grants the server more credit; a stream that
/// is not polled stops the server after [`Config::stream_window`] items
/// without affecting other calls. Dropping it cancels the call.
///
/// [`Config::stream_window`]: crate::Config::stream_window
pub struct ResponseStream<T> {
    client: Client,
    id: u64,
    method: String,
    rx: mpsc::Receiver<StreamEvent>,
    window: u32,
    /// Items consumed since the last credit grant.
    consumed: u32,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    finished: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T> ResponseStream<T> {
    pub(crate) fn new(
        client: Client,
        id: u64,
        method: &str,
        rx: mpsc::Receiver<StreamEvent>,
        window: u32,
        deadline: Option<Instant>,
    ) -> ResponseStream<T> {
        ResponseStream {
            client,
            id,
            method: method.to_owned(),
            rx,
            window,
            consumed: 0,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            finished: false,
            _item: PhantomData,
        }
    }

    /// Ends the stream locally; cancels the call if it is still running.
    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.client.shared().abandon(self.id, true);
        }
    }
}

impl<T> fmt::Debug for ResponseStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseStream")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: DeserializeOwned> Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.deadline.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                this.finish();
                return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "deadline passed before the stream of {} completed",
                    this.method
                )))));
            }
        }
        let Poll::Ready(event) = this.rx.poll_recv(cx) else {
            return Poll::Pending;
        };
        match event {
            Some(StreamEvent::Item(bytes)) => {
                this.consumed += 1;
                // Replenish in batches of half a window: few credit frames,
                // and the server never runs dry while we keep consuming.
                if this.consumed >= (this.window / 2).max(1) {
                    this.client.shared().credit(this.id, this.consumed);
                    this.consumed = 0;
                }
                match codec::decode_payload(&bytes, "stream item") {
                    Ok(item) => Poll::Ready(Some(Ok(item))),
                    Err(e) => {
                        this.finish();
                        Poll::Ready(Some(Err(Status::internal(format!(
                            "could not decode a stream item of {}: {}",
                            this.method,
                            chain(&e)
                        )))))
                    }
                }
            }
            Some(StreamEvent::End(status)) => {
                // The reader already removed the call.
                this.finished = true;
                Poll::Ready(status.map(Err))
            }
            None => {
                this.finished = true;
                let status = this
                    .client
                    .shared()
                    .closed_status()
                    .unwrap_or_else(|| Status::unavailable("rpc conn closed"));
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}

impl<T> Drop for ResponseStream<T> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Names the item type of a server-streaming method's return type; used by
/// [`service!`](crate::service) to derive client signatures from
/// `Result<ItemStream<T>, Status>`.
pub trait StreamReturn {
    /// The item type.
    type Item;
}

impl<T> StreamReturn for ItemStream<T> {
    type Item = T;
}
