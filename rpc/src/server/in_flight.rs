//! Admission and in-flight tracking: the calls running on one conn, the
//! request bytes they hold, and the frames routed to them.

use std::{
    collections::{hash_map::Entry, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    codec,
    config::Config,
    context::{Context, EndReason},
    error::Error,
    status::Status,
    stream::{Held, StreamEvent},
    transport::{FrameWriter, Outbox, Oversize, BIG_FRAME},
    wire::Header,
};

pub(super) struct CallEntry {
    /// The call's context: why it ended (and its waiters), and the status the call
    /// task answers with when the conn ends the call itself (request bytes
    /// over budget), set before the call is ended.
    pub(super) ctx: Context,
    /// Response credit of a streaming call.
    pub(super) credits: Option<Arc<Semaphore>>,
    /// Request items of a bidi call (bounded by the credit we
    /// grant: `stream_window` + 1 slots).
    pub(super) inbound: Option<mpsc::Sender<StreamEvent>>,
    /// Request payload bytes this call holds (counted against
    /// `max_in_flight_bytes`).
    pub(super) bytes: usize,
}

/// Whether a call may start.
pub(super) enum Admission {
    Admitted,
    TooManyCalls,
    TooManyBytes { held: usize },
}

/// The calls in flight on one conn and the request bytes they hold.
#[derive(Default)]
pub(super) struct Calls {
    pub(super) map: HashMap<u64, CallEntry>,
    pub(super) bytes: usize,
}

/// Per-conn state shared by the reader and the call tasks.
pub(super) struct ConnState {
    pub(super) outbox: Outbox,
    /// In-flight calls; bounded by `max_in_flight` and `max_in_flight_bytes`.
    pub(super) calls: Mutex<Calls>,
    /// Bytes of request items queued for bidi handlers and not yet
    /// consumed (see [`Held`]); part of the `max_in_flight_bytes` budget.
    pub(super) inbound_bytes: Arc<AtomicUsize>,
    /// Cancelled when serving ends (stops the writer; `end_calls` ends the calls).
    pub(super) token: CancellationToken,
    /// Notified whenever the last in-flight call ends while
    /// `idle_wanted` (graceful shutdown waits for it).
    pub(super) idle: Notify,
    /// Set once someone waits in [`ConnState::until_idle`]: until then the
    /// end of the last call notifies nobody (`notify_waiters` takes a lock,
    /// and sequential calls end the last call every time).
    idle_wanted: AtomicBool,
}

impl ConnState {
    pub(super) fn new(config: &Config) -> ConnState {
        ConnState {
            outbox: Outbox::new(config),
            calls: Mutex::new(Calls::default()),
            inbound_bytes: Arc::new(AtomicUsize::new(0)),
            token: CancellationToken::new(),
            idle: Notify::new(),
            idle_wanted: AtomicBool::new(false),
        }
    }

    /// Resolves once no call is in flight. Cancel-safe.
    pub(super) async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so an end in between is not lost;
            // wanted before the check (which takes the calls' lock), so a
            // `remove` that empties the map after it notifies.
            idle.as_mut().enable();
            self.idle_wanted.store(true, Ordering::SeqCst);
            if self.lock_calls().map.is_empty() {
                return;
            }
            idle.await;
        }
    }

    pub(super) fn lock_calls(&self) -> MutexGuard<'_, Calls> {
        // Nothing panics while holding this lock; tolerate poison anyway.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The in-flight entry of call `id`, if it is still running.
    pub(super) fn with_call<R>(&self, id: u64, f: impl FnOnce(&CallEntry) -> R) -> Option<R> {
        self.lock_calls().map.get(&id).map(f)
    }

    /// Request payload bytes held on this conn: requests of running calls
    /// and unconsumed request items.
    pub(super) fn held_bytes(&self, calls: &Calls) -> usize {
        calls
            .bytes
            .saturating_add(self.inbound_bytes.load(Ordering::SeqCst))
    }

    /// Hands a request item or end from the client to its call. An item
    /// that would take the conn's held request bytes past `limit` ends its
    /// call with `ResourceExhausted` instead of being queued.
    pub(super) fn route_inbound(
        &self,
        id: u64,
        mut event: StreamEvent,
        limit: usize,
    ) -> Result<(), Error> {
        let calls = self.lock_calls();
        let Some(entry) = calls.map.get(&id) else {
            // The call is over; late items are moot.
            return Ok(());
        };
        let Some(tx) = &entry.inbound else {
            return Err(Error::Protocol {
                reason: format!("request stream frame for call {id}, which takes no stream"),
            });
        };
        if entry.ctx.aborted().is_some() {
            // Ended by us; its handler is being dropped.
            return Ok(());
        }
        if let StreamEvent::Item(payload, held) = &mut event {
            let before = self.held_bytes(&calls);
            if before > 0 && before.saturating_add(payload.len()) > limit {
                let status = Status::resource_exhausted(format!(
                    "request items and calls in flight on this conn already hold {before} \
                     bytes (limit {limit})"
                ));
                tracing::debug!(id, %status, "rpc call ended: request bytes over budget");
                entry.ctx.end_call(EndReason::Refused, Some(status));
                return Ok(());
            }
            if payload.len() <= BIG_FRAME {
                // A small frame is a slice of the reader's shared read buffer:
                // held until the handler consumes it, it would keep that whole
                // buffer alive while counted at its own size.
                *payload = Bytes::copy_from_slice(payload);
            }
            *held = Some(Held::new(&self.inbound_bytes, payload.len()));
        }
        let is_item = matches!(event, StreamEvent::Item(..));
        match tx.try_send(event) {
            Err(mpsc::error::TrySendError::Full(_)) if is_item => Err(Error::Protocol {
                reason: format!("request item beyond the granted credit on call {id}"),
            }),
            // Closed: the handler stopped reading; a full channel on an
            // end: a repeated end. Both harmless.
            _ => Ok(()),
        }
    }

    /// Records call `id` as in flight, unless the conn is at its call or
    /// request-byte limit.
    pub(super) fn admit(
        &self,
        id: u64,
        config: &Config,
        entry: CallEntry,
    ) -> Result<Admission, Error> {
        let mut calls = self.lock_calls();
        if calls.map.len() >= config.max_in_flight {
            return Ok(Admission::TooManyCalls);
        }
        let held = self.held_bytes(&calls);
        if !calls.map.is_empty() && held.saturating_add(entry.bytes) > config.max_in_flight_bytes {
            return Ok(Admission::TooManyBytes { held });
        }
        let bytes = entry.bytes;
        // One lookup (the ids are the peer's: SipHash, so it cannot choose them
        // to collide).
        match calls.map.entry(id) {
            Entry::Occupied(_) => {
                return Err(Error::Protocol {
                    reason: format!("call id {id} reused while in flight"),
                })
            }
            Entry::Vacant(slot) => {
                slot.insert(entry);
            }
        }
        calls.bytes += bytes;
        Ok(Admission::Admitted)
    }

    /// Ends every call in flight: the conn is gone.
    pub(super) fn end_calls(&self) {
        let running: Vec<Context> = self
            .lock_calls()
            .map
            .values()
            .map(|entry| entry.ctx.clone())
            .collect();
        for ctx in running {
            ctx.end_call(EndReason::ConnClosed, None);
        }
    }

    /// Forgets call `id` (it is over), releasing its request bytes.
    pub(super) fn remove(&self, id: u64) {
        let mut calls = self.lock_calls();
        if let Some(entry) = calls.map.remove(&id) {
            calls.bytes -= entry.bytes;
        }
        if calls.map.is_empty() && self.idle_wanted.load(Ordering::SeqCst) {
            self.idle.notify_waiters();
        }
    }

    /// Answers the request, or ends the bidi call whose request item, was
    /// over our `max_message_size` (its payload was dropped unread): the
    /// caller gets `ResourceExhausted` naming the limit, and the conn
    /// carries on.
    pub(super) async fn refuse(&self, header: Header<'_>, oversize: Oversize) -> Result<(), Error> {
        let Oversize { len, max } = oversize;
        match header {
            Header::Request {
                id,
                method,
                stream_credit,
                ..
            } => {
                if self.lock_calls().map.contains_key(&id) {
                    return Err(Error::Protocol {
                        reason: format!("request reuses the id of call {id}, still in flight"),
                    });
                }
                let status = Status::resource_exhausted(format!(
                    "the {len}-byte request to {method} is over the server's max_message_size \
                     of {max} bytes"
                ));
                self.reply_error(id, stream_credit.is_some(), status).await
            }
            Header::StreamItem { id } => {
                let calls = self.lock_calls();
                let Some(entry) = calls.map.get(&id) else {
                    return Ok(());
                };
                if entry.inbound.is_none() {
                    return Err(Error::Protocol {
                        reason: format!(
                            "request stream frame for call {id}, which takes no stream"
                        ),
                    });
                }
                let status = Status::resource_exhausted(format!(
                    "a {len}-byte request item is over the server's max_message_size of {max} bytes"
                ));
                tracing::debug!(id, %status, "rpc call ended: request item too large");
                entry.ctx.end_call(EndReason::Refused, Some(status));
                Ok(())
            }
            _ => Err(Error::FrameTooLarge {
                len: len as u64,
                max,
            }),
        }
    }

    /// Answers call `id` with `status` in the form its caller expects.
    pub(super) async fn reply_error(
        &self,
        id: u64,
        streaming: bool,
        status: Status,
    ) -> Result<(), Error> {
        tracing::debug!(id, %status, "rpc call refused");
        self.send_status(id, streaming, Some(status)).await
    }

    /// Ends call `id` with `status` (`None` = a successful stream end). A
    /// status too large for the message limit is replaced by a short one,
    /// so every call gets its answer.
    pub(super) async fn send_status(
        &self,
        id: u64,
        streaming: bool,
        status: Option<Status>,
    ) -> Result<(), Error> {
        let encode = |status: Option<Status>| {
            let header = if streaming {
                Header::StreamEnd { id, status }
            } else {
                Header::Response { id, status }
            };
            move |w: &mut FrameWriter<'_>| codec::encode_header(w, &header, "envelope")
        };
        let res = match self.outbox.push(encode(status)).await {
            Err(Error::MessageTooLarge { max, .. }) => {
                let short = Status::resource_exhausted(format!(
                    "the error status exceeded the {max}-byte message limit"
                ));
                self.outbox.push(encode(Some(short))).await
            }
            res => res,
        };
        match res {
            // The conn is ending; the reader will notice.
            Err(Error::Closed) => Ok(()),
            res => res,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a small request item queued for a bidi handler
    /// was a slice of the conn's 64 KiB read buffer, so unread 1-byte items
    /// (counted as 1 byte each against `max_in_flight_bytes`) could each
    /// keep a whole read buffer alive.
    #[test]
    fn a_queued_request_item_does_not_pin_the_shared_read_buffer() {
        let conn = ConnState::new(&Config::default());
        let (tx, mut rx) = mpsc::channel(4);
        let entry = CallEntry {
            ctx: Context::detached("T.bidi"),
            credits: None,
            inbound: Some(tx),
            bytes: 0,
        };
        assert!(matches!(
            conn.admit(1, &Config::default(), entry),
            Ok(Admission::Admitted)
        ));
        let read_buffer = Bytes::from(vec![7u8; 64 << 10]);
        let item = read_buffer.slice(100..101);
        conn.route_inbound(1, StreamEvent::Item(item, None), usize::MAX)
            .unwrap();
        let Ok(StreamEvent::Item(queued, Some(held))) = rx.try_recv() else {
            panic!("the item was not queued with its byte count");
        };
        assert_eq!(&queued[..], &[7]);
        let buffer = read_buffer.as_ptr_range();
        assert!(
            !buffer.contains(&queued.as_ptr()),
            "the queued item still points into the read buffer"
        );
        assert_eq!(conn.inbound_bytes.load(Ordering::SeqCst), 1);
        drop(held);
        assert_eq!(conn.inbound_bytes.load(Ordering::SeqCst), 0);
    }
}
