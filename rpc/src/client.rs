//! [`Client`]: calls methods on the server at the other end of a conn.
//!
//! A client is a cheap handle around a driver of two spawned tasks: a writer
//! (see `transport`) and a reader that matches each incoming frame to the
//! call waiting for it, by id, in the shared in-flight map. Every call is
//! answered exactly once: by its response, or by the fatal status that fails
//! every pending call when the conn goes away, or by its own deadline.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    codec,
    error::chain,
    stream::{RequestSink, ResponseStream, StreamEvent},
    transport::{read_preamble, FrameReader, Outbox},
    wire::{timeout_to_wire, Frame, Header},
    Config, Context, Error, Metadata, Status,
};

/// Options for one call: a timeout or deadline, and metadata.
///
/// ```
/// # use std::time::Duration;
/// # use netchan_rpc::CallOptions;
/// let opts = CallOptions::default()
///     .timeout(Duration::from_secs(5))
///     .metadata("token", "s3cret");
/// ```
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    metadata: Metadata,
}

impl CallOptions {
    /// No deadline, no metadata (the default).
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Fail with `DeadlineExceeded` if the call takes longer than `timeout`,
    /// counted from when the call starts. Travels to the server, which drops
    /// the handler when it passes. Default: none.
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Like [`CallOptions::timeout`], as a point in time. With both set, the
    /// earlier wins. Default: none.
    pub fn deadline(mut self, deadline: Instant) -> CallOptions {
        self.deadline = Some(deadline);
        self
    }

    /// Adds a metadata pair.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> CallOptions {
        self.metadata.insert(key, value);
        self
    }

    /// Replaces all metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> CallOptions {
        self.metadata = metadata;
        self
    }

    /// Options carrying `ctx`'s deadline, for a call made while serving
    /// another (the nested call gives up when the outer caller would).
    pub fn propagate(ctx: &Context) -> CallOptions {
        CallOptions {
            deadline: ctx.deadline(),
            ..CallOptions::default()
        }
    }

    /// The call's deadline: the earlier of timeout and deadline, never more
    /// than [`MAX_TIMEOUT`](crate::wire::MAX_TIMEOUT) away (tokio's timer
    /// panics on instants near the end of `Instant`'s range).
    fn resolve_deadline(&self, now: Instant) -> Option<Instant> {
        let latest = now.checked_add(crate::wire::MAX_TIMEOUT).unwrap_or(now);
        let from_timeout = self.timeout.map(|t| {
            now.checked_add(t.min(crate::wire::MAX_TIMEOUT))
                .unwrap_or(latest)
        });
        match (from_timeout, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|d| d.min(latest))
    }
}

/// A cheap, cloneable handle for calling the server on one conn.
///
/// Calls from any number of clones and tasks run concurrently on the conn,
/// matched by id. When the last clone (and every stream it returned) is
/// dropped, queued frames are flushed and the conn's write side is shut
/// down.
///
/// Memory: each pending call holds one entry in the in-flight map, so the
/// map is bounded by the number of call futures the application keeps
/// alive; new requests wait while more than [`Config::write_queue_bytes`]
/// are queued for the writer. The server bounds what it runs with
/// [`Config::max_in_flight`].
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("closed", &self.handle.shared.token.is_cancelled())
            .finish()
    }
}

/// Closes the outbox when the last `Client` clone goes away.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.outbox.close();
    }
}

pub(crate) enum Pending {
    Unary(oneshot::Sender<Result<Bytes, Status>>),
    /// A streaming call: its response items, and for a bidirectional call
    /// the credit the server granted for request items (closed when the
    /// call ends, so a waiting sender learns of it).
    Stream(mpsc::Sender<StreamEvent>, Option<Arc<Semaphore>>),
}

/// Most request credit the server may grant outstanding; more is clamped.
const MAX_SEND_CREDIT: usize = 1 << 20;

struct State {
    pending: HashMap<u64, Pending>,
    /// Set once, when the conn fails: every later call gets it.
    closed: Option<Status>,
}

pub(crate) struct Shared {
    pub(crate) outbox: Outbox,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Cancelled when the conn is gone (reader, writer and `closed()` watch it).
    token: CancellationToken,
    pub(crate) config: Config,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock; tolerate poison anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, id: u64, pending: Pending) -> Result<(), Status> {
        let mut st = self.lock();
        if let Some(status) = &st.closed {
            return Err(status.clone());
        }
        st.pending.insert(id, pending);
        Ok(())
    }

    /// Forgets call `id`; if it was still pending and its request went out,
    /// tells the server to stop working on it.
    pub(crate) fn abandon(&self, id: u64, request_sent: bool) {
        let removed = self.lock().pending.remove(&id);
        if let Some(Pending::Stream(_, Some(credits))) = &removed {
            credits.close();
        }
        if removed.is_some() && request_sent {
            let _ = self
                .outbox
                .push_now(|w| codec::encode(w, &Header::Cancel { id }, "cancel"));
        }
    }

    /// Grants `n` more items to stream `id`.
    pub(crate) fn credit(&self, id: u64, n: u32) {
        let _ = self
            .outbox
            .push_now(|w| codec::encode(w, &Header::Credit { id, n }, "credit"));
    }

    /// Why the conn is gone, if it is.
    pub(crate) fn closed_status(&self) -> Option<Status> {
        self.lock().closed.clone()
    }

    /// Fails every pending call with `status` and ends the conn.
    fn shutdown(&self, status: Status) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(status.clone());
            std::mem::take(&mut st.pending)
        };
        tracing::debug!(%status, calls = pending.len(), "rpc client conn ended");
        for (_, p) in pending {
            match p {
                Pending::Unary(tx) => {
                    let _ = tx.send(Err(status.clone()));
                }
                Pending::Stream(tx, credits) => {
                    let _ = tx.try_send(StreamEvent::End(Some(status.clone())));
                    if let Some(credits) = credits {
                        credits.close();
                    }
                }
            }
        }
        self.outbox.close();
        self.token.cancel();
    }

    /// Routes one frame from the server to its call.
    fn dispatch(&self, frame: Frame) -> Result<(), Error> {
        let Frame { header, payload } = frame;
        let mut st = self.lock();
        match header {
            Header::Response { id, status } => match st.pending.remove(&id) {
                Some(Pending::Unary(tx)) => {
                    let _ = tx.send(match status {
                        None => Ok(payload),
                        Some(s) => Err(s),
                    });
                }
                Some(Pending::Stream(tx, credits)) => {
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
            Header::StreamEnd { id, status } => match st.pending.remove(&id) {
                Some(Pending::Stream(tx, credits)) => {
                    // The channel has one slot beyond the credit window for this.
                    let _ = tx.try_send(StreamEvent::End(status));
                    if let Some(credits) = credits {
                        credits.close();
                    }
                }
                Some(Pending::Unary(tx)) => {
                    let _ = tx.send(Err(status.unwrap_or_else(|| {
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
            Header::Request { .. } | Header::Open { .. } | Header::Cancel { .. } => {
                return Err(Error::Protocol {
                    reason: "client conn received a request-side frame".into(),
                })
            }
        }
        Ok(())
    }
}

impl Client {
    /// Starts a client on `conn` with the default [`Config`]. The driver
    /// tasks are spawned on the current Tokio runtime; calls can be made at
    /// once (they queue behind the preamble exchange).
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub fn new<T>(conn: T) -> Client
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Client::with_config(conn, Config::default())
    }

    /// Starts a client on `conn` with `config`. See [`Client::new`].
    pub fn with_config<T>(conn: T, config: Config) -> Client
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = Arc::new(Shared {
            outbox: Outbox::new(&config),
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
            }),
            next_id: AtomicU64::new(1),
            token: CancellationToken::new(),
            config,
        });
        let (rd, mut wr) = tokio::io::split(conn);
        let span = tracing::debug_span!("rpc_client");

        let s = Arc::clone(&shared);
        tokio::spawn(
            async move {
                let res = tokio::select! {
                    _ = s.token.cancelled() => return,
                    res = s.outbox.run_writer(&mut wr) => res,
                };
                let status = match res {
                    Ok(()) => Status::unavailable("client closed"),
                    Err(e) => Status::unavailable(format!("rpc conn write failed: {}", chain(&e))),
                };
                s.shutdown(status);
            }
            .instrument(span.clone()),
        );

        let s = Arc::clone(&shared);
        tokio::spawn(
            async move {
                let res = tokio::select! {
                    _ = s.token.cancelled() => return,
                    res = read_loop(&s, rd) => res,
                };
                let status = match res {
                    Ok(()) => Status::unavailable("rpc conn closed by the server"),
                    Err(e) => e.to_status(),
                };
                s.shutdown(status);
            }
            .instrument(span),
        );

        Client {
            handle: Arc::new(Handle { shared }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Calls `method` with `req` and waits for the response.
    ///
    /// Cancel-safe in the RPC sense: dropping the future cancels the call on
    /// the server.
    pub async fn call<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, Status>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.call_with(method, req, CallOptions::default()).await
    }

    /// [`Client::call`] with per-call options (deadline, metadata).
    ///
    /// Fails with `DeadlineExceeded` when the deadline passes,
    /// `Unavailable` when the conn is gone, `ResourceExhausted` when the
    /// request exceeds the maximum message size (nothing is sent), or the
    /// server's status. Cancel-safe as [`Client::call`].
    pub async fn call_with<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<Resp, Status>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let deadline = opts.resolve_deadline(Instant::now());
        let call = self.unary(method, req, opts.metadata, deadline);
        let bytes = within_deadline(method, deadline, call).await?;
        codec::decode_payload(&bytes, "response").map_err(|e| {
            Status::internal(format!(
                "could not decode the response of {method}: {}",
                chain(&e)
            ))
        })
    }

    async fn unary<Req>(
        &self,
        method: &str,
        req: &Req,
        metadata: Metadata,
        deadline: Option<Instant>,
    ) -> Result<Bytes, Status>
    where
        Req: Serialize + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        let mut guard = self
            .start(
                method,
                Some(req),
                &metadata,
                deadline,
                None,
                Pending::Unary(tx),
            )
            .await?;
        // The reader removed the entry before answering; a dropped sender
        // (never expected: shutdown answers everyone) counts as conn loss.
        let res = rx
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("rpc conn closed")));
        guard.done = true;
        res
    }

    /// Registers a call and queues its request. The returned guard cancels
    /// the call if dropped before `done` is set.
    async fn start<Req>(
        &self,
        method: &str,
        req: Option<&Req>,
        metadata: &Metadata,
        deadline: Option<Instant>,
        stream_credit: Option<u32>,
        pending: Pending,
    ) -> Result<CallGuard<'_>, Status>
    where
        Req: Serialize + ?Sized,
    {
        let shared = self.shared();
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(deadline_exceeded(method));
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.register(id, pending)?;
        let mut guard = CallGuard {
            shared,
            id,
            sent: false,
            done: false,
        };
        shared
            .outbox
            .push(|w| {
                let timeout_ns =
                    deadline.map(|d| timeout_to_wire(d.saturating_duration_since(Instant::now())));
                match req {
                    Some(req) => {
                        let header = Header::Request {
                            id,
                            method: Cow::Borrowed(method),
                            timeout_ns,
                            stream_credit,
                            metadata: Cow::Borrowed(metadata),
                        };
                        codec::encode(w, &header, "request envelope")?;
                        codec::encode(w, req, "request")
                    }
                    None => {
                        let header = Header::Open {
                            id,
                            method: Cow::Borrowed(method),
                            timeout_ns,
                            credit: stream_credit.unwrap_or(1),
                            metadata: Cow::Borrowed(metadata),
                        };
                        codec::encode(w, &header, "open envelope")
                    }
                }
            })
            .await
            .map_err(|e| match e {
                Error::Closed => shared
                    .closed_status()
                    .unwrap_or_else(|| Status::unavailable("rpc conn closed")),
                Error::MessageTooLarge { max } => Status::resource_exhausted(format!(
                    "request to {method} exceeds the {max}-byte message limit; not sent"
                )),
                e => e.to_status(),
            })?;
        guard.sent = true;
        tracing::trace!(id, method, "rpc call sent");
        Ok(guard)
    }

    /// Calls server-streaming `method`; the returned stream yields the items
    /// as they arrive, then ends (after an `Err` item if the call failed).
    ///
    /// Resolves once the request is queued. Flow control: at most
    /// [`Config::stream_window`] items are in flight; more are granted as
    /// the stream is consumed. Dropping the stream cancels the call; the
    /// deadline in `opts` covers the whole stream. Cancel-safe.
    pub async fn call_stream<Req, Item>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<ResponseStream<Item>, Status>
    where
        Req: Serialize + ?Sized,
        Item: DeserializeOwned,
    {
        let deadline = opts.resolve_deadline(Instant::now());
        let window = self.shared().config.window();
        // One extra slot so the end-of-stream event always fits.
        let (tx, rx) = mpsc::channel(window as usize + 1);
        let start = self.start(
            method,
            Some(req),
            &opts.metadata,
            deadline,
            Some(window),
            Pending::Stream(tx, None),
        );
        let id = within_deadline(method, deadline, start).await?.keep();
        Ok(ResponseStream::new(
            self.clone(),
            id,
            method,
            rx,
            window,
            deadline,
        ))
    }

    /// Starts bidirectional-streaming `method`: send requests with the
    /// returned [`RequestSink`] (flow-controlled by credit from the server;
    /// finish it, or drop it, to end the requests), read responses from the
    /// [`ResponseStream`] as for [`Client::call_stream`]. Client streaming is
    /// the case where the server answers with one item.
    ///
    /// Resolves once the call is queued. Dropping the response stream
    /// cancels the call; the deadline in `opts` covers the whole call.
    /// Cancel-safe.
    pub async fn call_bidi<Req, Item>(
        &self,
        method: &str,
        opts: CallOptions,
    ) -> Result<(RequestSink<Req>, ResponseStream<Item>), Status>
    where
        Req: Serialize,
        Item: DeserializeOwned,
    {
        let deadline = opts.resolve_deadline(Instant::now());
        let window = self.shared().config.window();
        let (tx, rx) = mpsc::channel(window as usize + 1);
        let credits = Arc::new(Semaphore::new(0));
        let start = self.start::<()>(
            method,
            None,
            &opts.metadata,
            deadline,
            Some(window),
            Pending::Stream(tx, Some(Arc::clone(&credits))),
        );
        let id = within_deadline(method, deadline, start).await?.keep();
        Ok((
            RequestSink::new(self.clone(), id, method, credits, deadline),
            ResponseStream::new(self.clone(), id, method, rx, window, deadline),
        ))
    }

    /// Resolves when the conn is gone; every later call fails with
    /// `Unavailable`. Cancel-safe.
    pub async fn closed(&self) {
        self.shared().token.cancelled().await
    }

    /// True once the conn is gone.
    pub fn is_closed(&self) -> bool {
        self.shared().token.is_cancelled()
    }
}

pub(crate) fn deadline_exceeded(method: &str) -> Status {
    Status::deadline_exceeded(format!("deadline passed before {method} completed"))
}

/// Awaits `fut`, a step of a call to `method`, bounded by `deadline` if there is one; once
/// the deadline passes, `fut` is dropped (cancelling what it started) and the call fails
/// with `DeadlineExceeded`.
async fn within_deadline<T>(
    method: &str,
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        None => fut.await,
        Some(d) => match tokio::time::timeout_at(d, fut).await {
            Ok(res) => res,
            Err(_) => Err(deadline_exceeded(method)),
        },
    }
}

/// Cancels a call on drop unless it completed: the `ResponseGuard` idea.
struct CallGuard<'a> {
    shared: &'a Shared,
    id: u64,
    sent: bool,
    done: bool,
}

impl CallGuard<'_> {
    /// Keeps the call running past the guard (a stream now owns it); returns its id.
    fn keep(mut self) -> u64 {
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

async fn read_loop<R>(shared: &Shared, rd: R) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    let mut reader = FrameReader::new(rd, &shared.config);
    let after = shared.config.handshake_timeout;
    tokio::time::timeout(after, read_preamble(reader.io_mut()))
        .await
        .map_err(|_| Error::HandshakeTimeout { after })??;
    while let Some(body) = reader.next_frame().await? {
        let frame = Frame::decode(body).map_err(Error::Malformed)?;
        shared.dispatch(frame)?;
    }
    Ok(())
}
