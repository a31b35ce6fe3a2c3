//! The client side: one connection to the hub, the exported service, and reconnection.
//!
//! `establish_at` turns any byte stream into a published [`Link`]: a client-side mux session,
//! the hello exchange, an [`rpc::Peer`] link that serves [`Export`](crate::proto::Export) over the root to the hub
//! and gives the [`HubClient`], which has called `Hub.publish`, and a listener on
//! [`EXPORT_CHANNEL`] serving [`Export`](crate::proto::Export) too (the hub reads files over channels it opens there). [`Peer`] keeps a link up:
//! when the session ends it says so and reconnects with exponential backoff and jitter,
//! re-publishing under the same name; commands issued meanwhile fail with "not connected".
//!
//! A client may be given several hubs (the hubs of a fleet), and a hub's name may resolve to
//! several addresses: [`connect`] tries them in turn, and after a loss the reconnection starts
//! with the hub after the one that was lost, so a dead hub is tried last.
//!
//! [`transfer`] checks a read's chunks as they come ([`FileStream`]); the exported service
//! itself is [`crate::export`]'s.

use std::sync::Arc;
use std::time::Duration;

use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, CallOptions, Code, Status};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::auth::{self, AuthError};
use crate::export::{export_server, Root};

mod transfer;

use crate::proto::{
    Entry, HubClient, ListReq, Listing, PeerPath, PeerRead, PublishReq, EXPORT_CHANNEL,
};
#[cfg(test)]
pub(crate) use transfer::read_window;
pub(crate) use transfer::FileStream;

/// How long connecting (TCP, TLS, hello, publish) to one address may take as a whole.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long resolving one hub's name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most hubs a client takes ([`ClientOptions::hubs`]).
pub(crate) const MAX_HUBS: usize = 16;

/// Most addresses of one hub name that are tried.
const MAX_RESOLVED: usize = 8;

/// Deadline of unary calls to the hub (list, ls, stat).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Longest delay between reconnect attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Delay between attempts while the hub says our name is still held (jittered like
/// [`backoff`]): a hub that died keeps its names until its lease ends (10 s by default), and
/// the name is ours again the moment it does, so the client asks often rather than backing
/// off past that moment.
const NAME_HELD_RETRY: Duration = Duration::from_secs(1);

/// How many attempts in a row wait only [`NAME_HELD_RETRY`] while the name is held: a
/// minute's worth, past any usual lease, after which a name another client really holds is
/// asked for with the ordinary backoff.
const NAME_HELD_FAST_TRIES: u32 = 60;

/// How a client reaches the hub and what it exports.
#[derive(Debug, Clone)]
pub(crate) struct ClientOptions {
    /// Name to publish.
    pub(crate) name: String,
    /// Exported directory.
    pub(crate) root: Root,
    /// Hub addresses (`host:port`), at least one and at most [`MAX_HUBS`], tried in turn.
    pub(crate) hubs: Vec<String>,
    /// Token for the hello exchange.
    pub(crate) token: Option<String>,
    /// TLS settings; `None` for plaintext. The server name is the one every hub's certificate
    /// must carry; `None`: each hub's own host name.
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, Option<ServerName<'static>>)>,
    /// Show error details (the layers below a message) in what the client tells its user:
    /// `-v`, or `RUST_LOG` set. Default: off.
    pub(crate) verbose: bool,
    /// Session settings.
    pub(crate) mux: mux::Config,
}

/// Why connecting to the hub failed. Each message is one sentence about the user's situation;
/// the layers below are kept as sources, shown with `-v`.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// No TCP connection.
    #[error("cannot connect to {addr} (is the hub running?)")]
    Tcp {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed; `why` says it in plain words.
    #[error("{why}")]
    Tls {
        /// The address.
        addr: String,
        /// The plain words ([`crate::tls::explain_handshake`]).
        why: String,
        /// What the TLS layer said.
        #[source]
        source: std::io::Error,
    },
    /// Everything together took longer than [`CONNECT_TIMEOUT`].
    #[error("the hub at {addr} did not let us in within {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout {
        /// The address.
        addr: String,
    },
    /// The mux session failed before publishing.
    #[error("the connection to the hub broke while joining")]
    Mux(#[from] mux::Error),
    /// The hub refused the hello (token, version, TLS).
    #[error(transparent)]
    Hello(AuthError),
    /// The hub turned the connection away at one of its caps ("the hub is full", "too many
    /// connections from your address"); trying again later may work.
    #[error("{reason}")]
    Refused {
        /// The hub's sentence.
        reason: String,
    },
    /// The rpc link with the hub (both directions over the session) could not be set up.
    #[error("the connection to the hub broke while joining")]
    Rpc(#[from] rpc::PeerError),
    /// The hub refused the name.
    #[error("the hub refused the name {name:?}: {}", status.message())]
    Publish {
        /// The name.
        name: String,
        /// The hub's answer.
        status: Status,
    },
}

impl From<AuthError> for ConnectError {
    fn from(e: AuthError) -> ConnectError {
        match e {
            AuthError::Refused { reason } => ConnectError::Refused { reason },
            other => ConnectError::Hello(other),
        }
    }
}

impl ConnectError {
    /// Whether the hub refused our name because it is held: by our own session that has not
    /// ended yet, by a hub of the fleet that died and whose lease has not run out, or by
    /// another client.
    pub(crate) fn name_held(&self) -> bool {
        matches!(self, ConnectError::Publish { status, .. } if status.code() == Code::AlreadyExists)
    }

    /// Whether trying again later may succeed without the user changing anything: the hub
    /// is not up yet, is full, or still holds our name for a session that is ending. A wrong
    /// token, version, certificate or name is not.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ConnectError::Tcp { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Mux(_)
            | ConnectError::Refused { .. }
            | ConnectError::Rpc(_) => true,
            ConnectError::Tls { source, .. } => crate::tls::is_transient(source),
            ConnectError::Hello(e) => matches!(e, AuthError::Io(_) | AuthError::Timeout { .. }),
            ConnectError::Publish { status, .. } => matches!(
                status.code(),
                Code::AlreadyExists | Code::Unavailable | Code::DeadlineExceeded
            ),
        }
    }
}

/// A published connection to the hub.
pub(crate) struct Link {
    /// The hub's address as configured (one of [`ClientOptions::hubs`]).
    addr: String,
    /// Its place in [`ClientOptions::hubs`].
    index: usize,
    session: Session,
    /// What the hub said when it let us in.
    welcome: auth::Welcome,
    hub: HubClient,
    /// The stream window of a read from the hub: [`transfer::read_window`] of the round trip
    /// measured when the link was made.
    read_window: u32,
    /// Both directions of rpc with the hub; the hub's `ls`/`stat` calls arrive here.
    _rpc: rpc::Peer,
    /// Serves the hub's calls to our export; aborted when the link is dropped.
    _export: JoinSet<()>,
}

/// Establishes a published [`Link`] with the first of [`ClientOptions::hubs`] that lets us in,
/// trying them in order. See [`connect_from`].
pub(crate) async fn connect(opts: &ClientOptions) -> Result<Link, ConnectError> {
    connect_from(opts, 0).await
}

/// Establishes a published [`Link`] with one of [`ClientOptions::hubs`], trying them in
/// order from `first` (wrapping round), and each hub's addresses in random order. Moves on
/// only past failures that another hub may not have ([`ConnectError::is_transient`]); a wrong
/// token or certificate, or a name the fleet refuses, ends the attempt. Each address is bounded
/// by [`CONNECT_TIMEOUT`], each name's resolution by [`RESOLVE_TIMEOUT`]. Cancel-safe.
pub(crate) async fn connect_from(opts: &ClientOptions, first: usize) -> Result<Link, ConnectError> {
    let n = opts.hubs.len().clamp(1, MAX_HUBS);
    let mut failed = None;
    for i in 0..n {
        let index = (first + i) % n;
        let Some(hub) = opts.hubs.get(index) else {
            break;
        };
        match connect_hub(opts, hub, index).await {
            Ok(link) => return Ok(link),
            Err(e) if e.is_transient() => {
                debug!(hub = %hub, error = %rpc::chain(&e), "cannot join this hub; trying the next");
                // A hub that answered that our name is still held says more than one that
                // could not be reached (a dead hub of the fleet, say): the caller then asks
                // again soon, for the name comes free when the dead hub's lease ends.
                if !failed.as_ref().is_some_and(ConnectError::name_held) {
                    failed = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(failed.unwrap_or_else(|| ConnectError::Tcp {
        addr: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no hub address given"),
    }))
}

/// [`connect_from`] for the one hub `hub`, trying each address its name resolves to.
async fn connect_hub(opts: &ClientOptions, hub: &str, index: usize) -> Result<Link, ConnectError> {
    let tcp_error = |source| ConnectError::Tcp {
        addr: hub.to_owned(),
        source,
    };
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(hub))
        .await
        .map_err(|_| {
            tcp_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "resolving {hub} took longer than {}s",
                    RESOLVE_TIMEOUT.as_secs()
                ),
            ))
        })?
        .map_err(tcp_error)?;
    let mut addrs: Vec<std::net::SocketAddr> = resolved.take(MAX_RESOLVED).collect();
    // Spread the clients of a name with several addresses over them.
    addrs.shuffle(&mut rand::thread_rng());
    let mut failed = None;
    for sa in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_addr(opts, hub, sa)).await {
            Ok(Ok(mut link)) => {
                link.index = index;
                return Ok(link);
            }
            Ok(Err(e)) if e.is_transient() => failed = Some(e),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                failed = Some(ConnectError::Timeout {
                    addr: hub.to_owned(),
                })
            }
        }
    }
    Err(failed.unwrap_or_else(|| {
        tcp_error(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{hub} resolves to no address"),
        ))
    }))
}

/// Opens TCP (and TLS) to `sa`, one address of `hub`, and establishes a published [`Link`].
/// Not bounded in time by itself (see [`connect_hub`]).
async fn connect_addr(
    opts: &ClientOptions,
    hub: &str,
    sa: std::net::SocketAddr,
) -> Result<Link, ConnectError> {
    let tcp = tokio::net::TcpStream::connect(sa)
        .await
        .map_err(|source| ConnectError::Tcp {
            addr: hub.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    match &opts.tls {
        None => establish_at(tcp, opts, hub).await,
        Some((config, name)) => {
            let name = match name {
                Some(name) => name.clone(),
                None => crate::tls::server_name(hub, None).map_err(|e| ConnectError::Tls {
                    addr: hub.to_owned(),
                    why: e.to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
                })?,
            };
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| ConnectError::Tls {
                    addr: hub.to_owned(),
                    why: crate::tls::explain_handshake(hub, &source),
                    source,
                })?;
            establish_at(tls, opts, hub).await
        }
    }
}

/// Runs the client half of the protocol over `io`, a connection to the first of
/// [`ClientOptions::hubs`]: session, hello, export listener, publish. Not bounded in time by
/// itself (see [`connect`]).
#[cfg(test)]
pub(crate) async fn establish<T>(io: T, opts: &ClientOptions) -> Result<Link, ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let hub = opts.hubs.first().map(String::as_str).unwrap_or_default();
    establish_at(io, opts, hub).await
}

/// Runs the client half of the protocol over `io`, a connection to `hub`: session, hello,
/// export listener, publish. Not bounded in time by itself (see [`connect`]).
async fn establish_at<T>(io: T, opts: &ClientOptions, hub: &str) -> Result<Link, ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let session = Session::client(io, opts.mux.clone());
    let hello = async {
        // The dial is one round trip to the hub (it resolves once the hub has accepted the
        // channel): the reader's hop of every read is sized from it.
        let start = tokio::time::Instant::now();
        let mut hello = session.dial(auth::CHANNEL).await?;
        let rtt = start.elapsed();
        let welcome = auth::client_hello(&mut hello, opts.token.as_deref()).await?;
        Ok::<_, ConnectError>((hello, welcome, rtt))
    };
    let (mut hello, welcome, rtt) = match hello.await {
        Ok(hello) => hello,
        Err(e) => return Err(tls_refusal(&session, hub).await.unwrap_or(e)),
    };
    // The hub has half-closed after its answer; closing our side too ends the channel without
    // a reset.
    let _ = tokio::time::timeout(auth::TIMEOUT, hello.shutdown()).await;
    drop(hello);
    // Listen before publishing: the hub dials back during Publish.
    let exports = session.listen(EXPORT_CHANNEL)?;
    let server = export_server(opts.root.clone());
    let mut export_tasks = JoinSet::new();
    export_tasks
        .spawn(serve_exports(exports, server.clone()).instrument(tracing::debug_span!("export")));
    let link = rpc::Peer::connect(&session, server).await?;
    let hub_client = HubClient::new(link.client().clone());
    hub_client
        .publish(PublishReq {
            name: opts.name.clone(),
        })
        .await
        .map_err(|status| match status.code() {
            // The hub is full: not about the name.
            Code::ResourceExhausted => ConnectError::Refused {
                reason: status.message().to_owned(),
            },
            _ => ConnectError::Publish {
                name: opts.name.clone(),
                status,
            },
        })?;
    let read_window = transfer::read_window(rtt);
    debug!(?rtt, read_window, "read window sized from the round trip");
    Ok(Link {
        addr: hub.to_owned(),
        index: 0,
        session,
        welcome,
        hub: hub_client,
        read_window,
        _rpc: link,
        _export: export_tasks,
    })
}

/// Why the hub refused us, in plain words, if it was TLS: under TLS 1.3 a hub that refuses a
/// client certificate (or wants one) says so in an alert after the client's handshake is done,
/// so it ends the session at its first read instead of failing the handshake.
async fn tls_refusal(session: &Session, addr: &str) -> Option<ConnectError> {
    // The failure may reach us just before the session records why it ended.
    let reason = tokio::time::timeout(Duration::from_millis(200), session.closed()).await;
    let Ok(mux::CloseReason::Io(e)) = reason else {
        return None;
    };
    let refusal = crate::tls::rustls_error(&e)?.clone();
    crate::tls::is_tls_refusal(&e).then(|| ConnectError::Tls {
        addr: addr.to_owned(),
        why: crate::tls::explain_handshake(addr, &e),
        source: std::io::Error::new(e.kind(), refusal),
    })
}

/// Serves [`Export`](crate::proto::Export) on every channel the hub opens to [`EXPORT_CHANNEL`].
async fn serve_exports(mut listener: mux::Listener, server: rpc::Server) {
    let mut channels = JoinSet::new();
    // Bounded: ends when the session does (accept fails); live channels are bounded by the
    // session's max_channels and reaped as they finish.
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(ch) => {
                    let server = server.clone();
                    channels.spawn(async move {
                        if let Err(e) = server.serve_named(ch, "hub").await {
                            debug!("export channel ended: {e}");
                        }
                    }.in_current_span());
                }
                Err(e) => {
                    debug!("export listener ended: {e}");
                    return;
                }
            },
            Some(_) = channels.join_next(), if !channels.is_empty() => {}
        }
    }
}

/// Why a command could not reach its result.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No link to the hub right now.
    #[error("not connected to the hub (reconnecting in the background); try again in a moment")]
    NotConnected,
    /// The link to the hub broke during the call.
    #[error(
        "lost the connection to the hub during the command; it reconnects in the background: \
         try again in a moment"
    )]
    HubLost {
        /// What the rpc layer said (the REPL shows it with -v or RUST_LOG).
        detail: String,
    },
    /// The hub (or the peer behind it) answered with an error.
    #[error("{}", .0.message())]
    Status(Status),
    /// No chunk arrived for too long (the hub gives up on a silent peer sooner).
    #[error("no data for {after:?}; giving up")]
    Stalled {
        /// How long nothing arrived.
        after: Duration,
    },
    /// A streamed file ended before its last chunk.
    #[error("the transfer ended early (the hub or the peer went away)")]
    CutShort,
    /// What arrived is not an exact copy of the file the exporter announced.
    #[error("the copy is not exact: {detail}")]
    Corrupt {
        /// What did not match.
        detail: String,
    },
}

impl From<Status> for CallError {
    fn from(s: Status) -> CallError {
        match s.code() {
            // The hub link itself failed mid-call: a verdict of our own rpc layer, never a
            // status the hub sent (a gone *peer* is one, see `proto::peer_gone`).
            Code::Unavailable if s.is_conn_lost() => CallError::HubLost {
                detail: s.message().to_owned(),
            },
            _ => CallError::Status(s),
        }
    }
}

/// ` (detail: ...)` when `verbose` (error details asked for: `-v`, or `RUST_LOG` set), else
/// nothing.
pub(crate) fn detail_if(verbose: bool, detail: &str) -> String {
    if verbose {
        format!(" (detail: {detail})")
    } else {
        String::new()
    }
}

/// Something that shows status lines to the user (connection lost, reconnected).
pub(crate) type Notify = Arc<dyn Fn(String) + Send + Sync>;

/// A client: the current link (if any) plus the task that keeps reconnecting.
pub(crate) struct Peer {
    link: watch::Receiver<Option<Arc<Link>>>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential, capped, with "equal
/// jitter" (uniform in the upper half) so clients of a restarted hub do not come back in step.
pub(crate) fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(BACKOFF_MAX);
    capped.mul_f64(rng.gen_range(0.5..=1.0))
}

/// The waits between the attempts of one reconnection: [`backoff`], except while the hub
/// says the name is still held ([`NAME_HELD_RETRY`]).
#[derive(Debug, Default)]
pub(crate) struct Retry {
    attempt: u32,
    held: u32,
}

impl Retry {
    /// How many attempts have failed so far.
    pub(crate) fn failures(&self) -> u32 {
        self.attempt
    }

    /// Counts the failure `e` and returns the wait before the next attempt.
    pub(crate) fn after(&mut self, e: &ConnectError, rng: &mut impl Rng) -> Duration {
        let wait = if e.name_held() && self.held < NAME_HELD_FAST_TRIES {
            self.held += 1;
            NAME_HELD_RETRY.mul_f64(rng.gen_range(0.5..=1.0))
        } else {
            backoff(self.attempt, rng)
        };
        self.attempt = self.attempt.saturating_add(1);
        wait
    }
}

impl Peer {
    /// Connects once (errors are returned, for the caller to report and exit), then keeps the
    /// link up in the background, reporting through `notify`.
    pub(crate) async fn start(opts: ClientOptions, notify: Notify) -> Result<Peer, ConnectError> {
        let link = connect(&opts).await?;
        let (tx, rx) = watch::channel(Some(Arc::new(link)));
        let supervisor = tokio::spawn(supervise(opts, tx, notify));
        Ok(Peer {
            link: rx,
            supervisor,
        })
    }

    /// Whether the hub checks tokens, as it said when it last let us in (`None` while not
    /// connected).
    pub(crate) fn hub_checks_token(&self) -> Option<bool> {
        self.link
            .borrow()
            .as_ref()
            .map(|link| link.welcome.token_checked)
    }

    /// The address of the hub the link is up with (as configured), `None` while not connected.
    pub(crate) fn hub_addr(&self) -> Option<String> {
        match &*self.link.borrow() {
            Some(link) if !link.session.is_closed() => Some(link.addr.clone()),
            _ => None,
        }
    }

    /// Whether the link to the hub is up right now.
    pub(crate) fn is_connected(&self) -> bool {
        matches!(&*self.link.borrow(), Some(link) if !link.session.is_closed())
    }

    fn hub(&self) -> Result<HubClient, CallError> {
        match &*self.link.borrow() {
            Some(link) if !link.session.is_closed() => Ok(link.hub.clone()),
            _ => Err(CallError::NotConnected),
        }
    }

    fn unary(&self) -> Result<HubClient, CallError> {
        Ok(self
            .hub()?
            .with_options(CallOptions::default().timeout(CALL_TIMEOUT)))
    }

    /// `Hub.list`. Cancel-safe.
    pub(crate) async fn list(&self) -> Result<Vec<String>, CallError> {
        Ok(self.unary()?.list(ListReq {}).await?)
    }

    /// `Hub.ls`. Cancel-safe.
    pub(crate) async fn ls(&self, peer: &str, dir: &str) -> Result<Listing, CallError> {
        let req = PeerPath {
            peer: peer.to_owned(),
            path: dir.to_owned(),
        };
        Ok(self.unary()?.ls(req).await?)
    }

    /// `Hub.stat`. Cancel-safe.
    pub(crate) async fn stat(&self, peer: &str, path: &str) -> Result<Entry, CallError> {
        let req = PeerPath {
            peer: peer.to_owned(),
            path: path.to_owned(),
        };
        Ok(self.unary()?.stat(req).await?)
    }

    /// `Hub.read`: the file's chunks, verified. Dropping the stream cancels the transfer.
    pub(crate) async fn read(&self, peer: &str, path: &str) -> Result<FileStream, CallError> {
        self.read_from(peer, path, 0, crate::proto::new_hasher())
            .await
    }

    /// `Hub.read` from `offset`, to resume a copy whose first `offset` bytes the caller has
    /// already fed into `prefix`: the final check then covers the whole file. Dropping the
    /// stream cancels the transfer.
    pub(crate) async fn read_from(
        &self,
        peer: &str,
        path: &str,
        offset: u64,
        prefix: ring::digest::Context,
    ) -> Result<FileStream, CallError> {
        let req = PeerRead {
            peer: peer.to_owned(),
            path: path.to_owned(),
            offset,
        };
        let (hub, window) = match &*self.link.borrow() {
            Some(link) if !link.session.is_closed() => (link.hub.clone(), link.read_window),
            _ => return Err(CallError::NotConnected),
        };
        let inner = hub
            .with_options(CallOptions::default().stream_window(window))
            .read(req)
            .await?;
        Ok(FileStream::new(inner, offset, prefix))
    }

    /// Closes the link gracefully (the hub sees the departure at once), bounded in time.
    pub(crate) async fn close(&self) {
        self.supervisor.abort();
        let link = self.link.borrow().clone();
        if let Some(link) = link {
            let _ = tokio::time::timeout(Duration::from_secs(1), link.session.close()).await;
        }
    }

    /// The stream window of a read from the hub on the current link, if connected.
    #[cfg(test)]
    pub(crate) fn read_window(&self) -> Option<u32> {
        self.link.borrow().as_ref().map(|link| link.read_window)
    }

    /// Resolves when the link is up again (or at once if it is). Cancel-safe.
    #[cfg(test)]
    pub(crate) async fn connected(&self) {
        let mut rx = self.link.clone();
        let _ = rx
            .wait_for(|l| l.as_ref().is_some_and(|l| !l.session.is_closed()))
            .await;
    }
}

/// Keeps the link up: waits for the session to end, then reconnects with backoff.
async fn supervise(opts: ClientOptions, tx: watch::Sender<Option<Arc<Link>>>, notify: Notify) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    // Runs for the life of the client (aborted by `Peer`'s drop); each iteration waits for a
    // session to end, so it never spins.
    // Where the next reconnection starts: the hub after the one lost.
    let mut first = 0;
    loop {
        let current = tx.borrow().clone();
        if let Some(link) = current {
            let reason = link.session.closed().await;
            tx.send_replace(None);
            first = link.index + 1;
            notify(lost_message(&link.addr, &reason, opts.verbose));
            drop(link);
        }
        let mut retry = Retry::default();
        let mut wait = backoff(0, &mut rng);
        let link = loop {
            tokio::time::sleep(wait).await;
            match connect_from(&opts, first).await {
                Ok(link) => break link,
                Err(e) => {
                    // Say it on the first failure and then every 10th, not on every attempt.
                    if retry.failures() % 10 == 0 {
                        notify(format!(
                            "cannot reach {} yet; still trying (is it running?){}",
                            hubs_phrase(&opts.hubs),
                            detail_if(opts.verbose, &rpc::chain(&e))
                        ));
                    }
                    wait = retry.after(&e, &mut rng);
                }
            }
        };
        let addr = link.addr.clone();
        // Up before it is said, so that whatever shows the notice sees the link up.
        tx.send_replace(Some(Arc::new(link)));
        notify(format!(
            "reconnected to the hub at {addr}; published as {}",
            opts.name
        ));
    }
}

/// "the hub at A" or "any of the hubs A, B", for what the user is told.
pub(crate) fn hubs_phrase(hubs: &[String]) -> String {
    match hubs {
        [one] => format!("the hub at {one}"),
        many => format!("any of the hubs {}", many.join(", ")),
    }
}

/// What the user is told when the session with the hub ends: a hub that shut down closed the
/// session gracefully, anything else is a loss.
pub(crate) fn lost_message(addr: &str, reason: &mux::CloseReason, verbose: bool) -> String {
    match reason {
        mux::CloseReason::Peer => {
            format!("the hub at {addr} closed the connection (shutting down?); reconnecting")
        }
        mux::CloseReason::KeepaliveTimeout { after } => format!(
            "lost the hub at {addr}: it stopped answering for {}s; reconnecting in the \
             background{}",
            after.as_secs(),
            detail_if(verbose, &reason.to_string())
        ),
        other => format!(
            "lost the hub at {addr}: the connection broke; reconnecting in the background{}",
            detail_if(verbose, &other.to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_hub_or_a_missing_one_is_worth_retrying_a_wrong_token_is_not() {
        let refused = ConnectError::from(AuthError::Refused {
            reason: "the hub is full".into(),
        });
        assert!(matches!(refused, ConnectError::Refused { .. }));
        assert!(refused.is_transient());
        assert_eq!(refused.to_string(), "the hub is full");
        let tcp = ConnectError::Tcp {
            addr: "127.0.0.1:9".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(tcp.is_transient());
        assert_eq!(
            tcp.to_string(),
            "cannot connect to 127.0.0.1:9 (is the hub running?)"
        );
        assert!(!ConnectError::from(AuthError::BadToken).is_transient());
        let taken = ConnectError::Publish {
            name: "bob".into(),
            status: Status::already_exists("taken"),
        };
        assert!(taken.is_transient(), "the old session may still hold it");
        let bad = ConnectError::Publish {
            name: "b b".into(),
            status: Status::invalid_argument("whitespace"),
        };
        assert!(!bad.is_transient());
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let d = backoff(attempt, &mut rng);
            let full = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_MAX);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(0, &mut rng) <= BACKOFF_BASE);
        assert!(backoff(100, &mut rng) <= BACKOFF_MAX);
    }

    #[test]
    fn a_held_name_is_asked_for_every_second_for_a_minute_then_with_the_backoff() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let held = ConnectError::Publish {
            name: "bob".into(),
            status: Status::new(Code::AlreadyExists, "the name bob is taken"),
        };
        let mut retry = Retry::default();
        for _ in 0..NAME_HELD_FAST_TRIES {
            let d = retry.after(&held, &mut rng);
            assert!(d >= NAME_HELD_RETRY / 2 && d <= NAME_HELD_RETRY, "{d:?}");
        }
        assert_eq!(retry.failures(), NAME_HELD_FAST_TRIES);
        // Past the minute, the ordinary (capped) backoff.
        assert!(retry.after(&held, &mut rng) >= BACKOFF_MAX / 2);
        // Other failures always back off.
        let full = ConnectError::Refused {
            reason: "the hub is full".into(),
        };
        let mut retry = Retry::default();
        let waits: Vec<_> = (0..8).map(|_| retry.after(&full, &mut rng)).collect();
        assert!(waits[7] >= BACKOFF_MAX / 2, "{waits:?}");
    }

    #[test]
    fn jitter_spreads_clients_apart() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a: Vec<_> = (0..5).map(|_| backoff(5, &mut rng)).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]), "{a:?}");
    }

    #[test]
    fn a_hub_that_closed_the_session_reads_differently_from_a_lost_link() {
        let msg = lost_message("h:1", &mux::CloseReason::Peer, false);
        assert_eq!(
            msg,
            "the hub at h:1 closed the connection (shutting down?); reconnecting"
        );
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let msg = lost_message("h:1", &mux::CloseReason::Io(Arc::new(io)), false);
        assert_eq!(
            msg,
            "lost the hub at h:1: the connection broke; reconnecting in the background"
        );
        let msg = lost_message(
            "h:1",
            &mux::CloseReason::KeepaliveTimeout {
                after: Duration::from_millis(15_001),
            },
            false,
        );
        assert_eq!(
            msg,
            "lost the hub at h:1: it stopped answering for 15s; reconnecting in the background"
        );
    }

    #[tokio::test]
    async fn a_lost_hub_and_a_gone_peer_read_differently() {
        // A call on a link whose far end is gone: our rpc layer's own verdict.
        let (near, far) = tokio::io::duplex(64);
        drop(far);
        let lost = rpc::Client::new(near)
            .call::<_, ()>("Hub.list", &())
            .await
            .unwrap_err();
        assert!(lost.is_conn_lost(), "{lost:?}");
        let e = CallError::from(lost);
        assert!(matches!(e, CallError::HubLost { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("lost the connection to the hub"),
            "{e}"
        );
        // The hub's answer for a peer that left has the same code, and is not a lost hub
        // whatever its words.
        for gone in [
            crate::proto::peer_gone("bob", "x"),
            Status::unavailable("connection reset"),
        ] {
            assert!(crate::proto::is_peer_gone(&gone), "{gone:?}");
            let e = CallError::from(gone.clone());
            assert!(matches!(e, CallError::Status(_)), "{e:?}");
            assert_eq!(e.to_string(), gone.message());
        }
    }

    #[test]
    fn details_of_a_lost_hub_show_only_when_asked() {
        let io = std::io::Error::other("reset by peer");
        let reason = mux::CloseReason::Io(Arc::new(io));
        assert!(!lost_message("h:1", &reason, false).contains("detail"));
        let verbose = lost_message("h:1", &reason, true);
        assert!(verbose.contains("(detail: "), "{verbose}");
        assert_eq!(detail_if(false, "x"), "");
    }
}
