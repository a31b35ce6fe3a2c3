//! [`Client`]: calls methods on the server at the other end of a conn.
//!
//! A client is a cheap handle around a driver of two spawned tasks: a writer
//! (see `transport`) and a reader that matches each incoming frame to the
//! call waiting for it, by id, in the shared in-flight map. Every call is
//! answered exactly once: by its response, or by the fatal status that fails
//! every pending call when the conn goes away, or by its own deadline.

mod in_flight;
mod streams;

use std::{
    borrow::Cow,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) use in_flight::Shared;
use in_flight::{read_loop, CallGuard, Handle, Pending, Slot, UnaryReply};
pub use streams::{PendingResponse, RequestSink, ResponseStream};

use crate::{
    codec,
    config::Config,
    error::chain,
    error::Error,
    fds::{FdBatch, FdLink},
    metadata::Interceptor,
    metadata::Metadata,
    status::Status,
    transport::WithFds,
    wire::{timeout_to_wire, Header},
};

/// Options for one call: a timeout or deadline, metadata, and file descriptors to send
/// with the request.
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
    fds: Option<FdBatch>,
    stream_window: Option<u32>,
}

impl CallOptions {
    /// No deadline, no metadata (the default).
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Fail with `DeadlineExceeded` if the call takes longer than `timeout`,
    /// counted from when the call starts. Travels to the server, which drops
    /// the handler when it passes. Default: none.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Like [`CallOptions::timeout`], as a point in time. With both set, the
    /// earlier wins. Default: none.
    #[must_use]
    pub fn deadline(mut self, deadline: Instant) -> CallOptions {
        self.deadline = Some(deadline);
        self
    }

    /// Adds a metadata pair.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> CallOptions {
        self.metadata.insert(key, value);
        self
    }

    /// Replaces all metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> CallOptions {
        self.metadata = metadata;
        self
    }

    /// Sends `fds` with the request: the handler takes them with
    /// [`Context::take_fds`](crate::Context::take_fds), each a new descriptor for the same
    /// open file, socket or memfd. The options keep theirs (so they can be reused: every
    /// call sends duplicates); they close when the options are dropped.
    ///
    /// Only a mux channel of a session that passes descriptors carries them
    /// (`netchan_mux::Session::with_fds` over a unix socket, as `netchan::net` sets up for
    /// `unix:` addresses); elsewhere the call fails at once with `FailedPrecondition`, and
    /// with more than [`MAX_FDS_PER_MESSAGE`](crate::MAX_FDS_PER_MESSAGE) with
    /// `InvalidArgument`. Unary calls only (a streaming call with them fails with
    /// `InvalidArgument`).
    #[cfg(unix)]
    #[must_use]
    pub fn fds(mut self, fds: impl IntoIterator<Item = std::os::fd::OwnedFd>) -> CallOptions {
        let fds: Vec<_> = fds.into_iter().collect();
        self.fds = (!fds.is_empty()).then(|| Arc::new(fds));
        self
    }

    /// Sets this call's response stream window: how many items the server may send ahead of
    /// what the stream has consumed (at least 1). Lets one client give a call over a long
    /// link more items in flight than its others. Streaming calls only. Default: the
    /// client's [`Config::stream_window`].
    #[must_use]
    pub fn stream_window(mut self, items: u32) -> CallOptions {
        self.stream_window = Some(items.max(1));
        self
    }

    /// The call's deadline: the earlier of timeout and deadline, never more
    /// than [`MAX_TIMEOUT`](crate::wire::MAX_TIMEOUT) away (tokio's timer
    /// panics on instants near the end of `Instant`'s range). The clock is
    /// read only for a call that has one.
    fn resolve_deadline(&self) -> Option<Instant> {
        if self.timeout.is_none() && self.deadline.is_none() {
            return None;
        }
        let now = Instant::now();
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

/// What goes out with a call's first frame besides the request.
struct Outgoing<'a> {
    metadata: &'a Metadata,
    deadline: Option<Instant>,
    fds: Option<FdBatch>,
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
#[must_use = "dropping the last Client clone closes its conn"]
pub struct Client {
    handle: Arc<Handle>,
    /// Run in order on every call made through this handle (and its
    /// clones) before it is sent.
    interceptors: Arc<[Interceptor]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("closed", &self.handle.shared.token.is_cancelled())
            .finish()
    }
}

/// A client that does not keep its conn open: what a [`Context`](crate::Context) holds so
/// a handler can call its caller back without keeping that peer alive.
#[derive(Clone)]
pub(crate) struct WeakClient(std::sync::Weak<Handle>);

impl WeakClient {
    /// The client, if any handle to it is still alive.
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|handle| Client {
            interceptors: Arc::clone(&handle.no_interceptors),
            handle,
        })
    }
}

impl std::fmt::Debug for WeakClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakClient")
    }
}

impl Client {
    /// A handle on the same conn whose calls first run `interceptor` (after
    /// this handle's own, see [`Interceptor`]): it may read and change the
    /// call's metadata, or refuse the call with a status, in which case
    /// nothing is sent and the call fails with it. Other handles on the
    /// conn are not affected.
    ///
    /// ```
    /// # async fn run(client: netchan_rpc::Client) {
    /// let authed = client.with_interceptor(|_method, md| {
    ///     md.set("token", "s3cret");
    ///     Ok(())
    /// });
    /// # }
    /// ```
    pub fn with_interceptor(
        &self,
        interceptor: impl Fn(&str, &mut Metadata) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Client {
        let mut interceptors = self.interceptors.to_vec();
        interceptors.push(Arc::new(interceptor));
        Client {
            handle: Arc::clone(&self.handle),
            interceptors: Arc::from(interceptors),
        }
    }

    /// A handle that does not keep the conn open.
    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.handle))
    }

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
        let fds = FdLink::of(&conn);
        let shared = Arc::new(Shared::new(config, fds));
        // First after the preamble, ahead of any request.
        shared.outbox.announce_limit();
        let fd_link = FdLink::of(&conn);
        let reader_fds = fd_link.clone();
        let exact = crate::transport::writes_only_what_it_delivers(&conn);
        let (rd, wr) = tokio::io::split(conn);
        let span = tracing::debug_span!("rpc_client");

        let s = Arc::clone(&shared);
        tokio::spawn(
            async move {
                let res = tokio::select! {
                    _ = s.token.cancelled() => return,
                    res = s.outbox.run_writer(wr, &fd_link) => res,
                };
                let status = match res {
                    Ok(()) => Status::conn_lost("client closed"),
                    Err(e) => Status::conn_lost(format!("rpc conn write failed: {}", chain(&e)))
                        .with_source(e),
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
                    res = read_loop(&s, rd, exact, reader_fds) => res,
                };
                let status = match res {
                    Ok(()) => Status::conn_lost("rpc conn closed by the server"),
                    Err(e) => Status::conn_lost(chain(&e)).with_source(e),
                };
                s.shutdown(status);
            }
            .instrument(span),
        );

        let none: Arc<[Interceptor]> = Arc::from([]);
        Client {
            interceptors: Arc::clone(&none),
            handle: Arc::new(Handle {
                shared,
                no_interceptors: none,
            }),
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
        Ok(self.call_with_trailers(method, req, opts).await?.0)
    }

    /// [`Client::call_with`], also returning the file descriptors the handler sent with
    /// its response ([`Context::reply_fds`](crate::Context::reply_fds)); empty if none.
    /// Request descriptors go in `opts` ([`CallOptions::fds`]). Cancel-safe as
    /// [`Client::call`]: descriptors of a response nobody waits for any more are closed.
    #[cfg(unix)]
    pub async fn call_with_fds<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<(Resp, Vec<std::os::fd::OwnedFd>), Status>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let (resp, _, fds) = self.call_full(method, req, opts).await?;
        Ok((resp, fds))
    }

    /// [`Client::call_with`], also returning the response metadata
    /// (trailers) the handler set with
    /// [`Context::set_trailer`](crate::Context::set_trailer) (empty if it
    /// set none). Cancel-safe as [`Client::call`].
    pub async fn call_with_trailers<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<(Resp, Metadata), Status>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let (resp, trailers, _) = self.call_full(method, req, opts).await?;
        Ok((resp, trailers))
    }

    async fn call_full<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOptions,
    ) -> Result<(Resp, Metadata, Vec<crate::fds::Fd>), Status>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let deadline = opts.resolve_deadline();
        let call = self.unary(method, req, opts.metadata, deadline, opts.fds);
        let (bytes, trailers, fds) = within_deadline(method, deadline, call).await?;
        let resp = codec::decode_payload(&bytes, "response").map_err(|e| {
            Status::internal(format!(
                "could not decode the response of {method}: {}",
                chain(&e)
            ))
        })?;
        Ok((resp, trailers, fds))
    }

    async fn unary<Req>(
        &self,
        method: &str,
        req: &Req,
        metadata: Metadata,
        deadline: Option<Instant>,
        fds: Option<FdBatch>,
    ) -> Result<UnaryReply, Status>
    where
        Req: Serialize + ?Sized,
    {
        let mut guard = self
            .start(
                method,
                Some(req),
                Outgoing {
                    metadata: &metadata,
                    deadline,
                    fds,
                },
                None,
                Pending::Unary(Slot::Waiting(None)),
            )
            .await?;
        // The reader (or the conn's end) answers in the call's entry; taking the
        // answer removes it.
        let shared = self.shared();
        let res = std::future::poll_fn(|cx| shared.poll_answer(guard.id, cx)).await;
        guard.done = true;
        res
    }

    /// Registers a call and queues its request. The returned guard cancels
    /// the call if dropped before `done` is set.
    async fn start<Req>(
        &self,
        method: &str,
        req: Option<&Req>,
        out: Outgoing<'_>,
        stream_credit: Option<u32>,
        pending: Pending,
    ) -> Result<CallGuard<'_>, Status>
    where
        Req: Serialize + ?Sized,
    {
        let Outgoing {
            metadata,
            deadline,
            fds,
        } = out;
        let shared = self.shared();
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(deadline_exceeded(method));
        }
        if let Some(fds) = &fds {
            if req.is_none() || stream_credit.is_some() {
                return Err(Status::invalid_argument(format!(
                    "{method}: file descriptors go with unary calls only"
                )));
            }
            shared
                .fds
                .check_send(fds.len(), &format!("the request to {method}"))?;
        }
        let intercepted;
        let metadata = if self.interceptors.is_empty() {
            metadata
        } else {
            let mut md = metadata.clone();
            for interceptor in self.interceptors.iter() {
                interceptor(method, &mut md)?;
            }
            intercepted = md;
            &intercepted
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.register(id, pending)?;
        let mut guard = CallGuard {
            shared,
            id,
            sent: false,
            done: false,
        };
        let fds = fds.map(|fds| WithFds { id, fds });
        shared
            .outbox
            .push_with(fds, |w| {
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
                        codec::encode_header(w, &header, "request envelope")?;
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
                        codec::encode_header(w, &header, "open envelope")
                    }
                }
            })
            .await
            .map_err(|e| match e {
                Error::Closed => shared
                    .closed_status()
                    .unwrap_or_else(|| Status::conn_lost("rpc conn closed")),
                Error::MessageTooLarge { max, by_peer } => Status::resource_exhausted(format!(
                    "request to {method} is over {} max_message_size of {max} bytes; not sent",
                    if by_peer {
                        "the server's"
                    } else {
                        "this client's"
                    }
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
    /// Resolves like tonic's: once the server's handler accepted the call
    /// (returned its stream), or with the handler's early error, so
    /// `client.call_stream(..).await?` means the call was accepted. Flow
    /// control: at most [`Config::stream_window`] items are in flight; more
    /// are granted as the stream is consumed. Dropping the stream (or this
    /// future) cancels the call; the deadline in `opts` covers the whole
    /// stream. Cancel-safe.
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
        let deadline = opts.resolve_deadline();
        let window = opts
            .stream_window
            .unwrap_or_else(|| self.shared().config.window());
        // Three extra slots so the acceptance, the trailers and the end always fit.
        let (tx, rx) = mpsc::channel(window as usize + 3);
        let start = self.start(
            method,
            Some(req),
            Outgoing {
                metadata: &opts.metadata,
                deadline,
                fds: opts.fds.clone(),
            },
            Some(window),
            Pending::Stream(tx, None),
        );
        let id = within_deadline(method, deadline, start).await?.keep();
        // From here the stream owns the call: dropping it cancels the call.
        let stream = ResponseStream::new(self.clone(), id, method, rx, window, deadline);
        PendingResponse::new(stream).await
    }

    /// Calls bidi-streaming `method`, the way tonic does: `requests` is
    /// sent to the server (flow-controlled by its credit) while the call
    /// runs, and the call resolves once the server's handler accepted it
    /// (returned its response stream), or fails with the handler's early
    /// error. Then read the responses from the [`ResponseStream`].
    ///
    /// The requests flow from the start, so a handler may read some before
    /// it accepts. They are sent from a task spawned on the current Tokio
    /// runtime, which stops when `requests` ends (the server then sees the
    /// end of the requests), when the call ends, or when the response stream
    /// is dropped. A request that cannot be sent (it exceeds the message
    /// limit, the deadline passed) fails the call: the response stream
    /// yields that status. For a request sink you drive yourself, see
    /// [`Client::open_bidi`].
    ///
    /// Dropping the response stream (or this future) cancels the call; the
    /// deadline in `opts` covers the whole call. Cancel-safe.
    ///
    /// ```
    /// # async fn run(client: netchan_rpc::Client) -> Result<(), netchan_rpc::Status> {
    /// use futures::{stream, StreamExt};
    /// use netchan_rpc::CallOptions;
    ///
    /// let requests = stream::iter([1u64, 2, 3]);
    /// let mut answers = client
    ///     .call_bidi::<u64, u64, _>("Calc.double", requests, CallOptions::default())
    ///     .await?; // the handler accepted the call
    /// while let Some(answer) = answers.next().await {
    ///     println!("{}", answer?);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub async fn call_bidi<Req, Item, S>(
        &self,
        method: &str,
        requests: S,
        opts: CallOptions,
    ) -> Result<ResponseStream<Item>, Status>
    where
        Req: Serialize + Send + 'static,
        Item: DeserializeOwned,
        S: futures::Stream<Item = Req> + Send + 'static,
    {
        let (sink, response) = self.open_bidi::<Req, Item>(method, opts).await?;
        let stop = CancellationToken::new();
        tokio::spawn(streams::pump(sink, requests, stop.clone()));
        response.stop_on_end(stop).await
    }

    /// Calls client-streaming `method` (a bidi method whose handler answers
    /// once): sends `requests` as [`Client::call_bidi`] does and resolves
    /// with the one response, or the call's error (the handler's early
    /// error included). Cancel-safe: dropping the future cancels the call.
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub async fn call_client_stream<Req, Resp, S>(
        &self,
        method: &str,
        requests: S,
        opts: CallOptions,
    ) -> Result<Resp, Status>
    where
        Req: Serialize + Send + 'static,
        Resp: DeserializeOwned,
        S: futures::Stream<Item = Req> + Send + 'static,
    {
        self.call_bidi(method, requests, opts).await?.single().await
    }

    /// Starts bidi-streaming `method` with a request sink you drive
    /// yourself: resolves once the call is queued, with the
    /// [`RequestSink`] (usable at once: send with credit from the server,
    /// finish or drop it to end the requests) and a [`PendingResponse`],
    /// which resolves to the [`ResponseStream`] once the handler accepted
    /// the call, or to its early error. Send the requests the handler needs
    /// before it accepts, then await the response: awaiting it first waits
    /// for a handler that may be waiting for requests.
    ///
    /// Dropping the response (pending or not) cancels the call; the deadline
    /// in `opts` covers the whole call. Cancel-safe.
    ///
    /// ```
    /// # async fn run(client: netchan_rpc::Client) -> Result<(), netchan_rpc::Status> {
    /// use netchan_rpc::CallOptions;
    ///
    /// let (mut sink, response) = client
    ///     .open_bidi::<u64, u64>("Calc.sum", CallOptions::default())
    ///     .await?;
    /// sink.send(&20).await?;
    /// sink.send(&22).await?;
    /// sink.finish();
    /// let total = response.await?.single().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open_bidi<Req, Item>(
        &self,
        method: &str,
        opts: CallOptions,
    ) -> Result<(RequestSink<Req>, PendingResponse<Item>), Status>
    where
        Req: Serialize,
        Item: DeserializeOwned,
    {
        let deadline = opts.resolve_deadline();
        let window = opts
            .stream_window
            .unwrap_or_else(|| self.shared().config.window());
        // Three extra slots so the acceptance, the trailers and the end always fit.
        let (tx, rx) = mpsc::channel(window as usize + 3);
        let credits = Arc::new(Semaphore::new(0));
        let start = self.start::<()>(
            method,
            None,
            Outgoing {
                metadata: &opts.metadata,
                deadline,
                fds: opts.fds.clone(),
            },
            Some(window),
            Pending::Stream(tx, Some(Arc::clone(&credits))),
        );
        let id = within_deadline(method, deadline, start).await?.keep();
        Ok((
            RequestSink::new(self.clone(), id, method, credits, deadline),
            PendingResponse::new(ResponseStream::new(
                self.clone(),
                id,
                method,
                rx,
                window,
                deadline,
            )),
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
