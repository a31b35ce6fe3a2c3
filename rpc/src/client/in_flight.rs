//! The client's in-flight calls: the map from call id to the caller
//! waiting for it, the reader that fills it, and the guard that cancels a
//! call its caller abandoned.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    sync::{atomic::AtomicU64, Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use tokio::{
    io::AsyncRead,
    sync::{mpsc, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::{
    codec,
    config::Config,
    error::Error,
    fds::{Fd, FdInbox, FdLink},
    metadata::{Interceptor, Metadata},
    status::Status,
    stream::StreamEvent,
    transport::{read_preamble, Batch, FrameReader, Outbox, Oversize},
    wire::{Frame, Header, CONN_ID},
};

/// Closes the outbox when the last `Client` clone goes away.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    /// An empty interceptor list, shared by the clients made from a weak
    /// handle (an empty `Arc<[_]>` is still an allocation, and a handler
    /// calling its caller back makes one such client per call).
    pub(crate) no_interceptors: Arc<[Interceptor]>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.outbox.close();
    }
}

pub(crate) enum Pending {
    /// A unary call: its answer (the response, the handler's trailers and the descriptors
    /// that came with the response), kept here until its caller takes it.
    Unary(Slot),
    /// A streaming call: its response items, and for a bidi call
    /// the credit the server granted for request items (closed when the
    /// call ends, so a waiting sender learns of it).
    Stream(mpsc::Sender<StreamEvent>, Option<Arc<Semaphore>>),
}

/// What a unary call receives: the response payload, the trailers, and the file
/// descriptors that came with it.
pub(crate) type UnaryReply = (Bytes, Metadata, Vec<Fd>);

/// Where a unary call's answer waits for its caller, in the call's in-flight entry (no
/// allocation and no channel per call). The caller removes the entry when it takes the
/// answer; a caller that is gone removes it through its [`CallGuard`].
pub(crate) enum Slot {
    /// No answer yet: the caller's waker, once it has polled.
    Waiting(Option<Waker>),
    /// The answer.
    Done(Result<UnaryReply, Status>),
}

impl Slot {
    /// Stores `answer` (unless one is there) and returns the waker to wake, which the
    /// caller wakes once the state's lock is let go.
    fn answer(&mut self, answer: Result<UnaryReply, Status>) -> Option<Waker> {
        match self {
            Slot::Waiting(waker) => {
                let waker = waker.take();
                *self = Slot::Done(answer);
                waker
            }
            Slot::Done(_) => None,
        }
    }
}

/// Most request credit the server may grant outstanding; more is clamped.
const MAX_SEND_CREDIT: usize = 1 << 20;

/// Hashes call ids with one multiplication instead of SipHash: a client's
/// ids are its own (sequential, from `next_id`), so no peer can choose keys
/// that collide, and every call inserts and removes at least one entry.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct IdHash;

/// The hasher [`IdHash`] builds.
#[derive(Debug, Default)]
pub(super) struct IdHasher(u64);

/// 2^64 / the golden ratio: multiplying by it spreads sequential ids over
/// the high bits, which the map's control bytes use, as well as the low.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(FIBONACCI);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by this client's call ids.
pub(super) type IdMap<V> = HashMap<u64, V, IdHash>;

pub(super) struct State {
    pub(super) pending: IdMap<Pending>,
    /// Trailers of pending unary calls whose response has not arrived
    /// yet; at most one entry per pending call.
    pub(super) trailers: IdMap<Metadata>,
    /// Set once, when the conn fails: every later call gets it.
    pub(super) closed: Option<Status>,
}

pub(crate) struct Shared {
    pub(crate) outbox: Outbox,
    pub(super) state: Mutex<State>,
    pub(super) next_id: AtomicU64,
    /// Cancelled when the conn is gone (reader, writer and `closed()` watch it).
    pub(crate) token: CancellationToken,
    pub(crate) config: Config,
    /// The conn's descriptor handle (descriptors go with requests only on a mux channel
    /// of a session that passes them).
    pub(crate) fds: FdLink,
}

impl Shared {
    /// The state of a new conn with `config`, passing descriptors through `fds`: no call
    /// pending, ids from 1.
    pub(super) fn new(config: Config, fds: FdLink) -> Shared {
        Shared {
            outbox: Outbox::new(&config),
            state: Mutex::new(State {
                pending: IdMap::default(),
                trailers: IdMap::default(),
                closed: None,
            }),
            next_id: AtomicU64::new(1),
            token: CancellationToken::new(),
            config,
            fds,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock; tolerate poison anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn register(&self, id: u64, pending: Pending) -> Result<(), Status> {
        let mut st = self.lock();
        if let Some(status) = &st.closed {
            return Err(status.clone());
        }
        st.pending.insert(id, pending);
        Ok(())
    }

    /// The answer to unary call `id` if it has come (its entry is then gone), or
    /// `Pending` with `cx`'s waker kept to be woken when it comes.
    pub(super) fn poll_answer(
        &self,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<UnaryReply, Status>> {
        let mut st = self.lock();
        let Some(Pending::Unary(slot)) = st.pending.get_mut(&id) else {
            // Never expected: the entry stays until the caller takes its answer (the
            // conn's end answers it too).
            return Poll::Ready(Err(Status::conn_lost("rpc conn closed")));
        };
        match slot {
            Slot::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(_) => match st.pending.remove(&id) {
                Some(Pending::Unary(Slot::Done(answer))) => Poll::Ready(answer),
                _ => unreachable!("the entry was just seen answered"),
            },
        }
    }

    /// Forgets call `id`; if it was still pending and its request went out,
    /// tells the server to stop working on it.
    pub(crate) fn abandon(&self, id: u64, request_sent: bool) {
        let removed = {
            let mut st = self.lock();
            st.trailers.remove(&id);
            st.pending.remove(&id)
        };
        let answered = match &removed {
            Some(Pending::Stream(_, Some(credits))) => {
                credits.close();
                false
            }
            // Over at the server: nothing to cancel (its descriptors close here).
            Some(Pending::Unary(Slot::Done(_))) => true,
            _ => false,
        };
        if removed.is_some() && !answered && request_sent {
            let _ = self
                .outbox
                .push_now(|w| codec::encode_header(w, &Header::Cancel { id }, "cancel"));
        }
    }

    /// Fails streaming call `id` locally with `status` (its response stream
    /// yields it) and tells the server to stop working on it; a no-op once
    /// the call has ended.
    pub(crate) fn fail(&self, id: u64, status: Status) {
        let removed = {
            let mut st = self.lock();
            st.trailers.remove(&id);
            st.pending.remove(&id)
        };
        let Some(Pending::Stream(tx, credits)) = removed else {
            return;
        };
        // At most a window of items, the acceptance and the trailers are
        // queued, and nothing follows: the end always fits.
        let _ = tx.try_send(StreamEvent::End(Some(status)));
        if let Some(credits) = credits {
            credits.close();
        }
        let _ = self
            .outbox
            .push_now(|w| codec::encode_header(w, &Header::Cancel { id }, "cancel"));
    }

    /// Grants `n` more items to stream `id`.
    pub(crate) fn credit(&self, id: u64, n: u32) {
        let _ = self
            .outbox
            .push_now(|w| codec::encode_header(w, &Header::Credit { id, n }, "credit"));
    }

    /// Why the conn is gone, if it is.
    pub(crate) fn closed_status(&self) -> Option<Status> {
        self.lock().closed.clone()
    }

    /// Fails every pending call with `status` and ends the conn. Unary calls keep their
    /// entries, answered, until their callers take the answer.
    pub(super) fn shutdown(&self, status: Status) {
        let mut wakers = Vec::new();
        let streams = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(status.clone());
            st.trailers.clear();
            let mut streams = Vec::new();
            for (id, p) in std::mem::take(&mut st.pending) {
                match p {
                    Pending::Unary(mut slot) => {
                        wakers.extend(slot.answer(Err(status.clone())));
                        st.pending.insert(id, Pending::Unary(slot));
                    }
                    Pending::Stream(tx, credits) => streams.push((tx, credits)),
                }
            }
            streams
        };
        tracing::debug!(
            %status,
            calls = wakers.len() + streams.len(),
            "rpc client conn ended"
        );
        wakers.into_iter().for_each(Waker::wake);
        for (tx, credits) in streams {
            let _ = tx.try_send(StreamEvent::End(Some(status.clone())));
            if let Some(credits) = credits {
                credits.close();
            }
        }
        self.outbox.close();
        self.token.cancel();
    }

    /// Fails the call whose response or stream item was over our
    /// `max_message_size` (its payload was dropped unread); the conn carries
    /// on. A stream is cancelled at the server.
    pub(super) fn refuse(&self, header: Header<'_>, oversize: Oversize) -> Result<(), Error> {
        let Oversize { len, max } = oversize;
        let status = |what: &str| {
            Status::resource_exhausted(format!(
                "the server sent a {len}-byte {what}, over this client's max_message_size of \
                 {max} bytes"
            ))
        };
        match header {
            Header::Response { id, .. } => {
                let status = status("response");
                tracing::debug!(id, %status, "rpc response refused");
                self.dispatch(
                    Frame {
                        header: Header::Response {
                            id,
                            status: Some(status),
                        },
                        payload: Bytes::new(),
                    },
                    Vec::new(),
                )
            }
            Header::StreamItem { id } => {
                if let Some(Pending::Unary(_)) = self.lock().pending.get(&id) {
                    return Err(Error::Protocol {
                        reason: format!("stream item for unary call {id}"),
                    });
                }
                let status = status("stream item");
                tracing::debug!(id, %status, "rpc stream item refused");
                self.fail(id, status);
                Ok(())
            }
            _ => Err(Error::FrameTooLarge {
                len: len as u64,
                max,
            }),
        }
    }

    /// Routes one frame from the server to its call.
    pub(super) fn dispatch(&self, frame: Frame<'_>, fds: Vec<Fd>) -> Result<(), Error> {
        let Frame { header, payload } = frame;
        let mut guard = self.lock();
        let st = &mut *guard;
        // The caller to wake once the lock is let go.
        let mut wake = None;
        match header {
            Header::Response { id, status } => match st.pending.get_mut(&id) {
                Some(Pending::Unary(slot)) => {
                    let trailers = st.trailers.remove(&id).unwrap_or_default();
                    wake = slot.answer(match status {
                        None => Ok((payload, trailers, fds)),
                        Some(s) => Err(s),
                    });
                }
                Some(Pending::Stream(..)) => {
                    let Some(Pending::Stream(tx, credits)) = st.pending.remove(&id) else {
                        unreachable!("the entry was just seen");
                    };
                    let s = status.unwrap_or_else(|| {
                        Status::internal("server answered a streaming call with a unary response")
                    });
                    let _ = tx.try_send(StreamEvent::End(Some(s)));
                    if let Some(credits) = credits {
                        credits.close();
                    }
                }
                // Cancelled or timed out meanwhile: the answer is moot.
                None => {}
            },
            Header::StreamItem { id } => match st.pending.get(&id) {
                Some(Pending::Stream(tx, _)) => match tx.try_send(StreamEvent::Item(payload, None))
                {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        return Err(Error::Protocol {
                            reason: format!("stream item beyond the granted credit on call {id}"),
                        })
                    }
                },
                Some(Pending::Unary(_)) => {
                    return Err(Error::Protocol {
                        reason: format!("stream item for unary call {id}"),
                    })
                }
                None => {}
            },
            Header::StreamEnd { id, status } => match st.pending.get_mut(&id) {
                Some(Pending::Stream(..)) => {
                    let Some(Pending::Stream(tx, credits)) = st.pending.remove(&id) else {
                        unreachable!("the entry was just seen");
                    };
                    // The channel has one slot beyond the credit window for this.
                    let _ = tx.try_send(StreamEvent::End(status));
                    if let Some(credits) = credits {
                        credits.close();
                    }
                }
                Some(Pending::Unary(slot)) => {
                    st.trailers.remove(&id);
                    wake = slot.answer(Err(status.unwrap_or_else(|| {
                        Status::internal("server answered a unary call with a stream end")
                    })));
                }
                None => {}
            },
            Header::Credit { id, n } => match st.pending.get(&id) {
                Some(Pending::Stream(_, Some(credits))) => {
                    let room = MAX_SEND_CREDIT.saturating_sub(credits.available_permits());
                    credits.add_permits((n as usize).min(room));
                }
                Some(_) => {
                    return Err(Error::Protocol {
                        reason: format!("request credit for call {id}, which sends no stream"),
                    })
                }
                None => {}
            },
            Header::Trailers { id, metadata } => match st.pending.get(&id) {
                Some(Pending::Unary(_)) => {
                    st.trailers.insert(id, metadata.into_owned());
                }
                Some(Pending::Stream(tx, _)) => {
                    match tx.try_send(StreamEvent::Trailers(metadata.into_owned())) {
                        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            return Err(Error::Protocol {
                                reason: format!("repeated trailers for call {id}"),
                            })
                        }
                    }
                }
                None => {}
            },
            Header::Accept { id } => match st.pending.get(&id) {
                Some(Pending::Stream(tx, _)) => match tx.try_send(StreamEvent::Accepted) {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        return Err(Error::Protocol {
                            reason: format!("repeated accept of call {id}"),
                        })
                    }
                },
                Some(Pending::Unary(_)) => {
                    return Err(Error::Protocol {
                        reason: format!("accept frame for unary call {id}"),
                    })
                }
                None => {}
            },
            Header::Request { .. }
            | Header::Open { .. }
            | Header::Cancel { .. }
            | Header::Fds { .. } => {
                return Err(Error::Protocol {
                    reason: "client conn received a request-side frame".into(),
                })
            }
        }
        drop(guard);
        if let Some(waker) = wake {
            waker.wake();
        }
        Ok(())
    }
}

/// Cancels a call on drop unless it completed: the `ResponseGuard` idea.
pub(super) struct CallGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
    pub(super) sent: bool,
    pub(super) done: bool,
}

impl CallGuard<'_> {
    /// Keeps the call running past the guard (a stream now owns it); returns its id.
    pub(super) fn keep(mut self) -> u64 {
        self.done = true;
        self.id
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            tracing::trace!(id = self.id, "rpc call abandoned");
            self.shared.abandon(self.id, self.sent);
        }
    }
}

/// Reads and dispatches the server's frames; `exact`: the conn writes only
/// the bytes it delivers (see `FrameReader::writes_only_delivered`).
pub(super) async fn read_loop<R>(
    shared: &Shared,
    rd: R,
    exact: bool,
    fds: FdLink,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    let mut inbox = FdInbox::new(fds);
    let mut reader = FrameReader::new(rd, &shared.config).writes_only_delivered(exact);
    let after = shared.config.handshake_timeout;
    tokio::time::timeout(after, read_preamble(reader.io_mut()))
        .await
        .map_err(|_| Error::HandshakeTimeout { after })??;
    let mut batch = Batch::new(&shared.outbox);
    while let Some(incoming) = batch.next(reader.next_frame()).await? {
        let (frame, oversize) = incoming.decode()?;
        if let Header::Credit { id: CONN_ID, n } = frame.header {
            let (limit, _) = shared.outbox.learn_peer_limit(n);
            reader.set_peer_limit(limit);
            continue;
        }
        batch.add();
        if let Some((frame, fds)) = inbox.route(frame)? {
            match oversize {
                None => shared.dispatch(frame, fds)?,
                // Descriptors sent with it are closed with the message.
                Some(oversize) => shared.refuse(frame.header, oversize)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::task::{waker, ArcWake};

    use super::*;

    fn shared() -> Shared {
        Shared::new(Config::default(), FdLink::default())
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn response(id: u64, status: Option<Status>, payload: &'static [u8]) -> Frame<'static> {
        Frame {
            header: Header::Response { id, status },
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn a_waiting_caller_is_woken_by_its_answer_which_it_takes_with_the_entry() {
        let shared = shared();
        shared
            .register(1, Pending::Unary(Slot::Waiting(None)))
            .unwrap();
        let wakes = Arc::new(Wakes::default());
        let waker = waker(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert!(shared.poll_answer(1, &mut cx).is_pending());
        shared
            .dispatch(response(1, None, b"answer"), Vec::new())
            .unwrap();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(Ok((payload, _, _))) = shared.poll_answer(1, &mut cx) else {
            panic!("no answer");
        };
        assert_eq!(&payload[..], b"answer");
        assert!(
            shared.lock().pending.is_empty(),
            "the entry left with its answer"
        );
    }

    #[test]
    fn an_answer_whose_caller_is_gone_is_dropped_with_its_entry_and_cancels_nothing() {
        let shared = shared();
        shared
            .register(1, Pending::Unary(Slot::Waiting(None)))
            .unwrap();
        // Answered before its caller ever polled (no waker: nothing to wake).
        shared
            .dispatch(response(1, None, b"answer"), Vec::new())
            .unwrap();
        let queued = shared.outbox.queued_bytes();
        // The caller's future is dropped: its guard abandons the call.
        shared.abandon(1, true);
        assert!(
            shared.lock().pending.is_empty(),
            "the answered entry leaked"
        );
        assert_eq!(
            shared.outbox.queued_bytes(),
            queued,
            "a cancel was queued for a call the server had answered"
        );
        // An unanswered call abandoned is cancelled at the server.
        shared
            .register(2, Pending::Unary(Slot::Waiting(None)))
            .unwrap();
        shared.abandon(2, true);
        assert!(shared.lock().pending.is_empty());
        assert!(
            shared.outbox.queued_bytes() > queued,
            "no cancel was queued"
        );
        // A late answer for it is moot.
        shared
            .dispatch(response(2, None, b"late"), Vec::new())
            .unwrap();
        assert!(shared.lock().pending.is_empty());
    }

    #[test]
    fn the_conns_end_answers_waiting_callers_and_refuses_new_calls() {
        let shared = shared();
        shared
            .register(1, Pending::Unary(Slot::Waiting(None)))
            .unwrap();
        shared
            .register(2, Pending::Unary(Slot::Waiting(None)))
            .unwrap();
        let wakes = Arc::new(Wakes::default());
        let waker = waker(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert!(shared.poll_answer(1, &mut cx).is_pending());
        shared.shutdown(Status::conn_lost("gone"));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(Err(status)) = shared.poll_answer(1, &mut cx) else {
            panic!("no answer");
        };
        assert!(status.is_conn_lost(), "{status}");
        // Call 2's caller is gone: its guard removes the answered entry.
        shared.abandon(2, true);
        assert!(shared.lock().pending.is_empty());
        assert!(shared
            .register(3, Pending::Unary(Slot::Waiting(None)))
            .is_err_and(|s| s.is_conn_lost()));
    }

    #[test]
    fn sequential_ids_hash_to_distinct_buckets_and_high_bits() {
        let hash = |id: u64| IdHash.hash_one(id);
        // Sequential ids differ in the low bits (the bucket) and in the top
        // seven (the control byte) of nearly every pair.
        let mut buckets = std::collections::HashSet::new();
        let mut tops = std::collections::HashSet::new();
        for id in 1..=64u64 {
            buckets.insert(hash(id) & 63);
            tops.insert(hash(id) >> 57);
        }
        assert!(buckets.len() >= 48, "{} distinct buckets", buckets.len());
        assert!(tops.len() >= 40, "{} distinct top bits", tops.len());
        let mut map = IdMap::default();
        for id in 0..1000u64 {
            map.insert(id, id * 2);
        }
        assert!((0..1000u64).all(|id| map.remove(&id) == Some(id * 2)));
    }
}
