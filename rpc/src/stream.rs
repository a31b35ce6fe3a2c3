//! Streaming calls: [`ResponseStream`] (client, responses), [`RequestSink`]
//! (client, requests of a bidirectional call) and [`RequestStream`] (server,
//! those requests).

use std::{
    fmt,
    future::Future,
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
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    sync::{mpsc, Semaphore},
    time::Instant,
};

use crate::{codec, error::chain, wire::Header, Client, Error, Status};

/// What the reader hands a stream: an item's payload or the end.
pub(crate) enum StreamEvent {
    /// An item; on the server, with its bytes counted against the conn's
    /// `max_in_flight_bytes` until the handler consumes it.
    Item(Bytes, Option<Held>),
    End(Option<Status>),
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

/// Counts one item consumed from a stream with credit `window`; returns the credit to grant
/// back once half a window (at least 1) has been consumed, and starts counting again.
/// Replenishing in batches of half a window means few credit frames, and the sender never
/// runs dry while the receiver keeps consuming.
fn count_consumed(consumed: &mut u32, window: u32) -> Option<u32> {
    *consumed += 1;
    if *consumed >= (window / 2).max(1) {
        Some(std::mem::take(consumed))
    } else {
        None
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
            Some(StreamEvent::Item(bytes, _)) => {
                if let Some(credit) = count_consumed(&mut this.consumed, this.window) {
                    this.client.shared().credit(this.id, credit);
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

/// The sending half of a bidirectional-streaming call, as returned by
/// [`Client::call_bidi`].
///
/// [`send`](RequestSink::send) waits for credit from the server, so a server
/// that does not consume requests makes the sender wait instead of letting
/// requests pile up. [`finish`](RequestSink::finish) (or dropping the sink)
/// ends the request stream; the server sees its end.
pub struct RequestSink<T> {
    client: Client,
    id: u64,
    method: String,
    credits: Arc<Semaphore>,
    /// The call's deadline: a wait for credit or room ends there.
    deadline: Option<Instant>,
    finished: bool,
    _item: PhantomData<fn(&T)>,
}

impl<T> RequestSink<T> {
    pub(crate) fn new(
        client: Client,
        id: u64,
        method: &str,
        credits: Arc<Semaphore>,
        deadline: Option<Instant>,
    ) -> Self {
        RequestSink {
            client,
            id,
            method: method.to_owned(),
            credits,
            deadline,
            finished: false,
            _item: PhantomData,
        }
    }

    /// Ends the request stream (the server's [`RequestStream`] ends).
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // A closed credit semaphore means the call is over: nobody listens.
        if !self.credits.is_closed() {
            let id = self.id;
            let _ = self.client.shared().outbox.push_now(|w| {
                codec::encode(w, &Header::StreamEnd { id, status: None }, "envelope")
            });
        }
    }

    fn ended(&self) -> Status {
        self.client.shared().closed_status().unwrap_or_else(|| {
            Status::failed_precondition(format!(
                "the call to {} ended; the request was not sent",
                self.method
            ))
        })
    }
}

impl<T: Serialize> RequestSink<T> {
    /// Sends one request item, waiting for credit from the server.
    ///
    /// Fails if the call has ended (the server finished, the call was
    /// cancelled or timed out, the conn is gone), with `DeadlineExceeded`
    /// once the call's deadline passes while it waits, or with
    /// `ResourceExhausted` if the item exceeds the message limit (nothing is
    /// sent; the call goes on). Cancel-safe: if the future is dropped before
    /// it resolves, the item was not sent.
    pub async fn send(&mut self, item: &T) -> Result<(), Status> {
        if self.finished {
            return Err(Status::failed_precondition(format!(
                "the request stream of {} is already finished",
                self.method
            )));
        }
        match self.deadline {
            None => self.send_now(item).await,
            // Both waits in `send_now` (credit, outbox room) are cancel-safe,
            // so giving up at the deadline sends nothing and loses no credit.
            Some(d) => match tokio::time::timeout_at(d, self.send_now(item)).await {
                Ok(res) => res,
                Err(_) => Err(crate::client::deadline_exceeded(&self.method)),
            },
        }
    }

    async fn send_now(&self, item: &T) -> Result<(), Status> {
        let Ok(permit) = self.credits.acquire().await else {
            return Err(self.ended());
        };
        let id = self.id;
        let pushed = self
            .client
            .shared()
            .outbox
            .push(|w| {
                codec::encode(w, &Header::StreamItem { id }, "envelope")?;
                codec::encode(w, item, "request item")
            })
            .await;
        match pushed {
            Ok(()) => {
                permit.forget();
                Ok(())
            }
            Err(Error::MessageTooLarge { max }) => Err(Status::resource_exhausted(format!(
                "a request item for {} exceeds the {max}-byte message limit; not sent",
                self.method
            ))),
            Err(Error::Closed) => Err(self.ended()),
            Err(e) => Err(e.to_status()),
        }
    }
}

impl<T> fmt::Debug for RequestSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSink")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T> Drop for RequestSink<T> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Grants the client more request credit (server side).
pub(crate) type GrantCredit = Arc<dyn Fn(u32) + Send + Sync>;

/// The requests of a bidirectional-streaming call, as a handler receives
/// them. Yields `Ok(item)`s until the client finishes; an item that does not
/// decode yields `Err(InvalidArgument)` and ends the stream. Consuming items
/// grants the client more credit; a handler that stops reading makes the
/// client's [`RequestSink::send`] wait.
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
        let Poll::Ready(event) = this.rx.poll_recv(cx) else {
            return Poll::Pending;
        };
        match event {
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
            None => {
                this.finished = true;
                Poll::Ready(Some(Err(Status::unavailable("rpc conn closed"))))
            }
        }
    }
}

/// Names the item type of a bidirectional method's request argument; used
/// by [`service!`](crate::service) to derive the client signature from
/// `RequestStream<T>`.
pub trait StreamArg {
    /// The item type.
    type Item;
}

impl<T> StreamArg for RequestStream<T> {
    type Item = T;
}
