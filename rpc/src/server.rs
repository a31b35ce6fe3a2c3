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
    sync::{atomic::AtomicUsize, atomic::Ordering, Arc, Mutex, MutexGuard, OnceLock},
};

use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream, FutureExt, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    codec::{self, CodecError},
    error::chain,
    stream::{GrantCredit, Held, RequestStream, StreamEvent},
    transport::{read_preamble, FrameReader, FrameWriter, Outbox, WhenFull, BIG_FRAME},
    wire::{deadline_from_wire, Frame, Header},
    Config, Context, Error, Status,
};

/// Most stream credit a caller may have outstanding; larger grants are
/// clamped (so a hostile peer cannot overflow the semaphore).
const MAX_OUTSTANDING_CREDIT: usize = 1 << 20;

/// An encoded-on-demand payload: the typed value, captured, writing itself.
pub(crate) type Payload = Box<dyn FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError> + Send>;
type UnaryFn = dyn Fn(Context, Bytes) -> BoxFuture<'static, Result<Payload, Status>> + Send + Sync;
/// What a streaming handler resolves to: its encoded-on-demand items.
type ItemsFuture = BoxFuture<'static, Result<BoxStream<'static, Result<Payload, Status>>, Status>>;
type StreamFn = dyn Fn(Context, Bytes) -> ItemsFuture + Send + Sync;
type BidiFn = dyn Fn(Context, Inbound) -> ItemsFuture + Send + Sync;

/// A registered method, type-erased.
#[derive(Clone)]
pub(crate) enum Method {
    Unary(Arc<UnaryFn>),
    Stream(Arc<StreamFn>),
    Bidi(Arc<BidiFn>),
}

/// The shape of a call: what the caller sends and expects back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStreaming,
    Bidi,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStreaming => "server-streaming",
            Kind::Bidi => "bidirectional-streaming",
        }
    }
}

impl Method {
    fn kind(&self) -> Kind {
        match self {
            Method::Unary(_) => Kind::Unary,
            Method::Stream(_) => Kind::ServerStreaming,
            Method::Bidi(_) => Kind::Bidi,
        }
    }
}

/// The request side of a bidirectional call, untyped.
pub(crate) struct Inbound {
    rx: mpsc::Receiver<StreamEvent>,
    grant: GrantCredit,
    window: u32,
}

/// What a call starts from.
enum Input {
    Payload(Bytes),
    Stream(Inbound),
}

fn encode_items<Item, S>(items: S) -> BoxStream<'static, Result<Payload, Status>>
where
    Item: Serialize + Send + 'static,
    S: Stream<Item = Result<Item, Status>> + Send + 'static,
{
    items
        .map(|item| {
            item.map(|item| {
                Box::new(move |w: &mut FrameWriter<'_>| codec::encode(w, &item, "stream item"))
                    as Payload
            })
        })
        .boxed()
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
            async move { Ok(encode_items(fut?.await?)) }.boxed()
        }))
    }

    pub(crate) fn bidi<Req, Item, F, Fut, S>(handler: F) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        F: Fn(Context, RequestStream<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        Method::Bidi(Arc::new(move |ctx: Context, inbound: Inbound| {
            let requests = RequestStream::new(inbound.rx, inbound.grant, inbound.window);
            let fut = handler(ctx, requests);
            async move { Ok(encode_items(fut.await?)) }.boxed()
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

    /// Registers a bidirectional-streaming handler under `method`: it gets
    /// the caller's requests as a [`RequestStream`] and returns a stream of
    /// responses (client streaming: a stream of one). Requests flow only as
    /// the handler consumes them (credit-based, like responses).
    pub fn register_bidi<Req, Item, F, Fut, S>(&mut self, method: &str, handler: F) -> &mut Self
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        F: Fn(Context, RequestStream<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, Status>> + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        self.insert(method.to_owned(), Method::bidi(handler))
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
            calls: Mutex::new(Calls::default()),
            inbound_bytes: Arc::new(AtomicUsize::new(0)),
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
        let mut reader = FrameReader::new(rd, config);
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
                let (want, credit) = match stream_credit {
                    None => (Kind::Unary, 0),
                    Some(n) => (Kind::ServerStreaming, n),
                };
                let open = Open {
                    id,
                    method: method.into_owned(),
                    timeout_ns,
                    metadata: metadata.into_owned(),
                    credit,
                    want,
                };
                self.start_call(conn, peer, open, Some(payload)).await
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
                    method: method.into_owned(),
                    timeout_ns,
                    metadata: metadata.into_owned(),
                    credit,
                    want: Kind::Bidi,
                };
                self.start_call(conn, peer, open, None).await
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
                    entry.token.cancel();
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
            Header::Response { .. } => Err(Error::Protocol {
                reason: "server conn received a response frame".into(),
            }),
        }
    }

    /// Admits and spawns one call (`payload` is `None` for a bidirectional
    /// call), or answers it with an error status.
    async fn start_call(
        &self,
        conn: &Arc<ConnState>,
        peer: &Option<Arc<str>>,
        open: Open,
        payload: Option<Bytes>,
    ) -> Result<(), Error> {
        let Open {
            id,
            method,
            timeout_ns,
            metadata,
            credit,
            want,
        } = open;
        let streaming = want != Kind::Unary;
        let handler = match self.inner.methods.get(&method) {
            None => {
                let s = Status::unimplemented(format!("unknown method {method:?}"));
                return conn.reply_error(id, streaming, s).await;
            }
            Some(m) if m.kind() != want => {
                let s = Status::unimplemented(format!(
                    "{method} is a {} method, called as {}",
                    m.kind().name(),
                    want.name()
                ));
                return conn.reply_error(id, streaming, s).await;
            }
            Some(m) => m.clone(),
        };
        if timeout_ns == Some(0) {
            let s = Status::deadline_exceeded(format!("{method} arrived past its deadline"));
            return conn.reply_error(id, streaming, s).await;
        }
        let deadline = timeout_ns.map(|t| deadline_from_wire(t, Instant::now()));
        let token = conn.token.child_token();
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
        let abort = Arc::new(OnceLock::new());
        let entry = CallEntry {
            token: token.clone(),
            abort: Arc::clone(&abort),
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
                        .push_now(|w| codec::encode(w, &Header::Credit { id, n }, "credit"));
                });
                // The initial request credit.
                match conn
                    .outbox
                    .push(|w| codec::encode(w, &Header::Credit { id, n: window }, "credit"))
                    .await
                {
                    Ok(()) | Err(Error::Closed) => {}
                    Err(e) => return Err(e),
                }
                Input::Stream(Inbound { rx, grant, window })
            }
        };
        let span = tracing::debug_span!("rpc_call", id, method = %method);
        let ctx = Context::new(method, metadata, deadline, peer.clone(), token.clone());
        let call = Call {
            conn: Arc::clone(conn),
            id,
            deadline,
            token,
            abort,
        };
        tokio::spawn(call.run(handler, ctx, input, credits).instrument(span));
        Ok(())
    }
}

/// A call as requested by the client.
struct Open {
    id: u64,
    method: String,
    timeout_ns: Option<u64>,
    metadata: crate::Metadata,
    /// Initial response credit (streaming kinds).
    credit: u32,
    /// The kind of method the caller expects.
    want: Kind,
}

struct CallEntry {
    token: CancellationToken,
    /// Set, before `token` is cancelled, when the conn ends the call itself
    /// (request bytes over budget): the status the call task answers with.
    abort: Arc<OnceLock<Status>>,
    /// Response credit of a streaming call.
    credits: Option<Arc<Semaphore>>,
    /// Request items of a bidirectional call (bounded by the credit we
    /// grant: `stream_window` + 1 slots).
    inbound: Option<mpsc::Sender<StreamEvent>>,
    /// Request payload bytes this call holds (counted against
    /// `max_in_flight_bytes`).
    bytes: usize,
}

/// Whether a call may start.
enum Admission {
    Admitted,
    TooManyCalls,
    TooManyBytes { held: usize },
}

/// The calls in flight on one conn and the request bytes they hold.
#[derive(Default)]
struct Calls {
    map: HashMap<u64, CallEntry>,
    bytes: usize,
}

/// Per-conn state shared by the reader and the call tasks.
struct ConnState {
    outbox: Outbox,
    /// In-flight calls; bounded by `max_in_flight` and `max_in_flight_bytes`.
    calls: Mutex<Calls>,
    /// Bytes of request items queued for bidirectional handlers and not yet
    /// consumed (see [`Held`]); part of the `max_in_flight_bytes` budget.
    inbound_bytes: Arc<AtomicUsize>,
    /// Parent of every call's token; cancelled when serving ends.
    token: CancellationToken,
}

impl ConnState {
    fn lock_calls(&self) -> MutexGuard<'_, Calls> {
        // Nothing panics while holding this lock; tolerate poison anyway.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The in-flight entry of call `id`, if it is still running.
    fn with_call<R>(&self, id: u64, f: impl FnOnce(&CallEntry) -> R) -> Option<R> {
        self.lock_calls().map.get(&id).map(f)
    }

    /// Request payload bytes held on this conn: requests of running calls
    /// and unconsumed request items.
    fn held_bytes(&self, calls: &Calls) -> usize {
        calls
            .bytes
            .saturating_add(self.inbound_bytes.load(Ordering::SeqCst))
    }

    /// Hands a request item or end from the client to its call. An item
    /// that would take the conn's held request bytes past `limit` ends its
    /// call with `ResourceExhausted` instead of being queued.
    fn route_inbound(&self, id: u64, mut event: StreamEvent, limit: usize) -> Result<(), Error> {
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
        if entry.abort.get().is_some() {
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
                let _ = entry.abort.set(status);
                entry.token.cancel();
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
    fn admit(&self, id: u64, config: &Config, entry: CallEntry) -> Result<Admission, Error> {
        let mut calls = self.lock_calls();
        if calls.map.len() >= config.max_in_flight {
            return Ok(Admission::TooManyCalls);
        }
        let held = self.held_bytes(&calls);
        if !calls.map.is_empty() && held.saturating_add(entry.bytes) > config.max_in_flight_bytes {
            return Ok(Admission::TooManyBytes { held });
        }
        if calls.map.contains_key(&id) {
            return Err(Error::Protocol {
                reason: format!("call id {id} reused while in flight"),
            });
        }
        calls.bytes += entry.bytes;
        calls.map.insert(id, entry);
        Ok(Admission::Admitted)
    }

    /// Forgets call `id` (it is over), releasing its request bytes.
    fn remove(&self, id: u64) {
        let mut calls = self.lock_calls();
        if let Some(entry) = calls.map.remove(&id) {
            calls.bytes -= entry.bytes;
        }
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
    /// Why the conn ended this call, if it did (see [`CallEntry::abort`]).
    abort: Arc<OnceLock<Status>>,
}

impl Drop for Call {
    fn drop(&mut self) {
        // The call is over: work spawned with its context stops too.
        self.token.cancel();
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

impl Call {
    async fn run(
        self,
        handler: Method,
        ctx: Context,
        input: Input,
        credits: Option<Arc<Semaphore>>,
    ) {
        let method = ctx.method().to_owned();
        // The request payload moves into the handler, which drops it once
        // decoded: a long call does not keep the received frame (often a
        // slice of the conn's shared read buffer) alive.
        let (handler, input) = match (handler, input) {
            (Method::Unary(h), Input::Payload(payload)) => {
                let work = AssertUnwindSafe(async move { h(ctx, payload).await }).catch_unwind();
                let Some(outcome) = self.race(work).await else {
                    return;
                };
                self.respond(&method, outcome).await;
                return;
            }
            other => other,
        };
        let credits = credits.unwrap_or_else(|| Arc::new(Semaphore::new(0)));
        let id = self.id;
        let conn = Arc::clone(&self.conn);
        let work = AssertUnwindSafe(async move {
            let mut items = match (handler, input) {
                (Method::Stream(h), Input::Payload(payload)) => h(ctx, payload).await?,
                (Method::Bidi(h), Input::Stream(inbound)) => h(ctx, inbound).await?,
                _ => return Err(Status::internal("call kind and handler kind disagree")),
            };
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

    /// Runs `work` until it finishes, the deadline passes (an error
    /// outcome) or the call is cancelled (`None`: nobody wants an answer,
    /// unless the conn ended the call itself: then its status). Either way
    /// `work`, and with it the handler, is dropped on return.
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
                // Set before the token is cancelled, so it is seen here.
                self.abort.get().cloned().map(Err)
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
                    .push_reply(WhenFull::Refuse, |w| {
                        codec::encode(w, &Header::Response { id, status: None }, "envelope")?;
                        payload(w)
                    })
                    .await;
                match pushed {
                    Ok(()) | Err(Error::Closed) => return,
                    Err(Error::MessageTooLarge { max }) => Status::resource_exhausted(format!(
                        "the response of {method} exceeds the {max}-byte message limit"
                    )),
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

#[cfg(test)]
mod tests {
    use super::*;

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

        let conn = Arc::new(ConnState {
            outbox: Outbox::new(&Config::default()),
            calls: Mutex::new(Calls::default()),
            inbound_bytes: Arc::new(AtomicUsize::new(0)),
            token: CancellationToken::new(),
        });
        let (decoded_tx, decoded) = tokio::sync::oneshot::channel();
        let decoded_tx = Mutex::new(Some(decoded_tx));
        let handler = Method::unary(move |_ctx, n: u32| {
            if let Some(tx) = decoded_tx.lock().unwrap().take() {
                let _ = tx.send(n);
            }
            std::future::pending::<Result<(), Status>>()
        });
        let token = CancellationToken::new();
        let call = Call {
            conn,
            id: 1,
            deadline: None,
            token: token.clone(),
            abort: Arc::new(OnceLock::new()),
        };
        let ctx = Context::new("T.park".into(), Default::default(), None, None, token);
        let running = tokio::spawn(call.run(handler, ctx, Input::Payload(payload), None));

        let bound = std::time::Duration::from_secs(5);
        assert_eq!(tokio::time::timeout(bound, decoded).await.unwrap(), Ok(5));
        tokio::time::timeout(bound, freed)
            .await
            .expect("the request frame is released once the handler has decoded it")
            .unwrap();
        assert!(!running.is_finished(), "the handler is still parked");
        running.abort();
    }

    /// Regression: a small request item queued for a bidirectional handler
    /// was a slice of the conn's 64 KiB read buffer, so unread 1-byte items
    /// (counted as 1 byte each against `max_in_flight_bytes`) could each
    /// keep a whole read buffer alive.
    #[test]
    fn a_queued_request_item_does_not_pin_the_shared_read_buffer() {
        let conn = ConnState {
            outbox: Outbox::new(&Config::default()),
            calls: Mutex::new(Calls::default()),
            inbound_bytes: Arc::new(AtomicUsize::new(0)),
            token: CancellationToken::new(),
        };
        let (tx, mut rx) = mpsc::channel(4);
        let entry = CallEntry {
            token: CancellationToken::new(),
            abort: Arc::new(OnceLock::new()),
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
