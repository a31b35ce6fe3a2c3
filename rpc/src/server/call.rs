//! One call's task: the handler raced against cancellation and the
//! deadline, then the answer (a response, stream items and an end, or a
//! status).

use std::{
    any::Any,
    borrow::Cow,
    future::{poll_fn, Future},
    panic::AssertUnwindSafe,
    pin::pin,
    sync::Arc,
    task::Poll,
};

use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use super::{
    handler::{Input, Method},
    in_flight::ConnState,
};
use crate::{
    codec,
    context::Context,
    context::EndReason,
    error::chain,
    error::Error,
    status::Status,
    transport::{WhenFull, WithFds},
    wire::Header,
};

/// One running call.
pub(crate) struct Call {
    pub(super) conn: Arc<ConnState>,
    pub(super) id: u64,
    /// The call's context (a clone of the handler's): its deadline, its end,
    /// why it ended and the status it was aborted with, and the trailers.
    pub(super) ctx: Context,
}

impl Drop for Call {
    fn drop(&mut self) {
        // The call is over: work spawned with its context stops too. An
        // earlier reason (cancel, deadline, limit, the conn's end) stays.
        self.ctx.end_call(EndReason::Completed, None);
        self.conn.remove(self.id);
    }
}

fn panic_status(panic: Box<dyn Any + Send>) -> Status {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    Status::internal(format!("handler panicked: {what}"))
}

/// A handler's outcome, its panic made a status.
fn finished<T>(res: Result<Result<T, Status>, Box<dyn Any + Send>>) -> Result<T, Status> {
    res.unwrap_or_else(|p| {
        let status = panic_status(p);
        tracing::warn!(%status, "rpc handler panicked");
        Err(status)
    })
}

impl Call {
    /// Runs a unary call: `work` (the request's decoding and the handler) raced against
    /// the call's end, then the answer.
    pub(super) async fn run_unary<T: Serialize>(
        self,
        work: impl Future<Output = Result<T, Status>>,
    ) {
        let work = AssertUnwindSafe(work).catch_unwind();
        let Some(outcome) = self.race(work).await else {
            return;
        };
        self.send_trailers(&self.ctx).await;
        let fds = self.ctx.take_reply_fds();
        self.respond(self.ctx.method(), outcome, fds).await;
    }

    /// Runs a streaming call.
    pub(super) async fn run(
        self,
        handler: Method,
        ctx: Context,
        input: Input,
        credits: Option<Arc<Semaphore>>,
    ) {
        // Kept to send the trailers the handler sets.
        let trailers = &self.ctx;
        let credits = credits.unwrap_or_else(|| Arc::new(Semaphore::new(0)));
        let id = self.id;
        let conn = Arc::clone(&self.conn);
        let work = AssertUnwindSafe(async move {
            // The request payload moves into the handler, which drops it once decoded.
            let mut items = match (handler, input) {
                (Method::Stream(h), Input::Payload(payload)) => h(ctx, payload).await?,
                (Method::Bidi(h), Input::Stream(inbound)) => h(ctx, inbound).await?,
                _ => return Err(Status::internal("call kind and handler kind disagree")),
            };
            // The handler accepted the call: the caller's `call_stream`
            // resolves on this, before any item (docs/protocol.md, Part 2).
            match conn
                .outbox
                .push(|w| codec::encode_header(w, &Header::Accept { id }, "envelope"))
                .await
            {
                Ok(()) => {}
                Err(e) => return Err(e.to_status()),
            }
            loop {
                // Credit first: an item is produced only when it may be
                // sent, so nothing queues beyond the window.
                match credits.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Err(Status::internal("stream credit closed")),
                }
                let Some(item) = items.next().await else {
                    return Ok(());
                };
                let payload = item?;
                let pushed = conn
                    .outbox
                    .push_reply(WhenFull::Wait, |w| {
                        codec::encode_header(w, &Header::StreamItem { id }, "envelope")?;
                        payload(w)
                    })
                    .await;
                match pushed {
                    Ok(()) => {}
                    Err(Error::MessageTooLarge { max, by_peer }) => {
                        return Err(Status::resource_exhausted(format!(
                            "a stream item is over {} max_message_size of {max} bytes",
                            whose(by_peer)
                        )))
                    }
                    Err(e) => return Err(e.to_status()),
                }
            }
        })
        .catch_unwind();
        let Some(outcome) = self.race(work).await else {
            return;
        };
        self.send_trailers(trailers).await;
        let _ = self.conn.send_status(id, true, outcome.err()).await;
    }

    /// Runs `work` until it finishes, the deadline passes (an error
    /// outcome) or the call is cancelled (`None`: nobody wants an answer,
    /// unless the conn ended the call itself: then its status). Either way
    /// `work`, and with it the handler, is dropped on return.
    ///
    /// The first poll of `work` comes before the cancellation and the
    /// deadline are waited for (once it is seen that neither has happened
    /// yet): a handler that answers at once (most do) then costs no
    /// registration with the call's end and no timer. Later polls look at
    /// the cancellation and the deadline first, as a handler that waits is
    /// dropped as soon as either comes.
    async fn race<T>(
        &self,
        work: impl Future<Output = Result<Result<T, Status>, Box<dyn Any + Send>>>,
    ) -> Option<Result<T, Status>> {
        let mut work = pin!(work);
        let deadline = self.ctx.deadline();
        let live = |now: Option<Instant>| match (deadline, now) {
            (Some(d), Some(now)) => d > now,
            _ => true,
        };
        // Whether `work` was just polled (in this same poll of the task, so
        // with the waker the select below would give it).
        let mut polled = false;
        if !self.ctx.is_cancelled() && live(deadline.map(|_| Instant::now())) {
            if let Poll::Ready(res) = futures::poll!(work.as_mut()) {
                return Some(finished(res));
            }
            polled = true;
        }
        let work = poll_fn(|cx| match std::mem::take(&mut polled) {
            true => Poll::Pending,
            false => work.as_mut().poll(cx),
        });
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.ctx.cancelled() => {
                tracing::trace!("rpc handler dropped: call cancelled");
                // Set before the end, so it is seen here.
                self.ctx.aborted().cloned().map(Err)
            }
            _ = expired => {
                tracing::trace!("rpc handler dropped: deadline passed");
                self.ctx.end_call(EndReason::DeadlineExceeded, None);
                Some(Err(Status::deadline_exceeded("deadline passed while the handler ran")))
            }
            res = work => Some(finished(res)),
        }
    }

    /// Sends the trailers the handler set, if any, ahead of the answer.
    async fn send_trailers(&self, ctx: &Context) {
        let metadata = ctx.take_trailers();
        if metadata.is_empty() {
            return;
        }
        let id = self.id;
        let header = Header::Trailers {
            id,
            metadata: Cow::Owned(metadata),
        };
        if let Err(e) = self
            .conn
            .outbox
            .push(|w| codec::encode_header(w, &header, "trailers"))
            .await
        {
            tracing::debug!(id, error = %chain(&e), "rpc trailers not sent");
        }
    }

    /// Sends a unary call's answer; `fds` go with a successful response only (on failure
    /// they are closed here).
    async fn respond<T: Serialize>(
        &self,
        method: &str,
        outcome: Result<T, Status>,
        fds: Option<crate::fds::FdBatch>,
    ) {
        let id = self.id;
        let status = match outcome {
            Ok(payload) => {
                let fds = fds.map(|fds| WithFds { id, fds });
                let pushed = self
                    .conn
                    .outbox
                    .push_reply_with(WhenFull::Refuse, fds, move |w| {
                        codec::encode_header(
                            w,
                            &Header::Response { id, status: None },
                            "envelope",
                        )?;
                        codec::encode(w, &payload, "response")
                    })
                    .await;
                match pushed {
                    Ok(()) | Err(Error::Closed) => return,
                    Err(Error::MessageTooLarge { max, by_peer }) => {
                        Status::resource_exhausted(format!(
                            "the response of {method} is over {} max_message_size of {max} bytes",
                            whose(by_peer)
                        ))
                    }
                    Err(e @ Error::OutboundFull { .. }) => e.to_status(),
                    Err(e) => Status::internal(format!(
                        "could not send the response of {method}: {}",
                        chain(&e)
                    )),
                }
            }
            Err(status) => status,
        };
        let _ = self.conn.send_status(id, false, Some(status)).await;
    }
}

/// Whose `max_message_size` a reply was over, as the caller reads it.
fn whose(by_peer: bool) -> &'static str {
    if by_peer {
        "the client's"
    } else {
        "the server's"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::config::Config;

    /// Regression: `Call::run` kept a clone of a unary request's payload for
    /// the whole call, so a parked handler pinned the received frame (often a
    /// slice of the conn's 64 KiB read buffer) long after decoding it.
    #[tokio::test]
    async fn a_running_unary_call_does_not_keep_its_request_frame_alive() {
        struct Frame(Vec<u8>, Option<tokio::sync::oneshot::Sender<()>>);
        impl AsRef<[u8]> for Frame {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Frame {
            fn drop(&mut self) {
                if let Some(tx) = self.1.take() {
                    let _ = tx.send(());
                }
            }
        }
        let mut encoded = Vec::new();
        codec::encode(&mut encoded, &5u32, "request").unwrap();
        let (freed_tx, freed) = tokio::sync::oneshot::channel();
        let payload = Bytes::from_owner(Frame(encoded, Some(freed_tx)));

        let conn = Arc::new(ConnState::new(&Config::default()));
        let (decoded_tx, decoded) = tokio::sync::oneshot::channel();
        let decoded_tx = Mutex::new(Some(decoded_tx));
        let handler = Method::unary(move |_ctx, n: u32| {
            if let Some(tx) = decoded_tx.lock().unwrap().take() {
                let _ = tx.send(n);
            }
            std::future::pending::<Result<(), Status>>()
        });
        let ctx = Context::new(
            "T.park".into(),
            Default::default(),
            None,
            Default::default(),
        )
        .abortable();
        let call = Call {
            conn,
            id: 1,
            ctx: ctx.clone(),
        };
        let Method::Unary(start) = handler else {
            unreachable!("a unary method");
        };
        let running = tokio::spawn(start(call, ctx, payload, tracing::Span::none()));

        let bound = std::time::Duration::from_secs(5);
        assert_eq!(tokio::time::timeout(bound, decoded).await.unwrap(), Ok(5));
        tokio::time::timeout(bound, freed)
            .await
            .expect("the request frame is released once the handler has decoded it")
            .unwrap();
        assert!(!running.is_finished(), "the handler is still parked");
        running.abort();
    }
}
