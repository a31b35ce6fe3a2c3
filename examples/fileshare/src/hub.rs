//! The hub: accepts one connection per client, serves [`Hub`], forwards calls to exporters.
//!
//! Per connection (one task, in a `conn` span): optional TLS handshake, a server-side mux
//! session, the hello exchange (the only channel listened on before it succeeds), then the
//! [`Hub`] service on every channel the client dials to [`HUB_CHANNEL`]. The service instance
//! is per connection and holds that connection's session and publish state, so the hub knows
//! who calls by the connection a call arrives on. `Hub.publish` dials the client's
//! [`EXPORT_CHANNEL`] back over the same session; the hub never connects to a client.
//!
//! Only a published connection may use `list`/`ls`/`stat`/`read`, and one that has not
//! published within [`HubOptions::publish_timeout`] is closed. Publishing a name another
//! connection holds first probes the holder (see [`HubOptions::probe_timeout`]): a silent
//! holder is evicted, a live one keeps the name.
//!
//! When a session ends (quit, crash, keepalive timeout) its task removes the peer, and calls
//! in flight to it fail with "peer gone". [`HubState::shutdown`] stops the accept loop and
//! closes every session gracefully (a yamux GoAway, so clients see "closed by the peer", not an
//! i/o error), each within the session's `close_grace`. Reads forwarded to one exporter are
//! limited by a semaphore: a read waits up to [`HubOptions::busy_wait`] for a slot, then fails
//! "busy"; each holds at most [`HubOptions::forward_window`] chunks at the hub.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, CallOptions, Code, Context, ItemStream, Status};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{self, Token};
use crate::export::{Entry, Listing};
use crate::proto::{
    Chunk, ExportClient, Hub, ListReq, PeerPath, PeerRead, PublishReq, PublishResp, ReadReq,
    EXPORT_CHANNEL, HUB_CHANNEL, READER_KEY,
};
use crate::registry::{validate_name, ConnId, NameError, Registry};

/// How long the hub waits to open the channel to a publishing client's export service.
const EXPORT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The hub's settings.
#[derive(Clone)]
pub(crate) struct HubOptions {
    /// Secret clients must present in the hello exchange. Default: none.
    pub(crate) token: Option<Token>,
    /// TLS acceptor. Default: none (plaintext).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Reads forwarded to one peer at a time. Default: 8.
    pub(crate) max_reads_per_peer: usize,
    /// How long a read waits for one of those slots before failing "busy". Default: 2 s.
    pub(crate) busy_wait: Duration,
    /// Deadline of a forwarded `ls`/`stat`, and the longest a forwarded read waits for the
    /// exporter's next chunk (a whole read may take as long as it needs). Default: 30 s.
    pub(crate) peer_timeout: Duration,
    /// Most client connections at once; more are closed right after accept. Default: 1024.
    pub(crate) max_connections: usize,
    /// How long a connection may stay unpublished after its hello before it is closed, so
    /// that it cannot hold one of the `max_connections` slots. Default: 10 s.
    pub(crate) publish_timeout: Duration,
    /// How long the current holder of a name has to answer a probe (`Export.stat(".")`) when
    /// another connection publishes the same name; a holder that does not answer is evicted
    /// and the name goes to the newcomer. Default: 2 s.
    pub(crate) probe_timeout: Duration,
    /// Stream window (chunks the exporter may send ahead) of each read the hub forwards. The
    /// hub holds up to this many chunks per forwarded read when the reader is slower than the
    /// exporter, so it bounds the hub's memory: window × 256 KiB per read, times
    /// `max_reads_per_peer` per exporter. Default: 4 (1 MiB per read; the rpc default of 16
    /// made it 4 MiB, see the README's memory numbers).
    pub(crate) forward_window: u32,
    /// Session settings (keepalive bounds how fast a silent peer is dropped).
    /// Default: `mux::Config::default()`.
    pub(crate) mux: mux::Config,
}

impl Default for HubOptions {
    fn default() -> HubOptions {
        HubOptions {
            token: None,
            tls: None,
            max_reads_per_peer: 8,
            busy_wait: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(30),
            max_connections: 1024,
            publish_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            forward_window: 4,
            mux: mux::Config::default(),
        }
    }
}

/// What the hub keeps per published peer.
#[derive(Clone)]
struct PeerHandle {
    /// The connection that published it.
    conn: ConnId,
    /// That connection's session (closed when the peer is evicted).
    session: Session,
    export: ExportClient,
    /// Chunks received from this peer so far (across its forwarded reads): a holder busy
    /// streaming, whose answer to a probe may queue behind its chunks on a slow link, counts
    /// as alive.
    chunks: Arc<AtomicU64>,
    /// Slots for forwarded reads (and ls/stat) to this peer.
    calls: Arc<Semaphore>,
}

/// The hub. Cheap to share (`Arc`); [`HubState::serve`] runs the accept loop.
pub(crate) struct HubState {
    opts: HubOptions,
    peers: Registry<PeerHandle>,
    next_conn: AtomicU64,
    connections: Arc<Semaphore>,
    /// Bumped whenever the set of peers changes (lets tests await a departure).
    changes: tokio::sync::watch::Sender<u64>,
    /// Cancelled by [`HubState::shutdown`]: every connection task closes its session.
    stop: CancellationToken,
}

impl HubState {
    /// A hub with no peers.
    pub(crate) fn new(opts: HubOptions) -> Arc<HubState> {
        let connections = Arc::new(Semaphore::new(opts.max_connections.max(1)));
        Arc::new(HubState {
            opts,
            peers: Registry::new(),
            next_conn: AtomicU64::new(1),
            connections,
            changes: tokio::sync::watch::Sender::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// Asks the hub to shut down: [`HubState::serve`] stops accepting, every connection task
    /// closes its session gracefully (bounded by the session's `close_grace`), and `serve`
    /// returns once they have all ended.
    pub(crate) fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Accepts connections until [`HubState::shutdown`], then closes every session gracefully
    /// and returns once all connection tasks have ended. Dropping the future instead ends every
    /// connection task abruptly. Not meant to be cancelled and restarted.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut conns = JoinSet::new();
        // Bounded: one iteration per accepted connection; connection tasks are reaped as they
        // finish so the set holds at most `max_connections` (+ the ones being refused).
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                            warn!(%addr, limit = self.opts.max_connections, "refusing connection: too many clients");
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let hub = self.clone();
                        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::info_span!("conn", id, %addr);
                        conns.spawn(async move {
                            hub.accept_tcp(tcp, id, addr).await;
                            drop(permit);
                        }.instrument(span));
                    }
                    Err(e) => {
                        // Typically EMFILE: back off briefly instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                () = self.stop.cancelled() => break,
            }
        }
        drop(listener);
        info!(
            connections = conns.len(),
            peers = self.peers.len(),
            "shutting down: closing every session"
        );
        // Bounded: no new tasks are added, and each one closes its session within its grace.
        while conns.join_next().await.is_some() {}
        info!("every session closed");
    }

    async fn accept_tcp(self: Arc<Self>, tcp: tokio::net::TcpStream, id: ConnId, addr: SocketAddr) {
        match &self.opts.tls {
            None => self.serve_io(tcp, id, addr.to_string()).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                // No session exists yet, so a shutdown simply drops the half-made link.
                let done = tokio::select! {
                    done = handshake => done,
                    () = self.stop.cancelled() => return,
                };
                match done {
                    Ok(Ok(tls)) => self.serve_io(tls, id, addr.to_string()).await,
                    Ok(Err(e)) => warn!("tls handshake failed: {e}"),
                    Err(_) => warn!("tls handshake timed out"),
                }
            }
        }
    }

    /// Serves one client connection over `io` (any byte stream) until it ends.
    pub(crate) async fn serve_io<T>(self: Arc<Self>, io: T, id: ConnId, label: String)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let session = Session::server(io, self.opts.mux.clone());
        let hello = tokio::select! {
            hello = self.hello(&session) => hello,
            () = self.stop.cancelled() => Err(anyhow::anyhow!("the hub is shutting down")),
        };
        let hub_listener = match hello {
            Ok(l) => l,
            Err(e) => {
                warn!("refused before publishing: {e:#}");
                // Let the refusal reach the client before the link goes.
                session.close().await;
                return;
            }
        };
        debug!("hello ok");
        let conn = Arc::new(ConnState {
            id,
            label: label.clone(),
            session: session.clone(),
            hub: self.clone(),
            published: tokio::sync::Mutex::new(Published::No),
        });
        // A client gets at most this many calls running at once per channel (and a session has
        // at most max_channels channels): plenty for a REPL, a bound against floods.
        let mut server = rpc::Server::with_config(rpc::Config::default().max_in_flight(64));
        server.add(HubService(conn.clone()).into_service());
        let reason = serve_channels(hub_listener, &conn, &server).await;
        let mut published = conn.published.lock().await;
        if let Published::As(name) = &*published {
            if self.peers.remove(name, id) {
                self.changed();
                if reason.is_error() {
                    info!(peer = %name, "left: {reason}");
                } else {
                    info!(peer = %name, "left");
                }
            }
        } else {
            debug!("connection ended before publishing: {reason}");
        }
        *published = Published::Gone;
    }

    /// Runs the hello exchange; on success the hub channel is being listened on.
    async fn hello(&self, session: &Session) -> anyhow::Result<mux::Listener> {
        let mut hello = session.listen(auth::CHANNEL)?;
        let mut ch = tokio::time::timeout(auth::TIMEOUT, hello.accept())
            .await
            .map_err(|_| anyhow::anyhow!("no hello within {:?}", auth::TIMEOUT))??;
        drop(hello);
        let mut hub_listener = None;
        let verdict = auth::server_hello(&mut ch, self.opts.token.as_ref(), || {
            hub_listener = Some(session.listen(HUB_CHANNEL).map_err(|e| e.to_string())?);
            Ok(())
        })
        .await;
        // End with FIN, never a reset: some yamux implementations drop unread data on RST.
        let _ =
            tokio::time::timeout(auth::TIMEOUT, tokio::io::AsyncWriteExt::shutdown(&mut ch)).await;
        verdict?;
        hub_listener.ok_or_else(|| anyhow::anyhow!("hub listener missing after hello"))
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Names of the published peers (sorted).
    pub(crate) fn names(&self) -> Vec<String> {
        self.peers.names()
    }

    /// A receiver that sees a change whenever a peer joins or leaves.
    #[cfg(test)]
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The handle of peer `name`, if it is published.
    fn peer(&self, name: &str) -> Result<PeerHandle, Status> {
        self.peers.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "unknown peer {name:?} (list shows the connected peers)"
            ))
        })
    }

    /// Probes `holder`, the current owner of `name`, on behalf of a connection that wants the
    /// name: if the holder does not answer a cheap call within `probe_timeout` (its link is
    /// frozen or half-open: a client reconnecting before keepalive noticed its old session), it
    /// is evicted and its session closed. A holder that delivered file chunks meanwhile is
    /// alive even if the answer itself was late. Returns whether the name was freed.
    async fn evict_if_silent(&self, name: &str, holder: &PeerHandle) -> bool {
        let limit = self.opts.probe_timeout;
        let chunks_before = holder.chunks.load(Ordering::Relaxed);
        let probe = holder
            .export
            .with_options(CallOptions::default().timeout(limit));
        let why = match tokio::time::timeout(limit, probe.stat(".".to_owned())).await {
            // Any answer, even an error from its file system, means the holder is alive.
            Ok(Ok(_)) => return false,
            Ok(Err(s)) if !matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable) => {
                return false
            }
            Ok(Err(s)) => s.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        if holder.chunks.load(Ordering::Relaxed) != chunks_before {
            debug!(peer = %name, "probe unanswered ({why}) but the holder is streaming: alive");
            return false;
        }
        if self.peers.remove(name, holder.conn) {
            self.changed();
            warn!(peer = %name, holder = holder.conn, "evicted: the holder of the name did not answer a probe ({why}); giving the name to the new connection");
        }
        // Not awaited: closing a frozen link takes the whole close grace.
        let session = holder.session.clone();
        tokio::spawn(async move { session.close().await }.in_current_span());
        true
    }

    /// Waits up to `busy_wait` for a call slot on `peer`.
    async fn slot(&self, name: &str, peer: &PeerHandle) -> Result<OwnedSemaphorePermit, Status> {
        match tokio::time::timeout(self.opts.busy_wait, peer.calls.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(peer_gone(name, "it left")),
            Err(_) => {
                warn!(peer = %name, limit = self.opts.max_reads_per_peer, "busy: refusing a call");
                Err(Status::resource_exhausted(format!(
                    "peer {name:?} is busy: {} calls to it are already in flight; try again later",
                    self.opts.max_reads_per_peer
                )))
            }
        }
    }
}

/// Accepts and serves [`HUB_CHANNEL`] channels until the session ends; returns why it ended.
/// Closes the session gracefully itself when the hub shuts down, or when the connection has
/// not published within [`HubOptions::publish_timeout`].
async fn serve_channels(
    mut listener: mux::Listener,
    conn: &ConnState,
    server: &rpc::Server,
) -> mux::CloseReason {
    let (session, label) = (&conn.session, conn.label.as_str());
    let stop = &conn.hub.stop;
    let publish_timeout = conn.hub.opts.publish_timeout;
    let publish_deadline = tokio::time::sleep(publish_timeout);
    tokio::pin!(publish_deadline);
    let mut awaiting_publish = true;
    // Channel tasks are owned here: when the session ends this set is dropped and aborts them.
    let mut channels = JoinSet::new();
    // Bounded: one iteration per channel, and the session's max_channels bounds the live ones.
    loop {
        tokio::select! {
            reason = session.closed() => return reason,
            () = stop.cancelled() => {
                debug!("closing the session: the hub is shutting down");
                session.close().await;
                return session.closed().await;
            }
            () = &mut publish_deadline, if awaiting_publish => {
                awaiting_publish = false;
                // Waits for a publish in progress (bounded by its dial-back timeout).
                if matches!(*conn.published.lock().await, Published::No) {
                    warn!(after = ?publish_timeout, "closing: the connection did not publish in time");
                    session.close().await;
                    return session.closed().await;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok(ch) => {
                    let server = server.clone();
                    let label = label.to_owned();
                    channels.spawn(async move {
                        if let Err(e) = server.serve_named(ch, label).await {
                            debug!("hub channel ended: {e}");
                        }
                    }.in_current_span());
                }
                Err(_) => return session.closed().await,
            },
            Some(_) = channels.join_next(), if !channels.is_empty() => {}
        }
    }
}

/// A connection's publish state.
enum Published {
    /// Not yet.
    No,
    /// As this name.
    As(String),
    /// The connection has ended; publishing is no longer possible.
    Gone,
}

/// Per-connection state shared by that connection's service instances.
struct ConnState {
    id: ConnId,
    label: String,
    session: Session,
    hub: Arc<HubState>,
    // A tokio mutex: held across the dial back to the client, so that publish and the
    // departure cleanup are ordered.
    published: tokio::sync::Mutex<Published>,
}

impl ConnState {
    /// The name this connection published; `FailedPrecondition` if it has not (only published
    /// peers may look at others: every reader is also a named, exporting peer).
    async fn published_name(&self) -> Result<String, Status> {
        match &*self.published.lock().await {
            Published::As(name) => Ok(name.clone()),
            Published::No => Err(Status::failed_precondition(
                "publish first: this connection has not published a name",
            )),
            Published::Gone => Err(Status::unavailable("the connection is closing")),
        }
    }
}

/// The [`Hub`] service as seen by one connection.
struct HubService(Arc<ConnState>);

impl HubService {
    /// Forwards one unary call to the exporter published as `name`: only a published caller
    /// may ask, the call holds one of that peer's read slots while it runs, is bounded by
    /// `peer_timeout`, and the peer's error comes back rewritten by [`from_peer`].
    async fn forward<T, F, Fut>(&self, name: &str, call: F) -> Result<T, Status>
    where
        F: FnOnce(ExportClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let reader = self.0.published_name().await?;
        let hub = &self.0.hub;
        let peer = hub.peer(name)?;
        let _slot = hub.slot(name, &peer).await?;
        let export = peer.export.with_options(
            CallOptions::default()
                .timeout(hub.opts.peer_timeout)
                .metadata(READER_KEY, reader),
        );
        call(export).await.map_err(|s| from_peer(name, s))
    }
}

fn peer_gone(name: &str, detail: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("peer gone: {name:?} disconnected ({detail})"))
}

/// Rewrites a status from an exporter for the reader: connection loss becomes "peer gone",
/// anything else gets the peer's name in front.
fn from_peer(name: &str, s: Status) -> Status {
    match s.code() {
        Code::Unavailable => peer_gone(name, s.message()),
        Code::DeadlineExceeded => {
            Status::deadline_exceeded(format!("peer {name:?} did not answer in time"))
        }
        code => Status::new(code, format!("{name}: {}", s.message())),
    }
}

impl Hub for HubService {
    async fn publish(&self, _ctx: Context, req: PublishReq) -> Result<PublishResp, Status> {
        let conn = &self.0;
        let name = req.name;
        validate_name(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut published = conn.published.lock().await;
        match &*published {
            Published::No => {}
            Published::As(old) => {
                return Err(Status::failed_precondition(format!(
                    "this connection is already published as {old:?}"
                )))
            }
            Published::Gone => return Err(Status::unavailable("the connection is closing")),
        }
        let taken = || Status::already_exists(NameError::Taken { name: name.clone() }.to_string());
        // Before dialing back: a live holder keeps the name (the insert below re-checks
        // atomically), a silent one is evicted.
        if let Some(holder) = conn.hub.peers.get(&name) {
            if !conn.hub.evict_if_silent(&name, &holder).await {
                warn!(peer = %name, conn = conn.id, "refused: name already taken");
                return Err(taken());
            }
        }
        let ch = tokio::time::timeout(EXPORT_DIAL_TIMEOUT, conn.session.dial(EXPORT_CHANNEL))
            .await
            .map_err(|_| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel within {EXPORT_DIAL_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel: {e}"
                ))
            })?;
        let handle = PeerHandle {
            conn: conn.id,
            session: conn.session.clone(),
            export: ExportClient::new(rpc::Client::with_config(
                ch,
                rpc::Config::default().stream_window(conn.hub.opts.forward_window),
            )),
            chunks: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(Semaphore::new(conn.hub.opts.max_reads_per_peer.max(1))),
        };
        if let Err(e) = conn.hub.peers.insert(&name, conn.id, handle) {
            warn!(peer = %name, conn = conn.id, "refused: {e}");
            return Err(match e {
                NameError::Taken { .. } => taken(),
                other => Status::invalid_argument(other.to_string()),
            });
        }
        *published = Published::As(name.clone());
        conn.hub.changed();
        let peers = conn.hub.peers.len() as u32;
        info!(peer = %name, conn = conn.id, addr = %conn.label, peers, "joined");
        Ok(PublishResp { name, peers })
    }

    async fn list(&self, _ctx: Context, _req: ListReq) -> Result<Vec<String>, Status> {
        self.0.published_name().await?;
        Ok(self.0.hub.names())
    }

    async fn ls(&self, _ctx: Context, req: PeerPath) -> Result<Listing, Status> {
        let PeerPath { peer, path } = req;
        self.forward(&peer, |export| async move { export.ls(path).await })
            .await
    }

    async fn stat(&self, _ctx: Context, req: PeerPath) -> Result<Entry, Status> {
        let PeerPath { peer, path } = req;
        self.forward(&peer, |export| async move { export.stat(path).await })
            .await
    }

    async fn read(&self, _ctx: Context, req: PeerRead) -> Result<ItemStream<Chunk>, Status> {
        let reader = self.0.published_name().await?;
        let hub = &self.0.hub;
        let name = req.peer;
        let peer = hub.peer(&name)?;
        let slot = hub.slot(&name, &peer).await?;
        info!(%reader, peer = %name, path = %req.path, "read");
        let upstream = peer
            .export
            .with_options(CallOptions::default().metadata(READER_KEY, reader.clone()))
            .read(ReadReq {
                path: req.path,
                offset: req.offset,
            })
            .await
            .map_err(|s| from_peer(&name, s))?;
        // Each item is pulled from the exporter only when the reader's credit lets the rpc
        // server poll this stream, so at most one stream window per hop is in flight. The slot
        // is held until the stream is finished or dropped (reader gone: the drop also cancels
        // the exporter's call).
        let timeout = hub.opts.peer_timeout;
        let chunks = peer.chunks.clone();
        let forwarded =
            futures::stream::unfold((upstream, Some(slot), name), move |(mut up, slot, name)| {
                let chunks = chunks.clone();
                async move {
                    slot.as_ref()?;
                    // Only polled when the reader has credit, so this measures the exporter.
                    let next = match tokio::time::timeout(timeout, up.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let status = Status::deadline_exceeded(format!(
                                "peer {name:?} sent nothing for {timeout:?}"
                            ));
                            return Some((Err(status), (up, None, name)));
                        }
                    };
                    match next {
                        Some(Ok(chunk)) => {
                            chunks.fetch_add(1, Ordering::Relaxed);
                            let slot = if chunk.eof { None } else { slot };
                            Some((Ok(chunk), (up, slot, name)))
                        }
                        Some(Err(s)) => {
                            let status = from_peer(&name, s);
                            debug!(peer = %name, "forwarded read failed: {status}");
                            Some((Err(status), (up, None, name)))
                        }
                        None => {
                            let status = peer_gone(&name, "the transfer was cut short");
                            debug!(peer = %name, "forwarded read failed: {status}");
                            Some((Err(status), (up, None, name)))
                        }
                    }
                }
            });
        Ok(Box::pin(forwarded))
    }
}

#[cfg(test)]
mod tests;
