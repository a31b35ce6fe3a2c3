//! The hub: accepts one connection per client, serves [`Hub`], forwards calls to exporters.
//!
//! Per connection (one task, in a `conn` span): optional TLS handshake, a server-side mux
//! session, the hello exchange (the only channel listened on before it succeeds), then an
//! [`rpc::Peer`] over the session: the hub serves [`Hub`] to the client and holds a client of
//! the client's [`Export`](crate::proto::Export) service. The service instance is per
//! connection and holds that connection's session and publish state, so the hub knows who
//! calls by the connection a call arrives on; `Hub.publish` takes the caller's export client
//! with `ctx.callback()`, and checks that the client serves [`EXPORT_CHANNEL`], where the hub
//! dials its reads, over the same session. The hub never connects to a client.
//!
//! Admission ([`admission`]): a connection counts as *pending* from accept until it has
//! published. Pending connections are capped overall ([`HubOptions::max_pending`]) and per
//! source address ([`HubOptions::max_pending_per_addr`]); at a cap the hub sheds the oldest
//! silent connection rather than turn the newcomer away, and refuses only a newcomer whose
//! address already has its cap of connections all talking. A refused client is told why in
//! its hello ("too many connections from your address"); a client that publishes when
//! [`HubOptions::max_connections`] clients are published is told "the hub is full". A pending
//! connection costs a socket and a small task until its first byte arrives (its session is
//! made only then), so the hub can hold thousands. Every deadline is absolute: the TLS
//! handshake and the hello together must finish within [`HubOptions::hello_timeout`] of
//! accept, and the publish within [`HubOptions::publish_timeout`] of the hello's end (the dial
//! back to the client's export service included), else the session is closed.
//!
//! Only a published connection may use `list`/`ls`/`stat`/`read`. A name is never taken from a
//! live connection: publishing a name another connection holds is refused ("already taken")
//! until the transport declares the holder dead (its session ends: quit, crash, or the mux
//! keepalive), and only then is the name free. No application-level probe decides it.
//!
//! When a session ends its task removes the peer, and calls in flight to it fail with "peer
//! gone". [`HubState::shutdown`] stops the accept loop and closes every session gracefully (a
//! yamux GoAway, so clients see "closed by the peer", not an i/o error), each within the
//! session's `close_grace`.
//!
//! Forwarded calls to one exporter hold one of [`HubOptions::max_reads_per_peer`] slots (a call
//! waits up to [`HubOptions::busy_wait`] for one, then fails "busy"), and one reader holds at
//! most [`HubOptions::max_reads_per_reader`] of them per exporter. A forwarded read is pumped
//! by its own task from the exporter into a one-item hand-over to the reader's stream:
//! - `ls`/`stat` go over the exporter's own peer link (the one it calls the hub on); reads use
//!   a channel the hub opens on first use, so an idle client costs no more than its session
//!   and peer link;
//! - reads use a channel of their own to the exporter. Each read's stream window (chunks the
//!   exporter may send ahead) is sized from the round trip of that channel's dial: twice the
//!   bandwidth-delay product at [`HubOptions::forward_rate`] (credit comes back in half-window
//!   batches, so only half a window is sure to be in flight), at least
//!   [`HubOptions::forward_window`]. Beyond that floor a read reserves its window from the
//!   exporter's [`HubOptions::forward_budget`] and gets what is left of it when others hold
//!   the rest. So the hub holds at most `forward_budget + max_reads_per_peer ×
//!   (forward_window + 2) × 256 KiB` of one exporter's reads (the `+ 2`: the hand-over and
//!   the chunk in the pump's hands): 32 + 8 × 10 × 0.25 = 52 MiB with the defaults, whatever
//!   the readers do, and 2.5 MiB per read on a LAN. Chunks are forwarded as they arrived
//!   (their bytes shared with the received frame, never copied at the hub);
//! - "peer sent nothing" fires only when the *exporter* has been silent for
//!   [`HubOptions::peer_timeout`] on every read (a chunk of another read proves it is alive,
//!   so a read queued behind others on a slow link is not failed);
//! - a reader that takes nothing for [`HubOptions::reader_stall`] (grants no credit, or does
//!   not read its socket) loses the read: the pump ends, the exporter's call is cancelled and
//!   the slot is free, and the reader is told "you took nothing" at once, credit or not;
//! - a chunk larger than [`CHUNK_SIZE`] or not at the expected offset is a protocol error, and
//!   the reads channel refuses any frame over [`MAX_CHUNK_FRAME`] before buffering it (the
//!   `ls`/`stat` channel over [`MAX_MESSAGE`], the largest `ls` reply).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, CallOptions, Code, Context, ItemStream, Status};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{self, Token};
use crate::export::{Entry, Listing, CHUNK_SIZE};
use crate::proto::{
    Chunk, ExportClient, Hub, ListReq, PeerPath, PeerRead, PublishReq, PublishResp, ReadReq,
    EXPORT_CHANNEL, READER_KEY,
};
use crate::registry::{validate_name, ConnId, NameError, Registry};

mod admission;

use admission::{Admission, LogLimit, Pending, Refused};

/// How long the hub waits to open the channel to a publishing client's export service (and
/// never past the connection's publish deadline).
const EXPORT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest rpc message on the hub's channels, both ways: the biggest legitimate one is an
/// `ls` reply of [`MAX_LIST_ENTRIES`](crate::export::MAX_LIST_ENTRIES) entries with 255-byte
/// names (about 2.7 MB). A peer that announces a bigger frame loses that channel before the
/// hub buffers it.
pub(crate) const MAX_MESSAGE: usize = 3 << 20;

/// Largest rpc message on the channel forwarded reads use: one chunk of [`CHUNK_SIZE`] and its
/// envelope (a few dozen bytes). A chunk under it but over [`CHUNK_SIZE`] is refused as a
/// protocol error when it arrives.
pub(crate) const MAX_CHUNK_FRAME: usize = CHUNK_SIZE + 1024;

/// The first byte of a TLS record carrying a handshake (a ClientHello starts with it).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The largest offset a read may start at. `off_t` is signed, so no file holds a byte at
/// `i64::MAX` or beyond: a read from there is refused as out of range.
const MAX_OFFSET: u64 = i64::MAX as u64 - 1;

/// Refused connections told why at once (each costs a session for at most
/// [`REFUSAL_TIME`]); more are closed without a word.
const MAX_REFUSALS: usize = 64;

/// How long a refused client has to send its hello and take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(3);

/// The hub's settings.
#[derive(Clone)]
pub(crate) struct HubOptions {
    /// Secret clients must present in the hello exchange. Default: none.
    pub(crate) token: Option<Token>,
    /// TLS acceptor. Default: none (plaintext).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Calls forwarded to one peer at a time. Default: 8.
    pub(crate) max_reads_per_peer: usize,
    /// Of those, most one reader connection may hold per exporter, so one reader cannot take
    /// every slot of a peer. Default: 4 (clamped to `max_reads_per_peer`).
    pub(crate) max_reads_per_reader: usize,
    /// How long a call waits for one of those slots before failing "busy". Default: 2 s.
    pub(crate) busy_wait: Duration,
    /// Deadline of a forwarded `ls`/`stat`, and how long a forwarded read waits while the
    /// exporter sends nothing at all, on any read (a whole read may take as long as it needs).
    /// Default: 30 s.
    pub(crate) peer_timeout: Duration,
    /// How long a forwarded read may wait for its reader to take the next chunk (no credit
    /// granted, or the reader's socket not read) before the hub gives the read up and frees
    /// its slot. Default: 30 s.
    pub(crate) reader_stall: Duration,
    /// Most published clients at once; a client that publishes beyond it is refused with
    /// "the hub is full". Default: 1024.
    pub(crate) max_connections: usize,
    /// Most connections that have not published yet (hello included), from all addresses
    /// together; beyond it the oldest silent one is shed. Each holds a file descriptor: the
    /// hub needs `max_connections + max_pending` of them and some more. Default: 2048.
    pub(crate) max_pending: usize,
    /// Most connections that have not published yet from one source IP address; beyond it
    /// the oldest silent one from that address is shed, or the newcomer refused if none is
    /// silent. Default: 8.
    pub(crate) max_pending_per_addr: usize,
    /// How long after accept the TLS handshake (if any) and the hello must be done. Default:
    /// 10 s.
    pub(crate) hello_timeout: Duration,
    /// How long after the hello a connection must have published, else it is closed (so that
    /// it cannot hold a connection slot). Default: 10 s.
    pub(crate) publish_timeout: Duration,
    /// Smallest stream window (chunks the exporter may send ahead) of a read the hub
    /// forwards, granted whatever the budget. Default: 8 (2 MiB).
    pub(crate) forward_window: u32,
    /// Rate one forwarded read should reach on a long link, in bytes per second: the window
    /// is sized to carry it over the exporter's round trip (twice the bandwidth-delay
    /// product). Default: 125,000,000 (1 Gbit/s).
    pub(crate) forward_rate: u64,
    /// Bytes of window beyond the floor that one exporter's reads may reserve together: a
    /// read gets the window its round trip wants, or what is left of this budget. Default:
    /// 32 MiB.
    pub(crate) forward_budget: usize,
    /// Session settings (keepalive bounds how fast a silent peer is dropped, and so how soon
    /// its name is free again). Default: `mux::Config::default()`.
    pub(crate) mux: mux::Config,
}

impl Default for HubOptions {
    fn default() -> HubOptions {
        HubOptions {
            token: None,
            tls: None,
            max_reads_per_peer: 8,
            max_reads_per_reader: 4,
            busy_wait: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(30),
            reader_stall: Duration::from_secs(30),
            max_connections: 1024,
            max_pending: 2048,
            max_pending_per_addr: 8,
            hello_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            forward_window: 8,
            forward_rate: 125_000_000,
            forward_budget: 32 << 20,
            mux: mux::Config::default(),
        }
    }
}

/// What the hub keeps per published peer.
#[derive(Clone)]
struct PeerHandle {
    /// The exporter's session, to dial its export service for reads.
    session: Session,
    /// The exporter's service for `ls` and `stat`: the callback client of its peer link.
    export: ExportClient,
    /// The same service on a channel of its own for reads, dialed on the first read (frames
    /// over one chunk are refused there), and the stream window a read wants, sized from the
    /// round trip of that dial.
    /// Dialed again on the next read once its conn has ended (an exporter that broke the
    /// protocol on it loses that channel, not its session).
    reads: Arc<tokio::sync::Mutex<Option<(ExportClient, u32)>>>,
    /// Chunks of window beyond the floor that reads of this exporter may still reserve
    /// ([`HubOptions::forward_budget`]).
    window_budget: Arc<Semaphore>,
    /// When the hub last received anything from this exporter (a chunk of any read, an
    /// `ls`/`stat` answer), in milliseconds since the hub's epoch.
    heard: Arc<AtomicU64>,
    /// Slots for forwarded reads (and ls/stat) to this peer.
    calls: Arc<Semaphore>,
    /// The forwarded reads holding those slots, for a newcomer to take an idle one's.
    active: Arc<Mutex<Vec<ActiveRead>>>,
}

/// One forwarded read holding a slot of its exporter.
struct ActiveRead {
    /// Distinguishes it from the reader's other reads.
    id: u64,
    /// The reader's connection.
    conn: ConnId,
    /// When the reader last took a chunk of it (or it started), in milliseconds since the
    /// hub's epoch.
    took: Arc<AtomicU64>,
    /// Whether a chunk waits for the reader to take it (so the reader, not the exporter,
    /// holds the read up).
    blocked: Arc<AtomicBool>,
    /// Cancelled to give its slot to another reader.
    stop: CancellationToken,
}

/// How long a read must have taken nothing before a reader waiting for a slot of the same
/// exporter may take it over (when its own reader holds more than its fair share).
const IDLE_BEFORE_PREEMPT: Duration = Duration::from_secs(1);

/// How often a call waiting for a slot looks for an idle read to take it from.
const PREEMPT_CHECK: Duration = Duration::from_millis(250);

/// Takes `peer`'s active-reads list; a poisoned lock still holds a consistent list.
fn active_reads(peer: &PeerHandle) -> std::sync::MutexGuard<'_, Vec<ActiveRead>> {
    peer.active
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What admission decided for an accepted connection.
pub(crate) enum Admit {
    /// Serve it, holding this pending place (none: tests that drive the hub directly).
    Pending(Option<Pending>),
    /// Tell it why it is refused, holding one of the [`MAX_REFUSALS`] places.
    Refuse(Refused, OwnedSemaphorePermit),
}

impl Admit {
    /// Cancelled if the connection is shed before it publishes.
    fn shed(&self) -> CancellationToken {
        match self {
            Admit::Pending(Some(p)) => p.shed(),
            _ => CancellationToken::new(),
        }
    }
}

/// The hub. Cheap to share (`Arc`); [`HubState::serve`] runs the accept loop.
pub(crate) struct HubState {
    opts: HubOptions,
    peers: Registry<PeerHandle>,
    next_conn: AtomicU64,
    /// Ids of forwarded reads.
    next_read: AtomicU64,
    /// Seats of published clients ([`HubOptions::max_connections`]).
    connections: Arc<Semaphore>,
    admission: Arc<Admission>,
    /// Refusals being told to their clients at once; beyond it a refused connection is
    /// simply closed.
    refusals: Arc<Semaphore>,
    /// Rate limits of the log lines about refusals, sheds, and connections closed before they
    /// published (silent, failed hello, no publish in time): a flood must not flood the log.
    refusal_log: LogLimit,
    shed_log: LogLimit,
    early_log: LogLimit,
    /// Origin of the `heard` clocks.
    epoch: Instant,
    /// Bumped whenever the set of peers changes (lets tests await a departure).
    changes: tokio::sync::watch::Sender<u64>,
    /// Cancelled by [`HubState::shutdown`]: every connection task closes its session.
    stop: CancellationToken,
}

impl HubState {
    /// A hub with no peers.
    pub(crate) fn new(opts: HubOptions) -> Arc<HubState> {
        let connections = Arc::new(Semaphore::new(opts.max_connections.max(1)));
        let admission = Admission::new(opts.max_pending, opts.max_pending_per_addr);
        Arc::new(HubState {
            opts,
            peers: Registry::new(),
            next_conn: AtomicU64::new(1),
            next_read: AtomicU64::new(1),
            connections,
            admission,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            refusal_log: LogLimit::new(),
            shed_log: LogLimit::new(),
            early_log: LogLimit::new(),
            epoch: Instant::now(),
            changes: tokio::sync::watch::Sender::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// File descriptors the hub may hold at its caps: published clients, pending
    /// connections, refusals being told, and some to spare (listener, logs, runtime).
    pub(crate) fn descriptors_wanted(&self) -> usize {
        self.opts.max_connections + self.opts.max_pending + MAX_REFUSALS + 64
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
        // finish, so the set holds at most `max_connections` published ones (their seats),
        // `max_pending` pending ones and `MAX_REFUSALS` being refused (plus the publishes in
        // progress that will be refused a seat).
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let _ = tcp.set_nodelay(true);
                        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::info_span!("conn", id, %addr);
                        let admit = match self.admission.admit(addr.ip()) {
                            Ok((pending, shed)) => {
                                if let Some(shed) = shed {
                                    self.log_shed(shed);
                                }
                                Admit::Pending(Some(pending))
                            }
                            Err(refused) => {
                                let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
                                    self.log_refusal(addr, refused, false);
                                    continue;
                                };
                                self.log_refusal(addr, refused, true);
                                Admit::Refuse(refused, permit)
                            }
                        };
                        let deadline = Instant::now() + match admit {
                            Admit::Pending(_) => self.opts.hello_timeout,
                            Admit::Refuse(..) => self.opts.hello_timeout.min(REFUSAL_TIME),
                        };
                        let hub = self.clone();
                        conns.spawn(hub.accept_tcp(tcp, id, addr, admit, deadline).instrument(span));
                    }
                    Err(e) => {
                        // Typically EMFILE: free a descriptor held by a silent connection, and
                        // back off briefly instead of spinning.
                        let shed = self.admission.shed_oldest_silent();
                        warn!(shed = shed.is_some(), "accept failed: {e}");
                        let pause = if shed.is_some() { 10 } else { 100 };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
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

    /// Serves one accepted TCP connection: waits for its first byte (a TLS hub tells a
    /// plaintext client so in the hello; a plaintext hub logs a TLS client and hangs up), runs
    /// the TLS handshake if any, then the session, or tells the client it is refused.
    /// Everything before the hello's end is bounded by `deadline`; a pending connection that
    /// is shed before it has published is closed.
    pub(crate) async fn accept_tcp(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        id: ConnId,
        addr: SocketAddr,
        admit: Admit,
        deadline: Instant,
    ) {
        let label = addr.to_string();
        let shed = admit.shed();
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => peeked,
            () = self.stop.cancelled() => return,
            () = shed.cancelled() => return debug!("shed while silent"),
        };
        match peeked {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => return debug!("closed before sending anything"),
            Ok(Err(e)) => return debug!("connection failed before sending anything: {e}"),
            Err(_) => {
                // At most a line a second: a flood of silent connections must not flood the log.
                if let Some(more) = self.early_log.allow() {
                    warn!(
                        more_since_last_line = more,
                        "closing: sent nothing within {:?}", self.opts.hello_timeout
                    );
                }
                return;
            }
        }
        if let Admit::Pending(Some(p)) = &admit {
            p.heard();
        }
        let speaks_tls = first[0] == TLS_HANDSHAKE_RECORD;
        match (&self.opts.tls, speaks_tls) {
            (None, false) => self.serve_or_refuse(tcp, id, label, admit, deadline).await,
            (None, true) => {
                warn!(
                    "refused: the client started a TLS handshake, but this hub is plaintext \
                     (start it with --tls-cert and --tls-key, or connect without --tls-ca)"
                );
                // Take the ClientHello off the socket so that closing it is a plain end of
                // stream (the client can tell a hang-up from a reset), then hang up.
                let mut tcp = tcp;
                let mut hello = [0u8; 4096];
                let read = tokio::io::AsyncReadExt::read(&mut tcp, &mut hello);
                let _ = tokio::time::timeout_at(deadline, read).await;
            }
            (Some(_), false) => {
                warn!("refusing a plaintext client: this hub requires TLS");
                self.refuse(tcp, auth::Refusal::TlsRequired, deadline).await;
            }
            (Some(acceptor), true) => {
                let limit = deadline.min(Instant::now() + crate::tls::HANDSHAKE_TIMEOUT);
                let handshake = tokio::time::timeout_at(limit, acceptor.accept(tcp));
                // No session exists yet, so a shutdown simply drops the half-made link.
                let done = tokio::select! {
                    done = handshake => done,
                    () = self.stop.cancelled() => return,
                    () = shed.cancelled() => return debug!("shed during the tls handshake"),
                };
                match done {
                    Ok(Ok(tls)) => self.serve_or_refuse(tls, id, label, admit, deadline).await,
                    Ok(Err(e)) => warn!("tls handshake failed: {e}"),
                    Err(_) => warn!("tls handshake timed out"),
                }
            }
        }
    }

    /// Serves an admitted connection, or tells a refused one why.
    async fn serve_or_refuse<T>(
        self: Arc<Self>,
        io: T,
        id: ConnId,
        label: String,
        admit: Admit,
        deadline: Instant,
    ) where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match admit {
            // Boxed: the session's state is allocated only once the client has said something,
            // so that a silent connection costs little.
            Admit::Pending(pending) => {
                Box::pin(self.serve_conn(io, id, label, pending, deadline)).await;
            }
            Admit::Refuse(refused, _permit) => {
                let refusal = match refused {
                    Refused::TooManyFromAddress { .. } => auth::Refusal::TooManyFromAddress,
                };
                self.refuse(io, refusal, deadline).await;
            }
        }
    }

    /// Answers a client's hello with `refusal` whatever it says, so that it can tell its user
    /// why instead of reporting a broken connection.
    async fn refuse<T>(&self, io: T, refusal: auth::Refusal, deadline: Instant)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let session = Session::server(io, self.opts.mux.clone().max_channels(2));
        let refuse = async {
            let mut hello = session.listen(auth::CHANNEL)?;
            let mut ch = hello.accept().await?;
            auth::server_refuse(&mut ch, refusal).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
            anyhow::Ok(())
        };
        tokio::select! {
            done = tokio::time::timeout_at(deadline, refuse) => {
                if let Ok(Err(e)) = done {
                    debug!("could not tell the client it is refused: {e:#}");
                }
            }
            () = self.stop.cancelled() => {}
        }
        session.close().await;
    }

    /// Logs a refusal at admission, at most one line a second.
    fn log_refusal(&self, addr: SocketAddr, refused: Refused, told: bool) {
        if let Some(more) = self.refusal_log.allow() {
            let Refused::TooManyFromAddress { limit } = refused;
            warn!(
                %addr,
                limit,
                told,
                more_since_last_line = more,
                "refusing a connection: too many connections from its address are still \
                 saying hello"
            );
        }
    }

    /// Logs a connection shed to make room, at most one line a second.
    fn log_shed(&self, shed: admission::Shed) {
        if let Some(more) = self.shed_log.allow() {
            info!(
                addr = %shed.ip,
                silent = shed.silent,
                more_since_last_line = more,
                pending = self.admission.len(),
                "shedding the oldest {} pending connection to make room for a new one",
                if shed.silent { "silent" } else { "unpublished" }
            );
        }
    }

    /// Serves one client connection over `io` (any byte stream) until it ends, with the
    /// default hello deadline from now and no admission slot (tests drive the hub this way).
    #[cfg(test)]
    pub(crate) async fn serve_io<T>(self: Arc<Self>, io: T, id: ConnId, label: String)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let deadline = Instant::now() + self.opts.hello_timeout;
        self.serve_conn(io, id, label, None, deadline).await;
    }

    /// Serves one client connection over `io` (any byte stream) until it ends. The hello must
    /// be done by `deadline`; `pending` is released once the connection has published.
    async fn serve_conn<T>(
        self: Arc<Self>,
        io: T,
        id: ConnId,
        label: String,
        pending: Option<Pending>,
        deadline: Instant,
    ) where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shed = pending
            .as_ref()
            .map_or_else(CancellationToken::new, Pending::shed);
        let session = Session::server(io, self.opts.mux.clone());
        let hello = tokio::select! {
            hello = self.hello(&session, deadline) => hello,
            () = self.stop.cancelled() => Err(anyhow::anyhow!("the hub is shutting down")),
            () = shed.cancelled() => Err(anyhow::anyhow!("shed to make room for a newer connection")),
        };
        match hello {
            Ok(()) => {}
            Err(e) => {
                if let Some(more) = self.early_log.allow() {
                    warn!(
                        more_since_last_line = more,
                        "refused before publishing: {e:#}"
                    );
                }
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
            is_published: AtomicBool::new(false),
            publish_deadline: Instant::now() + self.opts.publish_timeout,
            pending: Mutex::new(pending),
            shed,
            seat: Mutex::new(None),
            reads: Mutex::new(HashMap::new()),
        });
        // A client gets at most this many calls running at once on its peer link: plenty for a
        // REPL, a bound against floods. Requests are small (a name, a path); replies can be
        // `ls` listings of up to 3 MiB, and a client that does not read them may leave at most
        // 8 MiB waiting until the write-stall bound (rpc default, 30 s) ends the link. The
        // hub's calls to the client's export (`ls`/`stat`) use the same settings.
        let mut server = rpc::Server::with_config(
            rpc::Config::default()
                .max_in_flight(64)
                .max_in_flight_bytes(1 << 20)
                .max_outbound_bytes(8 << 20)
                .max_message_size(MAX_MESSAGE),
        );
        server.add(HubService(conn.clone()).into_service());
        // Both directions over the session, set up by the publish deadline at the latest.
        let peer = tokio::select! {
            peer = tokio::time::timeout_at(
                conn.publish_deadline,
                rpc::Peer::connect(&session, server),
            ) => peer,
            () = self.stop.cancelled() => {
                session.close().await;
                return;
            }
            () = conn.shed.cancelled() => {
                debug!("shed before its rpc link was up");
                session.close().await;
                return;
            }
        };
        let peer = match peer {
            Ok(Ok(peer)) => peer,
            Ok(Err(e)) => {
                warn!("refused: no rpc peer link: {e}");
                session.close().await;
                return;
            }
            Err(_) => {
                let after = self.opts.publish_timeout;
                warn!(
                    ?after,
                    "refused: no rpc peer link within the publish deadline"
                );
                session.close().await;
                return;
            }
        };
        let reason = watch_conn(&conn).await;
        drop(peer);
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

    /// Runs the hello exchange, all of it by `deadline`; on success the rpc peer link may be
    /// set up.
    async fn hello(&self, session: &Session, deadline: Instant) -> anyhow::Result<()> {
        let exchange = async {
            let mut hello = session.listen(auth::CHANNEL)?;
            let mut ch = hello.accept().await?;
            drop(hello);
            let verdict = auth::server_hello(&mut ch, self.opts.token.as_ref(), || Ok(())).await;
            // End with FIN, never a reset: some yamux implementations drop unread data on RST.
            // Bounded by the hello deadline around this block.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut ch).await;
            verdict?;
            anyhow::Ok(())
        };
        let limit = self.opts.hello_timeout;
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no hello within {limit:?} of connecting"))?
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

    /// Connections admitted but not yet published.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.admission.len()
    }

    /// The handle of peer `name`, if it is published.
    fn peer(&self, name: &str) -> Result<PeerHandle, Status> {
        self.peers.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "unknown peer {name:?} (list shows the connected peers)"
            ))
        })
    }

    /// Notes that `peer` was just heard from.
    fn heard(&self, peer: &PeerHandle) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        peer.heard.fetch_max(ms, Ordering::Relaxed);
    }

    /// When `peer` was last heard from.
    fn last_heard(&self, peer: &PeerHandle) -> Instant {
        self.epoch + Duration::from_millis(peer.heard.load(Ordering::Relaxed))
    }

    /// The client of `peer`'s export service for reads, dialing its channel if this is the
    /// first read, and the stream window a read of it wants ([`window_for`] the dial's round
    /// trip).
    async fn reads_client(
        &self,
        name: &str,
        peer: &PeerHandle,
    ) -> Result<(ExportClient, u32), Status> {
        // A tokio mutex: held across the dial, so that concurrent first reads dial once.
        let mut reads = peer.reads.lock().await;
        if let Some((client, window)) = &*reads {
            if !client.client().is_closed() {
                return Ok((client.clone(), *window));
            }
        }
        let start = Instant::now();
        let ch = dial_peer(name, &peer.session).await?;
        let rtt = start.elapsed();
        let window = window_for(&self.opts, rtt);
        debug!(peer = %name, ?rtt, window, "read window sized from the round trip");
        let client = ExportClient::new(rpc::Client::with_config(
            ch,
            rpc::Config::default()
                .stream_window(self.opts.forward_window.max(1))
                .max_message_size(MAX_CHUNK_FRAME),
        ));
        *reads = Some((client.clone(), window));
        Ok((client, window))
    }

    /// The window of a new read of `peer` that wants `wanted` chunks: the floor
    /// ([`HubOptions::forward_window`]) plus what it can reserve of the exporter's budget,
    /// held until the returned permit is dropped.
    fn reserve_window(
        &self,
        peer: &PeerHandle,
        wanted: u32,
    ) -> (u32, Option<OwnedSemaphorePermit>) {
        let floor = self.opts.forward_window.max(1);
        let extra = wanted.saturating_sub(floor);
        // Bounded: each round asks for fewer chunks; racing reservations only shrink it.
        let mut ask = extra.min(peer.window_budget.available_permits() as u32);
        while ask > 0 {
            if let Ok(permit) = peer.window_budget.clone().try_acquire_many_owned(ask) {
                return (floor + ask, Some(permit));
            }
            ask = ask.min(peer.window_budget.available_permits() as u32);
        }
        (floor, None)
    }

    /// Waits up to `busy_wait` for a call slot on `peer`, for connection `conn`. When every
    /// slot is taken and `conn` holds fewer than its fair share of them (the slots divided
    /// among the readers holding some, itself included), the idlest read of a reader over
    /// its share that has taken nothing for [`IDLE_BEFORE_PREEMPT`] is given up for it: a
    /// reader that takes nothing cannot keep others out by holding or re-issuing reads.
    async fn slot(
        &self,
        name: &str,
        peer: &PeerHandle,
        conn: ConnId,
    ) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(permit) = peer.calls.clone().try_acquire_owned() {
            return Ok(permit);
        }
        // The place in the semaphore's queue is kept while reads are looked at for one to
        // give up (they may become idle during the wait).
        let acquire = peer.calls.clone().acquire_owned();
        tokio::pin!(acquire);
        let give_up = tokio::time::sleep(self.opts.busy_wait);
        tokio::pin!(give_up);
        let mut look = tokio::time::interval(PREEMPT_CHECK);
        // Bounded by `give_up`.
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    return permit.map_err(|_| peer_gone(name, "it left"));
                }
                () = &mut give_up => {
                    warn!(peer = %name, limit = self.opts.max_reads_per_peer, "busy: refusing a call");
                    return Err(Status::resource_exhausted(format!(
                        "peer {name:?} is busy: {} calls to it are already in flight; try again \
                         later",
                        self.opts.max_reads_per_peer
                    )));
                }
                _ = look.tick() => self.preempt_for(name, peer, conn),
            }
        }
    }

    /// Gives up one idle read of `peer` for connection `conn`, if `conn` is under its fair
    /// share of slots and some reader over its share has a read idle long enough.
    fn preempt_for(&self, name: &str, peer: &PeerHandle, conn: ConnId) {
        let active = active_reads(peer);
        let mut held: HashMap<ConnId, usize> = HashMap::new();
        for read in active.iter() {
            *held.entry(read.conn).or_insert(0) += 1;
        }
        let mine = held.get(&conn).copied().unwrap_or(0);
        let readers = held.len() + usize::from(mine == 0);
        let fair = (self.opts.max_reads_per_peer.max(1) / readers.max(1)).max(1);
        if mine >= fair {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = IDLE_BEFORE_PREEMPT.as_millis() as u64;
        let victim = active
            .iter()
            .filter(|r| held.get(&r.conn).copied().unwrap_or(0) > fair)
            .filter(|r| !r.stop.is_cancelled() && r.blocked.load(Ordering::Relaxed))
            .filter(|r| now.saturating_sub(r.took.load(Ordering::Relaxed)) >= idle_ms)
            .min_by_key(|r| r.took.load(Ordering::Relaxed));
        if let Some(victim) = victim {
            info!(peer = %name, from = victim.conn, to = conn, "giving an idle read's slot to another reader");
            victim.stop.cancel();
        }
    }

    /// Waits for the next item of a forwarded read. Gives up (`None`) only once the exporter
    /// has sent nothing at all, on any of its reads, for `peer_timeout`.
    async fn next_from<S>(&self, peer: &PeerHandle, up: &mut S) -> Option<Option<S::Item>>
    where
        S: Stream + Unpin,
    {
        let limit = self.opts.peer_timeout;
        let mut since = Instant::now();
        // Bounded: every further round needs the exporter to have been heard from meanwhile.
        loop {
            match tokio::time::timeout_at(since + limit, up.next()).await {
                Ok(item) => return Some(item),
                Err(_) => {
                    let last = self.last_heard(peer);
                    if last <= since {
                        return None;
                    }
                    since = last;
                }
            }
        }
    }
}

/// Waits for the connection's session to end; returns why it ended. Closes the session
/// gracefully itself when the hub shuts down, or when the connection has not published by
/// its publish deadline (whatever a publish in progress is doing).
async fn watch_conn(conn: &ConnState) -> mux::CloseReason {
    let session = &conn.session;
    let stop = &conn.hub.stop;
    let publish_deadline = tokio::time::sleep_until(conn.publish_deadline);
    tokio::pin!(publish_deadline);
    let mut awaiting_publish = true;
    // Bounded: the publish deadline fires at most once; every other branch returns.
    loop {
        tokio::select! {
            reason = session.closed() => return reason,
            () = stop.cancelled() => {
                debug!("closing the session: the hub is shutting down");
                session.close().await;
                return session.closed().await;
            }
            () = conn.shed.cancelled(), if awaiting_publish => {
                awaiting_publish = false;
                if !conn.is_published.load(Ordering::SeqCst) {
                    debug!("closing: shed to make room for a newer connection");
                    session.close().await;
                    return session.closed().await;
                }
            }
            () = &mut publish_deadline, if awaiting_publish => {
                awaiting_publish = false;
                if !conn.is_published.load(Ordering::SeqCst) {
                    let after = conn.hub.opts.publish_timeout;
                    if let Some(more) = conn.hub.early_log.allow() {
                        warn!(
                            ?after,
                            more_since_last_line = more,
                            "closing: the connection did not publish in time"
                        );
                    }
                    session.close().await;
                    return session.closed().await;
                }
            }
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
    /// Set once published; read by the publish deadline without waiting for the lock.
    is_published: AtomicBool,
    /// When the connection must have published.
    publish_deadline: Instant,
    /// Its admission place, released when it publishes.
    pending: Mutex<Option<Pending>>,
    /// Cancelled if admission sheds the connection before it has published.
    shed: CancellationToken,
    /// Its seat among the published clients, taken by the publish.
    seat: Mutex<Option<OwnedSemaphorePermit>>,
    /// Calls this connection has forwarded to each exporter right now.
    reads: Mutex<HashMap<String, usize>>,
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

    /// Opens a channel to this client's export service, by the publish deadline at the latest.
    async fn dial_export(&self) -> Result<mux::Conn, Status> {
        let limit = self
            .publish_deadline
            .saturating_duration_since(Instant::now())
            .min(EXPORT_DIAL_TIMEOUT);
        tokio::time::timeout(limit, self.session.dial(EXPORT_CHANNEL))
            .await
            .map_err(|_| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel within {limit:?}"
                ))
            })?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "could not open your {EXPORT_CHANNEL:?} channel: {e}"
                ))
            })
    }

    /// Takes one of this reader's places for calls to exporter `peer`, or refuses at once if
    /// it already holds `max_reads_per_reader` of them.
    fn reader_slot(self: &Arc<Self>, peer: &str) -> Result<ReaderSlot, Status> {
        let opts = &self.hub.opts;
        let limit = opts
            .max_reads_per_reader
            .clamp(1, opts.max_reads_per_peer.max(1));
        let mut reads = self
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = reads.entry(peer.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(Status::resource_exhausted(format!(
                "you already have {limit} calls to peer {peer:?} in flight (the most one reader \
                 may have); wait for one to finish"
            )));
        }
        *n += 1;
        Ok(ReaderSlot {
            conn: self.clone(),
            peer: peer.to_owned(),
        })
    }
}

/// One of a reader's places for calls to one exporter; dropping it frees it.
struct ReaderSlot {
    conn: Arc<ConnState>,
    peer: String,
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        let mut reads = self
            .conn
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = reads.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reads.remove(&self.peer);
            }
        }
    }
}

/// The [`Hub`] service as seen by one connection.
struct HubService(Arc<ConnState>);

impl HubService {
    /// Forwards one unary call to the exporter published as `name`: only a published caller
    /// may ask, the call holds one of this reader's places and one of that peer's slots while
    /// it runs, is bounded by `peer_timeout`, and the peer's error comes back rewritten by
    /// [`from_peer`].
    async fn forward<T, F, Fut>(&self, name: &str, call: F) -> Result<T, Status>
    where
        F: FnOnce(ExportClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let reader = self.0.published_name().await?;
        let hub = &self.0.hub;
        let peer = hub.peer(name)?;
        let _mine = self.0.reader_slot(name)?;
        let _slot = hub.slot(name, &peer, self.0.id).await?;
        let export = peer.export.with_options(
            CallOptions::default()
                .timeout(hub.opts.peer_timeout)
                .metadata(READER_KEY, reader),
        );
        let result = call(export).await;
        if result.is_ok() {
            hub.heard(&peer);
        }
        result.map_err(|s| from_peer(name, s))
    }
}

/// Opens a channel to the export service of the peer `name` over its `session`, within
/// [`EXPORT_DIAL_TIMEOUT`].
async fn dial_peer(name: &str, session: &Session) -> Result<mux::Conn, Status> {
    match tokio::time::timeout(EXPORT_DIAL_TIMEOUT, session.dial(EXPORT_CHANNEL)).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(peer_gone(name, format!("no channel to it: {e}"))),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "peer {name:?} did not open a channel within {EXPORT_DIAL_TIMEOUT:?}"
        ))),
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

/// The stream window a read forwarded from an exporter whose round trip is `rtt` wants:
/// twice the chunks that carry `forward_rate` over it (credit comes back in half-window
/// batches, so half a window must cover the bandwidth-delay product), at least
/// `forward_window`. [`HubState::reserve_window`] bounds what a read gets.
fn window_for(opts: &HubOptions, rtt: Duration) -> u32 {
    let bdp = (opts.forward_rate as f64 * rtt.as_secs_f64() / CHUNK_SIZE as f64).ceil() as u64;
    let floor = u64::from(opts.forward_window.max(1));
    bdp.saturating_mul(2).max(floor).min(u64::from(u32::MAX)) as u32
}

/// Whether `s` ended a forwarded read because the exporter produced a message over the reads
/// channel's limit: a protocol error of the exporter, not a departure. An exporter whose rpc
/// layer learnt the hub's limit refuses to send such a chunk and ends the read with
/// `RESOURCE_EXHAUSTED` (an exporter's reads answer that code for nothing else); one that
/// sends it anyway meets the hub's rpc conn, which refuses the frame unread and ends.
fn oversized_frame(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted
        || (s.is_conn_lost() && s.message().contains("-byte frame, over the"))
}

/// Checks one chunk of a forwarded read against the protocol: at most [`CHUNK_SIZE`] bytes,
/// at the offset where the previous one ended.
fn check_chunk(name: &str, chunk: &Chunk, expected: u64) -> Result<(), Status> {
    let broke = |what: String| {
        warn!(peer = %name, "protocol error on a forwarded read: {what}");
        Status::internal(format!("peer {name:?} broke the protocol: {what}"))
    };
    if chunk.data.len() > CHUNK_SIZE {
        return Err(broke(format!(
            "it sent a chunk of {} bytes; the limit is {CHUNK_SIZE}",
            chunk.data.len()
        )));
    }
    if chunk.offset != expected {
        return Err(broke(format!(
            "it sent a chunk at offset {} where {expected} was due",
            chunk.offset
        )));
    }
    Ok(())
}

/// What a forwarded read's pump needs besides its streams.
struct Pump {
    hub: Arc<HubState>,
    name: String,
    peer: PeerHandle,
    /// Where the next chunk must start.
    offset: u64,
    /// Why the pump gave up on the reader, for the reader's stream to report.
    why: Arc<Mutex<Option<Status>>>,
    /// The reader's call, to end it when the pump gives up.
    ctx: Context,
    /// The slots and the window reserved from the exporter's budget, freed when the pump
    /// ends.
    _slots: (
        OwnedSemaphorePermit,
        ReaderSlot,
        Option<OwnedSemaphorePermit>,
    ),
    /// This read in its exporter's active list (taken out when the pump ends).
    id: u64,
    /// When the reader last took a chunk (shared with the active list).
    took: Arc<AtomicU64>,
    /// Set while a chunk waits for the reader (shared with the active list).
    blocked: Arc<AtomicBool>,
    /// Cancelled when the slot goes to another reader.
    stop: CancellationToken,
}

impl Drop for Pump {
    fn drop(&mut self) {
        active_reads(&self.peer).retain(|r| r.id != self.id);
    }
}

impl Pump {
    /// Ends the read for the reader with `why`: at once, even when the reader grants no
    /// credit (the call is aborted with it), and else once the hand-over is empty.
    fn give_up(&self, why: Status) {
        debug!(peer = %self.name, "forwarded read given up: {why}");
        self.ctx.abort(why.clone());
        *self
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
    }

    /// Moves chunks from the exporter to the reader's hand-over until the read is done, the
    /// reader is gone, or one side stays stuck past its bound (see the module docs).
    async fn run<S>(mut self, mut up: S, tx: mpsc::Sender<Result<Chunk, Status>>)
    where
        S: Stream<Item = Result<Chunk, Status>> + Unpin,
    {
        let (name, hub) = (self.name.clone(), self.hub.clone());
        // Bounded: every iteration forwards one item or ends the pump; a read is finite
        // (eof, error) or ends with its reader.
        loop {
            let next = tokio::select! {
                next = hub.next_from(&self.peer, &mut up) => next,
                () = tx.closed() => return debug!(peer = %name, "reader gone: read cancelled"),
                () = self.stop.cancelled() => return self.give_up(Status::resource_exhausted(format!(
                    "peer {name:?} is busy and you took nothing of this read for {IDLE_BEFORE_PREEMPT:?} \
                     or more: the hub gave its slot to another reader"
                ))),
            };
            let item = match next {
                None => Err(Status::deadline_exceeded(format!(
                    "peer {name:?} sent nothing for {:?}",
                    hub.opts.peer_timeout
                ))),
                Some(None) => Err(peer_gone(&name, "the transfer was cut short")),
                Some(Some(Err(s))) if oversized_frame(&s) => Err(Status::internal(format!(
                    "peer {name:?} broke the protocol: it sent a message over the \
                     {MAX_CHUNK_FRAME}-byte limit of a chunk"
                ))),
                Some(Some(Err(s))) => Err(from_peer(&name, s)),
                Some(Some(Ok(chunk))) => {
                    hub.heard(&self.peer);
                    check_chunk(&name, &chunk, self.offset).map(|()| chunk)
                }
            };
            let last = match &item {
                Ok(chunk) => {
                    self.offset = self.offset.saturating_add(chunk.data.len() as u64);
                    chunk.eof
                }
                Err(s) => {
                    debug!(peer = %name, "forwarded read failed: {s}");
                    true
                }
            };
            let stall = hub.opts.reader_stall;
            self.blocked.store(true, Ordering::Relaxed);
            let sent = tokio::select! {
                sent = tokio::time::timeout(stall, tx.send(item)) => sent,
                () = self.stop.cancelled() => return self.give_up(Status::resource_exhausted(format!(
                    "peer {name:?} is busy and you took nothing of this read for {IDLE_BEFORE_PREEMPT:?} \
                     or more: the hub gave its slot to another reader"
                ))),
            };
            self.blocked.store(false, Ordering::Relaxed);
            match sent {
                Ok(Ok(())) if !last => {
                    let now = hub.epoch.elapsed().as_millis() as u64;
                    self.took.fetch_max(now, Ordering::Relaxed);
                }
                Ok(_) => return,
                Err(_) => {
                    warn!(peer = %name, ?stall, "the reader took nothing: giving up its read");
                    return self.give_up(Status::deadline_exceeded(format!(
                        "you took nothing of this read for {stall:?}; the hub gave it up to free \
                         peer {name:?} for others"
                    )));
                }
            }
        }
    }
}

impl Hub for HubService {
    async fn publish(&self, ctx: Context, req: PublishReq) -> Result<PublishResp, Status> {
        let conn = &self.0;
        // The caller's export service, over its own peer link: how the hub calls it back.
        let export = ExportClient::new(ctx.callback()?);
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
        // A live holder keeps its name: only the end of its session (quit, crash, keepalive)
        // frees it. Checked again atomically by the insert below.
        if conn.hub.peers.get(&name).is_some() {
            warn!(peer = %name, conn = conn.id, "refused: name already taken");
            return Err(taken());
        }
        // The client must serve its export channel (where reads go) before it is listed: open
        // one and let it go (the reads channel is opened on first use).
        drop(conn.dial_export().await?);
        // A seat among the published clients, or "the hub is full".
        let Ok(seat) = conn.hub.connections.clone().try_acquire_owned() else {
            let limit = conn.hub.opts.max_connections;
            if let Some(more) = conn.hub.refusal_log.allow() {
                warn!(peer = %name, conn = conn.id, limit, more_since_last_line = more, "refused: the hub is full");
            }
            return Err(Status::resource_exhausted(format!(
                "the hub is full: it serves {limit} clients, its limit; try again later"
            )));
        };
        let handle = PeerHandle {
            session: conn.session.clone(),
            export,
            reads: Arc::new(tokio::sync::Mutex::new(None)),
            window_budget: Arc::new(Semaphore::new(conn.hub.opts.forward_budget / CHUNK_SIZE)),
            heard: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(Semaphore::new(conn.hub.opts.max_reads_per_peer.max(1))),
            active: Arc::new(Mutex::new(Vec::new())),
        };
        if let Err(e) = conn.hub.peers.insert(&name, conn.id, handle) {
            warn!(peer = %name, conn = conn.id, "refused: {e}");
            return Err(match e {
                NameError::Taken { .. } => taken(),
                other => Status::invalid_argument(other.to_string()),
            });
        }
        *published = Published::As(name.clone());
        *conn
            .seat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(seat);
        conn.is_published.store(true, Ordering::SeqCst);
        drop(
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
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

    async fn read(&self, ctx: Context, req: PeerRead) -> Result<ItemStream<Chunk>, Status> {
        let reader = self.0.published_name().await?;
        if req.offset > MAX_OFFSET {
            return Err(Status::out_of_range(format!(
                "offset {} is past the largest possible file offset ({MAX_OFFSET})",
                req.offset
            )));
        }
        let hub = &self.0.hub;
        let name = req.peer;
        let peer = hub.peer(&name)?;
        let mine = self.0.reader_slot(&name)?;
        let slot = hub.slot(&name, &peer, self.0.id).await?;
        let (client, wanted) = hub.reads_client(&name, &peer).await?;
        let (window, reserved) = hub.reserve_window(&peer, wanted);
        info!(%reader, peer = %name, path = %req.path, window, "read");
        let upstream = client
            .with_options(
                CallOptions::default()
                    .metadata(READER_KEY, reader.clone())
                    .stream_window(window),
            )
            .read(ReadReq {
                path: req.path,
                offset: req.offset,
            })
            .await
            .map_err(|s| from_peer(&name, s))?;
        hub.heard(&peer);
        // The pump pulls from the exporter while the reader takes; the one-item hand-over and
        // the exporter's window bound what the hub holds. The reader's stream reports why the
        // pump gave up, if it did, once the hand-over is empty.
        let (tx, rx) = mpsc::channel(1);
        let why = Arc::new(Mutex::new(None));
        let id = hub.next_read.fetch_add(1, Ordering::Relaxed);
        let took = Arc::new(AtomicU64::new(hub.epoch.elapsed().as_millis() as u64));
        let stop = CancellationToken::new();
        let blocked = Arc::new(AtomicBool::new(false));
        active_reads(&peer).push(ActiveRead {
            id,
            conn: self.0.id,
            took: took.clone(),
            blocked: blocked.clone(),
            stop: stop.clone(),
        });
        let pump = Pump {
            hub: hub.clone(),
            name,
            peer,
            offset: req.offset,
            why: why.clone(),
            ctx,
            _slots: (slot, mine, reserved),
            id,
            took,
            blocked,
            stop,
        };
        tokio::spawn(pump.run(upstream, tx).in_current_span());
        let forwarded = futures::stream::unfold(Some((rx, why)), |state| async move {
            let (mut rx, why) = state?;
            match rx.recv().await {
                Some(item) => Some((item, Some((rx, why)))),
                None => {
                    let why = why
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    why.map(|s| (Err(s), None))
                }
            }
        });
        Ok(Box::pin(forwarded))
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
