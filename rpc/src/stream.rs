//! What both ends of a streaming call share: the events a reader hands a
//! stream, credit accounting, the item-type helper traits, and
//! [`RequestStream`] (the server's view of a bidi call's requests). The
//! client's ends ([`ResponseStream`](crate::ResponseStream),
//! [`RequestSink`](crate::RequestSink)) live in `client/streams.rs`; this
//! module depends on neither client nor server.

use std::{
    fmt,
    marker::PhantomData,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context as TaskContext, Poll},
};

use bytes::Bytes;
use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::{codec, error::chain, status::Status};

/// What the reader hands a stream: an item's payload or the end.
pub(crate) enum StreamEvent {
    /// An item; on the server, with its bytes counted against the conn's
    /// `max_in_flight_bytes` until the handler consumes it.
    Item(Bytes, Option<Held>),
    End(Option<Status>),
    /// The server's handler accepted the call (client side, streaming
    /// calls): sent before any item.
    Accepted,
    /// The handler's trailers (client side), just before the end.
    Trailers(crate::metadata::Metadata),
}

/// Request bytes a server holds for a call (an unconsumed request item),
/// counted in the conn's budget; released when dropped.
pub(crate) struct Held {
    counter: Arc<AtomicUsize>,
    bytes: usize,
}

impl Held {
    /// Counts `bytes` in `counter` until the returned value is dropped.
    pub(crate) fn new(counter: &Arc<AtomicUsize>, bytes: usize) -> Held {
        counter.fetch_add(bytes, Ordering::SeqCst);
        Held {
            counter: Arc::clone(counter),
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A boxed stream of items or a status, what server-streaming handlers
/// return (`Ok(Box::pin(stream))`).
pub type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Counts one item consumed from a stream with credit `window`; returns the credit to grant
/// back once half a window (at least 1) has been consumed, and starts counting again.
/// Replenishing in batches of half a window means few credit frames, and the sender never
/// runs dry while the receiver keeps consuming.
pub(crate) fn count_consumed(consumed: &mut u32, window: u32) -> Option<u32> {
    *consumed += 1;
    if *consumed >= (window / 2).max(1) {
        Some(std::mem::take(consumed))
    } else {
        None
    }
}

/// Grants the client more request credit (server side).
pub(crate) type GrantCredit = Arc<dyn Fn(u32) + Send + Sync>;

/// The requests of a bidi-streaming call, as a handler receives
/// them. Yields `Ok(item)`s until the client finishes; an item that does not
/// decode yields `Err(InvalidArgument)` and ends the stream. Consuming items
/// grants the client more credit; a handler that stops reading makes the
/// client's [`RequestSink::send`](crate::RequestSink::send) wait.
pub struct RequestStream<T> {
    rx: mpsc::Receiver<StreamEvent>,
    grant: GrantCredit,
    window: u32,
    consumed: u32,
    finished: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T> RequestStream<T> {
    pub(crate) fn new(
        rx: mpsc::Receiver<StreamEvent>,
        grant: GrantCredit,
        window: u32,
    ) -> RequestStream<T> {
        RequestStream {
            rx,
            grant,
            window,
            consumed: 0,
            finished: false,
            _item: PhantomData,
        }
    }
}

impl<T> fmt::Debug for RequestStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestStream")
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: DeserializeOwned> Stream for RequestStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            let Poll::Ready(event) = this.rx.poll_recv(cx) else {
                return Poll::Pending;
            };
            return match event {
                Some(StreamEvent::Item(bytes, held)) => {
                    if let Some(credit) = count_consumed(&mut this.consumed, this.window) {
                        (this.grant)(credit);
                    }
                    // Consumed: from here on the item is the handler's to keep.
                    drop(held);
                    match codec::decode_payload(&bytes, "request item") {
                        Ok(item) => Poll::Ready(Some(Ok(item))),
                        Err(e) => {
                            this.finished = true;
                            Poll::Ready(Some(Err(Status::invalid_argument(format!(
                                "could not decode a request item: {}",
                                chain(&e)
                            )))))
                        }
                    }
                }
                Some(StreamEvent::End(status)) => {
                    this.finished = true;
                    Poll::Ready(status.map(Err))
                }
                // Only ever sent to a client's response stream.
                Some(StreamEvent::Accepted | StreamEvent::Trailers(_)) => continue,
                None => {
                    this.finished = true;
                    Poll::Ready(Some(Err(Status::conn_lost("rpc conn closed"))))
                }
            };
        }
    }
}
