//! The per-conn loop: the reader runs inline, the writer is spawned, and
//! each frame is dispatched; `Request` and `Open` frames become call tasks.

use std::{
    collections::HashMap,
    future::{poll_fn, Future},
    pin::{pin, Pin},
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    call::Call,
    handler::{Inbound, Input, Kind, Method},
    in_flight::{Admission, CallEntry, ConnState},
    NameHash, Server,
};
use crate::{
    codec,
    context::Context,
    context::EndReason,
    context::Origin,
    error::chain,
    error::Error,
    fds::{Fd, FdInbox, FdLink},
    status::Status,
    stream::{GrantCredit, StreamEvent},
    transport::{read_preamble, Batch, FrameReader},
    wire::{deadline_from_wire, Frame, Header, CONN_ID},
};

/// Most stream credit a caller may have outstanding; larger grants are
/// clamped (so a hostile peer cannot overflow the semaphore).
const MAX_OUTSTANDING_CREDIT: usize = 1 << 20;

impl Server {
    /// Serves `conn` until the peer closes it, it fails, or — once `drain`
    /// is cancelled — its last running call has ended (new calls are
    /// refused meanwhile).
    pub(crate) async fn serve_conn<T>(
        &self,
        conn: T,
        origin: Origin,
        drain: CancellationToken,
    ) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let fd_link = FdLink::of(&conn);
        let origin = Origin {
            fds: fd_link.clone(),
            ..origin
        };
        let peer = &origin;
        let span = tracing::debug_span!("rpc_serve", peer = peer.label.as_deref().unwrap_or(""));
        let config = &self.inner.config;
        let exact = crate::transport::writes_only_what_it_delivers(&conn);
        let (rd, wr) = tokio::io::split(conn);
        let mut inbox = FdInbox::new(fd_link.clone());
        let conn = Arc::new(ConnState::new(config));
        // However serving ends (or if this future is dropped), cancel every
        // call and stop the writer.
        let _end = EndGuard(Arc::clone(&conn));
        let c = Arc::clone(&conn);
        let mut writer = tokio::spawn(
            async move {
                let res = tokio::select! {
                    _ = c.token.cancelled() => Ok(()),
                    res = c.outbox.run_writer(wr, &fd_link) => res,
                };
                // Senders waiting for room must not wait for a dead writer.
                c.outbox.close();
                res
            }
            .instrument(span.clone()),
        );
        let mut reader = FrameReader::new(rd, config).writes_only_delivered(exact);
        let res = async {
            let after = config.handshake_timeout;
            tokio::time::timeout(after, read_preamble(reader.io_mut()))
                .await
                .map_err(|_| Error::HandshakeTimeout { after })??;
            let mut batch = Batch::new(&conn.outbox);
            let mut waits = Waits::default();
            // Made once: a fresh one per frame would register with (and
            // leave) the drain token's waiters on every frame.
            let mut drained = pin!(async {
                drain.cancelled().await;
                conn.until_idle().await
            });
            let mut in_a_row = 0;
            loop {
                // A frame that is there is taken before the writer's end and
                // the drain are looked at (each look takes locks), except
                // every `FAIR_EVERY` frames in a row, so a peer that never
                // pauses cannot hide them.
                let others_first = in_a_row >= FAIR_EVERY;
                let event = {
                    let mut next = pin!(batch.next(reader.next_frame()));
                    poll_fn(|cx| {
                        if others_first {
                            if let Some(event) = poll_others(&mut writer, drained.as_mut(), cx) {
                                return Poll::Ready(event);
                            }
                        }
                        if let Poll::Ready(frame) = next.as_mut().poll(cx) {
                            return Poll::Ready(Event::Frame(frame));
                        }
                        match others_first {
                            true => Poll::Pending,
                            false => poll_others(&mut writer, drained.as_mut(), cx)
                                .map_or(Poll::Pending, Poll::Ready),
                        }
                    })
                    .await
                };
                let body = match event {
                    Event::Frame(frame) => match frame? {
                        Some(body) => body,
                        None => return Ok(()),
                    },
                    Event::Writer(res) => return res,
                    Event::Drained => {
                        // Shutting down and idle: flush what the last calls
                        // queued, then end. (The caller bounds this wait.)
                        tracing::debug!("rpc conn drained for shutdown");
                        conn.outbox.close();
                        return match (&mut writer).await {
                            Ok(res) => res,
                            Err(e) => Err(Error::Io(std::io::Error::other(e))),
                        };
                    }
                };
                in_a_row = if others_first { 0 } else { in_a_row + 1 };
                let (frame, oversize) = body.decode()?;
                if let Header::Credit { id: CONN_ID, n } = frame.header {
                    // The client's limit: answer with ours (once).
                    let (limit, first) = conn.outbox.learn_peer_limit(n);
                    reader.set_peer_limit(limit);
                    if first {
                        conn.outbox.announce_limit();
                    }
                    continue;
                }
                batch.add();
                if let Some((frame, fds)) = inbox.route(frame)? {
                    match oversize {
                        None => {
                            self.dispatch(&conn, frame, peer, &drain, fds, &mut waits)
                                .await?
                        }
                        // Descriptors sent with it are closed with the message.
                        Some(oversize) => conn.refuse(frame.header, oversize).await?,
                    }
                }
            }
        }
        .instrument(span.clone())
        .await;
        match &res {
            Ok(()) => tracing::debug!(parent: &span, "rpc conn closed by the client"),
            Err(e) => tracing::debug!(parent: &span, error = %chain(e), "rpc conn failed"),
        }
        res
    }

    async fn dispatch<'s>(
        &'s self,
        conn: &Arc<ConnState>,
        frame: Frame<'_>,
        peer: &Origin,
        drain: &CancellationToken,
        fds: Vec<Fd>,
        waits: &mut Waits<'s>,
    ) -> Result<(), Error> {
        let Frame { header, payload } = frame;
        match header {
            Header::Request {
                id,
                method,
                timeout_ns,
                stream_credit,
                metadata,
            } => {
                let (want, credit) = match stream_credit {
                    None => (Kind::Unary, 0),
                    Some(n) => (Kind::ServerStreaming, n),
                };
                let open = Open {
                    id,
                    method,
                    timeout_ns,
                    metadata: metadata.into_owned(),
                    credit,
                    want,
                };
                self.start_call(conn, peer, drain, open, Some(payload), fds, waits)
                    .await
            }
            Header::Open {
                id,
                method,
                timeout_ns,
                credit,
                metadata,
            } => {
                let open = Open {
                    id,
                    method,
                    timeout_ns,
                    metadata: metadata.into_owned(),
                    credit,
                    want: Kind::Bidi,
                };
                self.start_call(conn, peer, drain, open, None, Vec::new(), waits)
                    .await
            }
            Header::StreamItem { id } => {
                let limit = self.inner.config.max_in_flight_bytes;
                conn.route_inbound(id, StreamEvent::Item(payload, None), limit)
            }
            Header::StreamEnd { id, status } => {
                conn.route_inbound(id, StreamEvent::End(status), usize::MAX)
            }
            Header::Cancel { id } => {
                conn.with_call(id, |entry| {
                    tracing::trace!(id, "rpc call cancelled by the client");
                    entry.ctx.end_call(EndReason::Cancelled, None);
                });
                Ok(())
            }
            Header::Credit { id, n } => {
                if let Some(sem) = conn.with_call(id, |e| e.credits.clone()).flatten() {
                    let room = MAX_OUTSTANDING_CREDIT.saturating_sub(sem.available_permits());
                    sem.add_permits((n as usize).min(room));
                }
                Ok(())
            }
            Header::Response { .. }
            | Header::Accept { .. }
            | Header::Trailers { .. }
            | Header::Fds { .. } => Err(Error::Protocol {
                reason: "server conn received a response-side frame".into(),
            }),
        }
    }

    /// Admits and spawns one call (`payload` is `None` for a bidirectional
    /// call), or answers it with an error status.
    #[allow(clippy::too_many_arguments)]
    async fn start_call<'s>(
        &'s self,
        conn: &Arc<ConnState>,
        peer: &Origin,
        drain: &CancellationToken,
        open: Open<'_>,
        payload: Option<Bytes>,
        fds: Vec<Fd>,
        waits: &mut Waits<'s>,
    ) -> Result<(), Error> {
        let Open {
            id,
            method,
            timeout_ns,
            mut metadata,
            credit,
            want,
        } = open;
        let streaming = want != Kind::Unary;
        let (name, handler) = match self.inner.methods.get_key_value(&*method) {
            None => {
                let s = Status::unimplemented(format!("unknown method {method:?}"));
                return conn.reply_error(id, streaming, s).await;
            }
            Some((_, m)) if m.kind() != want => {
                let s = Status::unimplemented(format!(
                    "{method} is a {} method, called as {}",
                    m.kind().name(),
                    want.name()
                ));
                return conn.reply_error(id, streaming, s).await;
            }
            Some((name, m)) => (name, m),
        };
        for interceptor in &self.inner.interceptors {
            if let Err(s) = interceptor(&method, &mut metadata) {
                return conn.reply_error(id, streaming, s).await;
            }
        }
        if drain.is_cancelled() {
            let s = Status::unavailable(format!("{method} refused: the server is shutting down"));
            return conn.reply_error(id, streaming, s).await;
        }
        if timeout_ns == Some(0) {
            let s = Status::deadline_exceeded(format!("{method} arrived past its deadline"));
            return conn.reply_error(id, streaming, s).await;
        }
        let deadline = timeout_ns.map(|t| deadline_from_wire(t, Instant::now()));
        // The conn's end ends each call (`ConnState::end_calls`).
        let credits = streaming.then(|| {
            Arc::new(Semaphore::new(
                (credit as usize).min(MAX_OUTSTANDING_CREDIT),
            ))
        });
        let window = self.inner.config.window();
        // Request items: at most `window` granted and unconsumed, plus the end.
        let (inbound_tx, inbound) = match payload {
            Some(_) => (None, None),
            None => {
                let (tx, rx) = mpsc::channel(window as usize + 1);
                (Some(tx), Some(rx))
            }
        };
        let span = tracing::debug_span!("rpc_call", id, method = %method);
        // The registered name, shared: the caller's (in the frame) is not kept.
        let ctx = Context::new(Arc::clone(name), metadata, deadline, peer.clone())
            .with_request_fds(fds)
            .abortable();
        let entry = CallEntry {
            ctx: ctx.clone(),
            credits: credits.clone(),
            inbound: inbound_tx,
            bytes: payload.as_ref().map_or(0, Bytes::len),
        };
        let config = &self.inner.config;
        match conn.admit(id, config, entry)? {
            Admission::Admitted => {}
            Admission::TooManyCalls => {
                let s = Status::resource_exhausted(format!(
                    "{} calls already in flight on this conn",
                    config.max_in_flight
                ));
                return conn.reply_error(id, streaming, s).await;
            }
            Admission::TooManyBytes { held } => {
                let s = Status::resource_exhausted(format!(
                    "calls in flight on this conn already hold {held} request bytes \
                     (limit {})",
                    config.max_in_flight_bytes
                ));
                return conn.reply_error(id, streaming, s).await;
            }
        }
        let input = match (payload, inbound) {
            (Some(payload), _) => Input::Payload(payload),
            (None, rx) => {
                let rx = rx.unwrap_or_else(|| mpsc::channel(1).1);
                let c = Arc::clone(conn);
                let grant: GrantCredit = Arc::new(move |n| {
                    let _ = c
                        .outbox
                        .push_now(|w| codec::encode_header(w, &Header::Credit { id, n }, "credit"));
                });
                // The initial request credit.
                match conn
                    .outbox
                    .push(|w| codec::encode_header(w, &Header::Credit { id, n: window }, "credit"))
                    .await
                {
                    Ok(()) | Err(Error::Closed) => {}
                    Err(e) => return Err(e),
                }
                Input::Stream(Inbound { rx, grant, window })
            }
        };
        let call = Call {
            conn: Arc::clone(conn),
            id,
            ctx: ctx.clone(),
        };
        // Boxed before it is spawned too: the task then holds a pointer, and
        // tokio moves (and, when it completes, overwrites) that instead of
        // the whole call's future. A unary call's future is one allocation
        // with its handler's (see `Method::unary`).
        let run = match (handler, input) {
            (Method::Unary(start), Input::Payload(payload)) => start(call, ctx, payload, span),
            (handler, input) => Box::pin(
                call.run(handler.clone(), ctx, input, credits)
                    .instrument(span),
            ),
        };
        if streaming || waits.spawned(name) {
            tokio::spawn(run);
            return Ok(());
        }
        // A unary handler runs its first poll right here, without a task of
        // its own: one that answers at once (most do) costs no spawn and no
        // wake-up of a worker, and its reply joins the batch this frame
        // arrived in; one that waits has already sent what it sends before
        // its first wait (a call back to the caller, say) before it is moved
        // into its own task (which polls it again; what the first poll
        // registered may wake this reader once, spuriously), so the spawn is
        // not on the way of that message. `INLINE_STRIKES` first polls that
        // kept the reader busy past `INLINE_BUDGET` send the method's later
        // calls on this conn straight to tasks, so a handler that computes at
        // length delays the conn's other calls a few times, and one
        // preemption of the reader (a busy machine) does not take the inline
        // path away for good.
        let mut run = run;
        let started = std::time::Instant::now();
        let pending = futures::poll!(run.as_mut()).is_pending();
        if started.elapsed() > INLINE_BUDGET {
            waits.over_budget(name);
        }
        if pending {
            tokio::spawn(run);
        }
        Ok(())
    }
}

/// The longest a unary handler's first poll may keep the conn's reader busy
/// before its method's calls get tasks of their own (see [`Waits`]).
const INLINE_BUDGET: std::time::Duration = std::time::Duration::from_micros(200);

/// Over-budget first polls after which a unary method's calls on the conn
/// get a task of their own (see [`Waits`]).
const INLINE_STRIKES: u8 = 3;

/// Per unary method, how its handler fared when polled in the reader on
/// this conn: once its first poll computed past [`INLINE_BUDGET`]
/// [`INLINE_STRIKES`] times, its calls get a task at once, so that a long
/// handler does not hold up the calls behind it. At most one entry per
/// registered method; empty while every handler keeps within the budget (the
/// common case costs no lookup).
#[derive(Default)]
struct Waits<'s>(HashMap<&'s str, u8, NameHash>);

impl<'s> Waits<'s> {
    /// Whether `method`'s calls go straight to tasks.
    fn spawned(&self, method: &str) -> bool {
        !self.0.is_empty() && self.0.get(method).is_some_and(|&n| n >= INLINE_STRIKES)
    }

    fn over_budget(&mut self, method: &'s str) {
        let strikes = self.0.entry(method).or_insert(0);
        *strikes = strikes.saturating_add(1);
    }
}

/// Frames the conn's reader takes in a row, when they are there, before it
/// looks at the writer's end and the drain first once.
const FAIR_EVERY: u32 = 32;

/// What woke the conn's reader.
enum Event {
    /// The next frame (or the end of the conn, or a read error).
    Frame(Result<Option<crate::transport::Incoming>, Error>),
    /// The writer ended, with its result.
    Writer(Result<(), Error>),
    /// Shutting down, and no call is in flight.
    Drained,
}

/// Polls the writer's end and the drain (in that order).
fn poll_others(
    writer: &mut tokio::task::JoinHandle<Result<(), Error>>,
    drained: Pin<&mut impl Future<Output = ()>>,
    cx: &mut TaskContext<'_>,
) -> Option<Event> {
    if let Poll::Ready(res) = Pin::new(writer).poll(cx) {
        return Some(Event::Writer(
            res.unwrap_or_else(|e| Err(Error::Io(std::io::Error::other(e)))),
        ));
    }
    drained.poll(cx).is_ready().then_some(Event::Drained)
}

/// A call as requested by the client.
struct Open<'f> {
    id: u64,
    /// Borrowed from the request's frame.
    method: std::borrow::Cow<'f, str>,
    timeout_ns: Option<u64>,
    metadata: crate::metadata::Metadata,
    /// Initial response credit (streaming kinds).
    credit: u32,
    /// The kind of method the caller expects.
    want: Kind,
}

struct EndGuard(Arc<ConnState>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.end_calls();
        self.0.token.cancel();
        self.0.outbox.close();
    }
}
