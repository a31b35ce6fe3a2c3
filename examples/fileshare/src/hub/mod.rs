//! The hub: accepts one connection per client, serves [`Hub`](crate::proto::Hub), forwards calls to exporters.
//!
//! Per connection (one task, in a `conn` span): optional TLS handshake, a server-side mux
//! session, the hello exchange (the only channel listened on before it succeeds), then an
//! [`rpc::Peer`](netchan_rpc::Peer) over the session: the hub serves [`Hub`](crate::proto::Hub) to the client and holds a client of
//! the client's [`Export`](crate::proto::Export) service. The service instance is per
//! connection and holds that connection's session and publish state, so the hub knows who
//! calls by the connection a call arrives on; `Hub.publish` takes the caller's export client
//! with `ctx.callback()`, and checks that the client serves [`EXPORT_CHANNEL`](crate::proto::EXPORT_CHANNEL), where the hub
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
//! Names are claimed through the fleet's [directory](crate::directory) (`HubState::directory`)
//! before they enter the name table, and released from it when their connection ends. A hub
//! on its own uses the in-process directory (the rules above, nothing more); a hub of a fleet
//! (`share hub --etcd`) claims each name in etcd, so a name another hub holds is "already
//! taken" too, and `list` shows the whole fleet from the directory's watched copy. A peer
//! published here is served to the other hubs only while the directory can prove this hub
//! holds its name (see `crate::directory::Etcd`); otherwise their routed calls fail as
//! unavailable until it can. Readers connected to this hub keep reading it meanwhile (both
//! ends are here); when the directory learns that another hub took the name, the local
//! holder's session is closed.
//!
//! When a session ends its task removes the peer, and calls in flight to it fail with "peer
//! gone". [`HubState::shutdown`] stops the accept loop and closes every session gracefully (a
//! yamux GoAway, so clients see "closed by the peer", not an i/o error), each within the
//! session's `close_grace`.
//!
//! Forwarded calls to one exporter hold one of [`HubOptions::max_reads_per_peer`] slots (a call
//! waits up to [`HubOptions::busy_wait`] for one, then fails "busy"), and one reader holds at
//! most [`HubOptions::max_reads_per_reader`] of them per exporter. A forwarded read is the
//! reader's call pulling chunks from the exporter's stream as its credit allows, with no task
//! in between (a watchdog task per read, woken by its timer, ends a read the reader holds up):
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
//!   (forward_window + 1) × CHUNK_SIZE` of one exporter's reads (the `+ 1`: the chunk the
//!   reader's call is sending on): 32 + 8 × 3 × 1 = 56 MiB with the defaults, whatever the
//!   readers do, and 3 MiB per read on a LAN. Chunks are forwarded as they arrived
//!   (their bytes shared with the received frame, never copied at the hub);
//! - "peer sent nothing" fires only when the *exporter* has been silent for
//!   [`HubOptions::peer_timeout`] on every read (a chunk of another read proves it is alive,
//!   so a read queued behind others on a slow link is not failed);
//! - a reader that takes nothing for [`HubOptions::reader_stall`] (grants no credit, or does
//!   not read its socket) loses the read: its call ends, the exporter's call is cancelled and
//!   the slot is free, and the reader is told "you took nothing" at once, credit or not;
//! - a chunk larger than [`CHUNK_SIZE`] or not at the expected offset is a protocol error, and
//!   the reads channel refuses any frame over [`MAX_CHUNK_FRAME`] before buffering it (the
//!   `ls`/`stat` channel over [`MAX_MESSAGE`], the largest `ls` reply).
//!
//! # Layout
//!
//! - this module: [`HubOptions`], [`HubState`] (the accept loop, admission's verdicts,
//!   refusals, shutdown) and the hub's name table: `HubState::peers`, a
//!   [`Registry`] of [`PeerHandle`]s, reached only
//!   through `HubState::peer`, `HubState::names` and the publish/departure paths (the one seam
//!   a directory of many hubs replaces);
//! - [`registry`]: the name table itself (pure bookkeeping, valid names);
//! - [`admission`]: pending connections, per-address caps, shedding;
//! - [`conn`]: one connection's life (hello, rpc peer link, publish deadline, departure);
//! - [`forward`]: forwarding to an exporter (slots, windows, a read's stream and watchdog);
//! - [`service`]: the [`Hub`](crate::proto::Hub) service one connection sees, and where a
//!   named peer is (here, or on another hub of the fleet);
//! - [`relay`]: hub-to-hub routing: the fleet listener, the `Relay` service, and the links
//!   to other hubs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netchan_mux::{self as mux, Session};
use netchan_rpc::Status;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{self, Token};
use crate::directory::{Directory, Event, HubId, InProcess};
use crate::export::CHUNK_SIZE;

mod admission;
mod conn;
mod forward;
pub(crate) mod registry;
pub(crate) mod relay;
mod service;

pub(crate) use admission::bind_listener;
use admission::{Admission, LogLimit, Pending, Refused};
use forward::PeerHandle;
use registry::{ConnId, Registry};

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
    /// forwards, granted whatever the budget. Default: 2 MiB of chunks.
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
    /// its name is free again). Hub-to-hub sessions use them too. Default:
    /// `mux::Config::default()`.
    pub(crate) mux: mux::Config,
    /// This hub's part in a fleet of hubs (its id, the hubs' shared token, where other hubs'
    /// peers are); `None` for a hub on its own. Default: `None`.
    pub(crate) fleet: Option<relay::FleetOptions>,
    /// The fleet's directory, where names are claimed. Default: `None`, an in-process
    /// directory (a hub on its own).
    pub(crate) directory: Option<Arc<dyn Directory>>,
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
            forward_window: crate::proto::chunks(2 << 20),
            forward_rate: 125_000_000,
            forward_budget: 32 << 20,
            mux: mux::Config::default(),
            fleet: None,
            directory: None,
        }
    }
}

/// Whether bytes from the client are waiting on `tcp` now (one non-blocking peek, whatever the
/// runtime has been told about the socket so far).
fn has_spoken(tcp: &tokio::net::TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut byte), Ok(n) if n > 0)
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    /// Links to the other hubs of the fleet.
    links: relay::Links,
    /// Where names are claimed, fleet-wide ([`HubOptions::directory`]).
    directory: Arc<dyn Directory>,
}

impl HubState {
    /// A hub with no peers.
    pub(crate) fn new(opts: HubOptions) -> Arc<HubState> {
        let connections = Arc::new(Semaphore::new(opts.max_connections.max(1)));
        let admission = Admission::new(opts.max_pending, opts.max_pending_per_addr);
        let directory = opts.directory.clone().unwrap_or_else(|| {
            let id = HubId::new("local").expect("a valid hub id");
            Arc::new(InProcess::new(id)) as Arc<dyn Directory>
        });
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
            links: relay::Links::new(),
            directory,
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
        // Owned by this call: aborted when it returns.
        let watcher = AbortOnDrop(tokio::spawn(self.clone().watch_directory()));
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
                        let talking = has_spoken(&tcp);
                        let admit = match self.admission.admit(addr.ip(), talking) {
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
        drop(watcher);
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
        let mut admit = admit;
        let mut first = [0u8; 1];
        let mut readmitted = false;
        // Bounded: a second round only after a readmission, which happens at most once.
        let peeked = loop {
            let shed = admit.shed();
            tokio::select! {
                peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => break peeked,
                () = self.stop.cancelled() => return,
                () = shed.cancelled() => {
                    // Shed as silent, but this task may not have run since its first bytes
                    // came: a connection that has spoken takes a silent one's place instead.
                    if readmitted || !has_spoken(&tcp) {
                        return debug!("shed while silent");
                    }
                    let Some((pending, also_shed)) = self.admission.readmit(addr.ip()) else {
                        return debug!("shed just after it spoke: no silent connection to shed");
                    };
                    debug!("shed as silent just after it spoke: took a silent one's place");
                    if let Some(also_shed) = also_shed {
                        self.log_shed(also_shed);
                    }
                    admit = Admit::Pending(Some(pending));
                    readmitted = true;
                }
            }
        };
        let shed = admit.shed();
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

    /// Follows the directory's events until it closes: joins and leaves (here or on other
    /// hubs) change `list`; a name another hub took from this one ends the local holder's
    /// session.
    async fn watch_directory(self: Arc<Self>) {
        let mut events = self.directory.subscribe();
        let own = self.directory.hub_id().clone();
        // Bounded: one iteration per event; ends when the directory does.
        loop {
            match events.recv().await {
                Ok(Event::Lost { name }) => {
                    // Another hub took the name while this hub could not prove its claim:
                    // the client here no longer owns it. Its session ends (gracefully); its
                    // departure frees the table entry, and it reconnects.
                    if let Some(peer) = self.peers.get(&name) {
                        warn!(peer = %name, "closing: another hub of the fleet took this name");
                        peer.session.close().await;
                    }
                }
                Ok(event) => {
                    match &event {
                        Event::Joined { name, hub } if *hub != own => {
                            info!(peer = %name, %hub, "joined on another hub");
                        }
                        Event::Left { name, hub } if *hub != own => {
                            info!(peer = %name, %hub, "left on another hub");
                        }
                        Event::HubUp(h) => {
                            info!(hub = %h.id, addr = %h.addr, "a hub joined the fleet")
                        }
                        Event::HubDown { id } => info!(hub = %id, "a hub left the fleet"),
                        _ => {}
                    }
                    self.changed();
                }
                // Missed events: `list` may have changed.
                Err(broadcast::error::RecvError::Lagged(_)) => self.changed(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
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

    // The name table: who is published here, and how to reach them.

    /// Names of the published peers (sorted): the whole fleet's, from the directory.
    pub(crate) fn names(&self) -> Vec<String> {
        self.directory.names()
    }

    /// The handle of peer `name` for a reader connected to this hub, if it is published here.
    /// Served whether or not the directory can prove the claim right now: both ends are
    /// connected to this hub, so a read between them needs no one else (an etcd outage does
    /// not stop it). Once the directory learns another hub took the name, the local holder's
    /// session is closed and the name leaves the table.
    fn peer(&self, name: &str) -> Result<PeerHandle, Status> {
        match self.peers.get(name) {
            Some(peer) => Ok(peer),
            None => match self.directory.lookup(name) {
                // Not "unavailable": clients read that code as the peer having gone.
                Some(holder) if !holder.here => Err(Status::failed_precondition(format!(
                    "peer {name:?} is connected to another hub ({}), which this hub does not \
                     route to",
                    holder.hub
                ))),
                _ => Err(Status::not_found(format!(
                    "unknown peer {name:?} (list shows the connected peers)"
                ))),
            },
        }
    }

    /// The handle of peer `name` for a call routed here by another hub: only while the
    /// directory can prove this hub holds the name (its lease is known to be alive). A hub
    /// cut off from etcd past its lease's TTL may have lost the name to another hub, so it
    /// serves no other hub for it until it has renewed or re-claimed it.
    fn peer_for_fleet(&self, name: &str) -> Result<PeerHandle, Status> {
        let peer = self.peer(name)?;
        if self.directory.holds(name) {
            Ok(peer)
        } else {
            Err(Status::unavailable(format!(
                "the hub holding {name:?} cannot prove it still holds the name: the fleet's \
                 directory is unreachable from there; try again once it is back"
            )))
        }
    }
}

#[cfg(test)]
mod fleet_tests;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod relay_tests;
#[cfg(test)]
mod tests;
