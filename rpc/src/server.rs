//! [`Server`]: serves registered methods on any number of conns.
//!
//! `serve` runs the conn's reader inline and spawns its writer (see
//! `transport`) and one task per call. Calls are tracked in a per-conn
//! in-flight map (id → cancellation token and stream credit) so a `Cancel`
//! or `Credit` frame finds its call, and its size enforces
//! [`Config::max_in_flight`]. Every call task races its handler against the
//! call's cancellation and deadline and drops the handler when either wins.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream, FutureExt, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    codec::{self, CodecError},
    error::chain,
    transport::{read_preamble, FrameReader, FrameWriter, Outbox},
    wire::{deadline_from_wire, Frame, Header},
    Config, Context, Error, Status,
};

/// Most stream credit a caller may have outstanding; larger grants are
/// clamped (so a hostile peer cannot overflow the semaphore).
const MAX_OUTSTANDING_CREDIT: usize = 1 << 20;

/// An encoded-on-demand payload: the typed value, captured, writing itself.
pub(crate) type Payload = Box<dyn FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError> + Send>;
type UnaryFn = dyn Fn(Context, Bytes) -> BoxFuture<'static, Result<Payload, Status>> + Send + Sync;
type StreamFn = dyn Fn(
        Context,
        Bytes,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Result<Payload, Status>>, Status>>
    + Send
    + Sync;

/// A registered method, type-erased.
#[derive(Clone)]
pub(crate) enum Method {
    Unary(Arc<UnaryFn>),
    Stream(Arc<StreamFn>),
}

fn decode_request<Req: DeserializeOwned>(payload: &Bytes, method: &str) -> Result<Req, Status> {
    codec::decode_payload(payload, "request").map_err(|e| {
        Status::invalid_argument(format!(
            "could not decode the request for {method}: {}",
            chain(&e)
        ))
    })
}

impl Method {
    pub(crate) fn unary<Req, Resp, F, Fut>(handler: F) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        Method::Unary(Arc::new(move |ctx: Context, payload: Bytes| {
            let fut = decode_request::<Req>(&payload, ctx.method()).map(|req| handler(ctx, req));
            async move {
                let resp = fut?.await?;
                Ok(
                    Box::new(move |w: &mut FrameWriter<'_>| codec::encode(w, &resp, "response"))
                        as Payload,
                )
            }
            .boxed()
        }))
    }

    pub(crate) fn stream<Req, Item, F, Fut, S>(handler: F) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        Method::Stream(Arc::new(move |ctx: Context, payload: Bytes| {
            let fut = decode_request::<Req>(&payload, ctx.method()).map(|req| handler(ctx, req));
            async move {
                let items = fut?.await?;
                Ok(items
                    .map(|item| {
                        item.map(|item| {
                            Box::new(move |w: &mut FrameWriter<'_>| {
                                codec::encode(w, &item, "stream item")
                            }) as Payload
                        })
                    })
                    .boxed())
            }
            .boxed()
        }))
    }
}

/// Serves registered methods; cheap to clone, serves many conns at once
/// with shared state (whatever the handlers capture).
///
/// ```
/// # use netchan_rpc::{Server, Status};
/// let mut server = Server::new();
/// server.register("Math.double", |_ctx, n: u64| async move {
///     n.checked_mul(2).ok_or_else(|| Status::out_of_range("too big"))
/// });
/// ```
#[derive(Clone, Default)]
pub struct Server {
    inner: Arc<Registry>,
}

#[derive(Clone, Default)]
struct Registry {
    methods: HashMap<String, Method>,
    config: Config,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<&str> = self.inner.methods.keys().map(String::as_str).collect();
        methods.sort_unstable();
        f.debug_struct("Server")
            .field("methods", &methods)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Server {
    /// A server with no methods and the default [`Config`].
    pub fn new() -> Server {
        Server::default()
    }

    /// A server with no methods and `config`.
    pub fn with_config(config: Config) -> Server {
        Server {
            inner: Arc::new(Registry {
                methods: HashMap::new(),
                config,
            }),
        }
    }

    /// The server's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub(crate) fn insert(&mut self, name: String, method: Method) -> &mut Self {
        // Registering on a clone forks the method table: conns already
        // being served keep the table they started with.
        let reg = Arc::make_mut(&mut self.inner);
        if reg.methods.insert(name.clone(), method).is_some() {
            tracing::debug!(method = %name, "rpc method re-registered; the new handler wins");
        }
        self
    }

    /// Registers a unary handler under `method` (`"Service.Method"`); a
    /// later registration of the same name replaces it.
    ///
    /// The handler gets the call's [`Context`] and the decoded request; a
    /// request that does not decode as `Req` is answered `InvalidArgument`
    /// without calling it.
    pub fn register<Req, Resp, F, Fut>(&mut self, method: &str, handler: F) -> &mut Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        self.insert(method.to_owned(), Method::unary(handler))
    }

    /// Registers a server-streaming handler under `method`: it returns a
    /// stream of items; an `Err` item ends the call with that status.
    /// Items are pulled from the stream only as the caller grants credit.
    pub fn register_stream<Req, Item, F, Fut, S>(&mut self, method: &str, handler: F) -> &mut Self
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        self.insert(method.to_owned(), Method::stream(handler))
    }

    /// Serves one conn until the peer closes it (`Ok`) or it fails (a
    /// transport or protocol [`Error`]; other conns are unaffected).
    ///
    /// Cancel-safe in the sense that dropping the future ends the conn and
    /// drops every in-flight handler.
    pub async fn serve<T>(&self, conn: T) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_conn(conn, None).await
    }

    /// [`Server::serve`], labelling the conn `peer` (handlers see it as
    /// [`Context::peer`]; logs carry it). Cancel-safe as `serve`.
    pub async fn serve_named<T>(&self, conn: T, peer: impl Into<String>) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_conn(conn, Some(Arc::from(peer.into()))).await
    }

    async fn serve_conn<T>(&self, conn: T, peer: Option<Arc<str>>) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let span = tracing::debug_span!("rpc_serve", peer = peer.as_deref().unwrap_or(""));
        let config = &self.inner.config;
        let (rd, mut wr) = tokio::io::split(conn);
        let conn = Arc::new(ConnState {
            outbox: Outbox::new(config),
            calls: Mutex::new(HashMap::new()),
            token: CancellationToken::new(),
        });
        // However serving ends (or if this future is dropped), cancel every
        // call and stop the writer.
        let _end = EndGuard(Arc::clone(&conn));
        let c = Arc::clone(&conn);
        let mut writer = tokio::spawn(
            async move {
                let res = tokio::select! {
                    _ = c.token.cancelled() => Ok(()),
                    res = c.outbox.run_writer(&mut wr) => res,
                };
                // Senders waiting for room must not wait for a dead writer.
                c.outbox.close();
                res
            }
            .instrument(span.clone()),
        );
        let mut reader = FrameReader::new(rd, config.message_limit());
        let res = async {
            let after = config.handshake_timeout;
            tokio::time::timeout(after, read_preamble(reader.io_mut()))
                .await
                .map_err(|_| Error::HandshakeTimeout { after })??;
            loop {
                let body = tokio::select! {
                    frame = reader.next_frame() => match frame? {
                        Some(body) => body,
                        None => return Ok(()),
                    },
                    res = &mut writer => return match res {
                        Ok(res) => res,
                        Err(e) => Err(Error::Io(std::io::Error::other(e))),
                    },
                };
                let frame = Frame::decode(body).map_err(Error::Malformed)?;
                self.dispatch(&conn, frame, &peer).await?;
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

    async fn dispatch(
        &self,
        conn: &Arc<ConnState>,
        frame: Frame,
        peer: &Option<Arc<str>>,
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
                let streaming = stream_credit.is_some();
                let handler = match (self.inner.methods.get(&*method), streaming) {
                    (None, _) => {
                        let s = Status::unimplemented(format!("unknown method {method:?}"));
                        return conn.reply_error(id, streaming, s).await;
                    }
                    (Some(Method::Unary(_)), true) => {
                        let s = Status::unimplemented(format!(
                            "{method} is a unary method, called as server-streaming"
                        ));
                        return conn.reply_error(id, streaming, s).await;
                    }
                    (Some(Method::Stream(_)), false) => {
                        let s = Status::unimplemented(format!(
                            "{method} is a server-streaming method, called as unary"
                        ));
                        return conn.reply_error(id, streaming, s).await;
                    }
                    (Some(m), _) => m.clone(),
                };
                if timeout_ns == Some(0) {
                    let s =
                        Status::deadline_exceeded(format!("{method} arrived past its deadline"));
                    return conn.reply_error(id, streaming, s).await;
                }
                let deadline = timeout_ns.map(|t| deadline_from_wire(t, Instant::now()));
                let token = conn.token.child_token();
                let credits = stream_credit
                    .map(|n| Arc::new(Semaphore::new((n as usize).min(MAX_OUTSTANDING_CREDIT))));
                let admitted = conn.admit(
                    id,
                    self.inner.config.max_in_flight,
                    CallEntry {
                        token: token.clone(),
                        credits: credits.clone(),
                    },
                )?;
                if !admitted {
                    let s = Status::resource_exhausted(format!(
                        "{} calls already in flight on this conn",
                        self.inner.config.max_in_flight
                    ));
                    return conn.reply_error(id, streaming, s).await;
                }
                let span = tracing::debug_span!("rpc_call", id, method = %method);
                let ctx = Context::new(
                    method.into_owned(),
                    metadata.into_owned(),
                    deadline,
                    peer.clone(),
                    token.clone(),
                );
                let call = Call {
                    conn: Arc::clone(conn),
                    id,
                    deadline,
                    token,
                };
                tokio::spawn(call.run(handler, ctx, payload, credits).instrument(span));
                Ok(())
            }
            Header::Cancel { id } => {
                if let Some(entry) = conn.lock_calls().get(&id) {
                    tracing::trace!(id, "rpc call cancelled by the client");
                    entry.token.cancel();
                }
                Ok(())
            }
            Header::Credit { id, n } => {
                if let Some(sem) = conn.lock_calls().get(&id).and_then(|e| e.credits.as_ref()) {
                    let room = MAX_OUTSTANDING_CREDIT.saturating_sub(sem.available_permits());
                    sem.add_permits((n as usize).min(room));
                }
                Ok(())
            }
            Header::Response { .. } | Header::StreamItem { .. } | Header::StreamEnd { .. } => {
                Err(Error::Protocol {
                    reason: "server conn received a response-side frame".into(),
                })
            }
        }
    }
}

struct CallEntry {
    token: CancellationToken,
    credits: Option<Arc<Semaphore>>,
}

/// Per-conn state shared by the reader and the call tasks.
struct ConnState {
    outbox: Outbox,
    /// In-flight calls; bounded by `max_in_flight`.
    calls: Mutex<HashMap<u64, CallEntry>>,
    /// Parent of every call's token; cancelled when serving ends.
    token: CancellationToken,
}

impl ConnState {
    fn lock_calls(&self) -> MutexGuard<'_, HashMap<u64, CallEntry>> {
        // Nothing panics while holding this lock; tolerate poison anyway.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records call `id` as in flight; `false` when the conn is at `limit`.
    fn admit(&self, id: u64, limit: usize, entry: CallEntry) -> Result<bool, Error> {
        let mut calls = self.lock_calls();
        if calls.len() >= limit {
            return Ok(false);
        }
        if calls.contains_key(&id) {
            return Err(Error::Protocol {
                reason: format!("call id {id} reused while in flight"),
            });
        }
        calls.insert(id, entry);
        Ok(true)
    }

    /// Answers call `id` with `status` in the form its caller expects.
    async fn reply_error(&self, id: u64, streaming: bool, status: Status) -> Result<(), Error> {
        tracing::debug!(id, %status, "rpc call refused");
        self.send_status(id, streaming, Some(status)).await
    }

    /// Ends call `id` with `status` (`None` = a successful stream end). A
    /// status too large for the message limit is replaced by a short one,
    /// so every call gets its answer.
    async fn send_status(
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
            move |w: &mut FrameWriter<'_>| codec::encode(w, &header, "envelope")
        };
        let res = match self.outbox.push(encode(status)).await {
            Err(Error::MessageTooLarge { max }) => {
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

struct EndGuard(Arc<ConnState>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.token.cancel();
        self.0.outbox.close();
    }
}

/// One running call.
struct Call {
    conn: Arc<ConnState>,
    id: u64,
    deadline: Option<Instant>,
    token: CancellationToken,
}

impl Drop for Call {
    fn drop(&mut self) {
        // The call is over: work spawned with its context stops too.
        self.token.cancel();
        self.conn.lock_calls().remove(&self.id);
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

impl Call {
    async fn run(
        self,
        handler: Method,
        ctx: Context,
        payload: Bytes,
        credits: Option<Arc<Semaphore>>,
    ) {
        let method = ctx.method().to_owned();
        match handler {
            Method::Unary(h) => {
                let work = AssertUnwindSafe(async move { h(ctx, payload).await }).catch_unwind();
                let Some(outcome) = self.race(work).await else {
                    return;
                };
                self.respond(&method, outcome).await;
            }
            Method::Stream(h) => {
                let credits = credits.unwrap_or_else(|| Arc::new(Semaphore::new(0)));
                let id = self.id;
                let conn = Arc::clone(&self.conn);
                let work = AssertUnwindSafe(async move {
                    let mut items = h(ctx, payload).await?;
                    loop {
                        // Credit first: an item is produced only when it
                        // may be sent, so nothing queues beyond the window.
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
                            .push(|w| {
                                codec::encode(w, &Header::StreamItem { id }, "envelope")?;
                                payload(w)
                            })
                            .await;
                        match pushed {
                            Ok(()) => {}
                            Err(Error::MessageTooLarge { max }) => {
                                return Err(Status::resource_exhausted(format!(
                                    "a stream item exceeds the {max}-byte message limit"
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
                let _ = self.conn.send_status(id, true, outcome.err()).await;
            }
        }
    }

    /// Runs `work` until it finishes, the deadline passes (an error
    /// outcome) or the call is cancelled (`None`: nobody wants an answer).
    /// Either way `work`, and with it the handler, is dropped on return.
    async fn race<T>(
        &self,
        work: impl Future<Output = Result<Result<T, Status>, Box<dyn Any + Send>>>,
    ) -> Option<Result<T, Status>> {
        let expired = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.token.cancelled() => {
                tracing::trace!("rpc handler dropped: call cancelled");
                None
            }
            _ = expired => {
                tracing::trace!("rpc handler dropped: deadline passed");
                self.token.cancel();
                Some(Err(Status::deadline_exceeded("deadline passed while the handler ran")))
            }
            res = work => Some(res.unwrap_or_else(|p| {
                let status = panic_status(p);
                tracing::warn!(%status, "rpc handler panicked");
                Err(status)
            })),
        }
    }

    async fn respond(&self, method: &str, outcome: Result<Payload, Status>) {
        let id = self.id;
        let status = match outcome {
            Ok(payload) => {
                let pushed = self
                    .conn
                    .outbox
                    .push(|w| {
                        codec::encode(w, &Header::Response { id, status: None }, "envelope")?;
                        payload(w)
                    })
                    .await;
                match pushed {
                    Ok(()) | Err(Error::Closed) => return,
                    Err(Error::MessageTooLarge { max }) => Status::resource_exhausted(format!(
                        "the response of {method} exceeds the {max}-byte message limit"
                    )),
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
