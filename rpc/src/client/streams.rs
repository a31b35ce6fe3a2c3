//! The client's ends of streaming calls: [`ResponseStream`] (the
//! responses) and [`RequestSink`] (the requests of a bidi call).

use std::{
    borrow::Borrow,
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use futures::{Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Client;
use crate::{
    codec,
    error::chain,
    error::Error,
    metadata::Metadata,
    status::Status,
    stream::{count_consumed, StreamEvent},
    wire::Header,
};

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
#[must_use = "dropping a ResponseStream cancels its call"]
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
    /// The handler's trailers, once they arrived.
    trailers: Option<Metadata>,
    /// Set once the server's `Accept` arrived (see [`PendingResponse`]).
    accepted: bool,
    /// Stops the task sending a [`Client::call_bidi`]'s requests once this
    /// stream ends or is dropped.
    stop: Option<DropGuard>,
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
            trailers: None,
            accepted: false,
            stop: None,
            _item: PhantomData,
        }
    }

    /// Ends the stream locally; cancels the call if it is still running.
    fn finish(&mut self) {
        if !self.finished {
            self.ended();
            self.client.shared().abandon(self.id, true);
        }
    }

    /// Marks the stream ended (the reader already removed the call).
    fn ended(&mut self) {
        self.finished = true;
        self.stop = None;
    }

    /// The status for an error the stream itself hits: its deadline passed.
    fn poll_deadline(&mut self, cx: &mut TaskContext<'_>) -> Option<Status> {
        let sleep = self.deadline.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.finish();
        Some(Status::deadline_exceeded(format!(
            "deadline passed before the stream of {} completed",
            self.method
        )))
    }

    fn conn_closed(&self) -> Status {
        self.client
            .shared()
            .closed_status()
            .unwrap_or_else(|| Status::conn_lost("rpc conn closed"))
    }

    /// Waits for the server's `Accept` (docs/protocol.md, Part 2): `Ok` once
    /// the handler accepted the call; its early error (or the deadline, or
    /// conn loss) otherwise, after which the call is over.
    fn poll_accepted(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        if self.accepted {
            return Poll::Ready(Ok(()));
        }
        if self.finished {
            return Poll::Ready(Err(Status::failed_precondition(format!(
                "the call to {} already ended",
                self.method
            ))));
        }
        if let Some(status) = self.poll_deadline(cx) {
            return Poll::Ready(Err(status));
        }
        loop {
            let Poll::Ready(event) = self.rx.poll_recv(cx) else {
                return Poll::Pending;
            };
            return Poll::Ready(match event {
                Some(StreamEvent::Accepted) => {
                    self.accepted = true;
                    Ok(())
                }
                // Trailers of a refused call: its status follows.
                Some(StreamEvent::Trailers(metadata)) => {
                    self.trailers = Some(metadata);
                    continue;
                }
                Some(StreamEvent::End(status)) => {
                    self.ended();
                    Err(status.unwrap_or_else(|| {
                        Status::internal(format!(
                            "the server ended the stream of {} without accepting the call",
                            self.method
                        ))
                    }))
                }
                Some(StreamEvent::Item(..)) => {
                    self.finish();
                    Err(Status::internal(format!(
                        "the server sent an item of {} before accepting the call",
                        self.method
                    )))
                }
                None => {
                    self.ended();
                    Err(self.conn_closed())
                }
            });
        }
    }
}

impl<T> ResponseStream<T> {
    /// The response metadata (trailers) the handler set with
    /// [`Context::set_trailer`](crate::Context::set_trailer); they arrive
    /// just before the stream's end, so this is `None` until the stream
    /// has ended (and stays `None` if the handler set none).
    pub fn trailers(&self) -> Option<&Metadata> {
        self.trailers.as_ref()
    }
}

impl<T: DeserializeOwned> ResponseStream<T> {
    /// The call's one response, for a call that answers once (client
    /// streaming): the first item, or the call's error. Fails with
    /// `Internal` if the stream ends without an item or has more than one.
    /// Cancel-safe in the RPC sense: dropping the future cancels the call.
    pub async fn single(mut self) -> Result<T, Status> {
        let first = match self.next().await {
            Some(item) => item?,
            None => {
                return Err(Status::internal(format!(
                    "{} answered no response",
                    self.method
                )))
            }
        };
        match self.next().await {
            None => Ok(first),
            Some(Err(status)) => Err(status),
            Some(Ok(_)) => Err(Status::internal(format!(
                "{} answered more than one response",
                self.method
            ))),
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
        if let Some(status) = this.poll_deadline(cx) {
            return Poll::Ready(Some(Err(status)));
        }
        loop {
            let Poll::Ready(event) = this.rx.poll_recv(cx) else {
                return Poll::Pending;
            };
            return match event {
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
                // Only handed out once accepted (see `PendingResponse`);
                // a repeated acceptance is a protocol error in the reader.
                Some(StreamEvent::Accepted) => continue,
                Some(StreamEvent::Trailers(metadata)) => {
                    this.trailers = Some(metadata);
                    continue;
                }
                Some(StreamEvent::End(status)) => {
                    // The reader already removed the call.
                    this.ended();
                    Poll::Ready(status.map(Err))
                }
                None => {
                    this.ended();
                    Poll::Ready(Some(Err(this.conn_closed())))
                }
            };
        }
    }
}

impl<T> Drop for ResponseStream<T> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The response side of a bidi call opened with [`Client::open_bidi`],
/// before the server accepted it: a future that resolves to the
/// [`ResponseStream`] once the server's handler accepted the call (returned
/// its stream), or to the handler's early error (or `DeadlineExceeded`, or
/// `Unavailable` on conn loss).
///
/// Dropping it cancels the call. Cancel-safe in the RPC sense.
#[must_use = "dropping a PendingResponse cancels its call"]
pub struct PendingResponse<T> {
    /// `None` once resolved.
    stream: Option<ResponseStream<T>>,
}

impl<T> PendingResponse<T> {
    pub(crate) fn new(stream: ResponseStream<T>) -> PendingResponse<T> {
        PendingResponse {
            stream: Some(stream),
        }
    }

    /// Cancels `stop` when the call's responses end or are dropped.
    pub(crate) fn stop_on_end(mut self, stop: CancellationToken) -> PendingResponse<T> {
        if let Some(stream) = &mut self.stream {
            stream.stop = Some(stop.drop_guard());
        }
        self
    }
}

impl<T> fmt::Debug for PendingResponse<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stream {
            Some(stream) => f
                .debug_struct("PendingResponse")
                .field("id", &stream.id)
                .field("method", &stream.method)
                .finish(),
            None => f.write_str("PendingResponse(resolved)"),
        }
    }
}

impl<T> Future for PendingResponse<T> {
    type Output = Result<ResponseStream<T>, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Err(Status::failed_precondition(
                "a PendingResponse was polled after it resolved",
            )));
        };
        match stream.poll_accepted(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(
                self.stream
                    .take()
                    .ok_or_else(|| Status::internal("a PendingResponse lost its stream")),
            ),
            Poll::Ready(Err(status)) => {
                // Dropping the stream cancels what is left of the call.
                self.stream = None;
                Poll::Ready(Err(status))
            }
        }
    }
}

/// Sends `requests` through `sink` until they end (then finishes the sink),
/// the call ends, or `stop` is cancelled; what [`Client::call_bidi`] spawns.
/// A request that cannot be sent fails the call with its status.
pub(crate) async fn pump<Req, S>(mut sink: RequestSink<Req>, requests: S, stop: CancellationToken)
where
    Req: Serialize + Send,
    S: Stream<Item = Req>,
{
    let mut requests = std::pin::pin!(requests);
    let conn_gone = sink.client.shared().token.clone();
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = conn_gone.cancelled() => return,
            next = requests.next() => next,
        };
        let Some(item) = next else {
            sink.finish();
            return;
        };
        let sent = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            sent = sink.send_owned(item) => sent,
        };
        if let Err(status) = sent {
            // A call that already ended is not failed again (no-op then).
            sink.client.shared().fail(sink.id, status);
            return;
        }
    }
}

/// The sending half of a bidi-streaming call, as returned by
/// [`Client::call_bidi`].
///
/// [`send`](RequestSink::send) waits for credit from the server, so a server
/// that does not consume requests makes the sender wait instead of letting
/// requests pile up. [`finish`](RequestSink::finish) (or dropping the sink)
/// ends the request stream; the server sees its end.
#[must_use = "dropping a RequestSink ends the call's requests"]
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

    /// Ends the request stream (the server's [`RequestStream`](crate::RequestStream) ends).
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
                codec::encode_header(w, &Header::StreamEnd { id, status: None }, "envelope")
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
        self.send_item(item).await
    }

    /// [`RequestSink::send`] with an owned item: the future needs only
    /// `T: Send`, not `T: Sync`.
    pub(crate) async fn send_owned(&mut self, item: T) -> Result<(), Status> {
        self.send_item(item).await
    }

    async fn send_item<I: Borrow<T>>(&mut self, item: I) -> Result<(), Status> {
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
                Err(_) => Err(super::deadline_exceeded(&self.method)),
            },
        }
    }

    async fn send_now<I: Borrow<T>>(&self, item: I) -> Result<(), Status> {
        let Ok(permit) = self.credits.acquire().await else {
            return Err(self.ended());
        };
        let id = self.id;
        let pushed = self
            .client
            .shared()
            .outbox
            .push(move |w| {
                codec::encode_header(w, &Header::StreamItem { id }, "envelope")?;
                codec::encode(w, item.borrow(), "request item")
            })
            .await;
        match pushed {
            Ok(()) => {
                permit.forget();
                Ok(())
            }
            Err(Error::MessageTooLarge { max, by_peer }) => {
                Err(Status::resource_exhausted(format!(
                    "a request item for {} is over {} max_message_size of {max} bytes; not sent",
                    self.method,
                    if by_peer {
                        "the server's"
                    } else {
                        "this client's"
                    }
                )))
            }
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
