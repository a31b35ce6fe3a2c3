//! The client side: one connection to the hub, the exported service, and reconnection.
//!
//! [`establish`] turns any byte stream into a published [`Link`]: a client-side mux session,
//! the hello exchange, a listener on [`EXPORT_CHANNEL`] serving [`Export`] over the root, and a
//! [`HubClient`] on [`HUB_CHANNEL`] that has called `Hub.publish`. [`Peer`] keeps a link up:
//! when the session ends it says so and reconnects with exponential backoff and jitter,
//! re-publishing under the same name; commands issued meanwhile fail with "not connected".

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use netchan_mux::{self as mux, Session};
use netchan_rpc::{
    self as rpc, ByteBuf, CallOptions, Code, Context, ItemStream, ResponseStream, Status,
};
use rand::{Rng, SeedableRng};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::auth::{self, AuthError};
use crate::export::{Entry, Listing, Root};
use crate::proto::{
    Chunk, Export, HubClient, ListReq, PeerPath, PeerRead, PublishReq, ReadReq, EXPORT_CHANNEL,
    HUB_CHANNEL,
};

/// How long connecting (TCP, TLS, hello, publish) may take as a whole.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline of unary calls to the hub (list, ls, stat).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the next chunk of a file (above the hub's own per-chunk bound).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Longest delay between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How a client reaches the hub and what it exports.
#[derive(Debug, Clone)]
pub(crate) struct ClientOptions {
    /// Name to publish.
    pub(crate) name: String,
    /// Exported directory.
    pub(crate) root: Root,
    /// Hub address (`host:port`).
    pub(crate) addr: String,
    /// Token for the hello exchange.
    pub(crate) token: Option<String>,
    /// TLS settings; `None` for plaintext.
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Session settings.
    pub(crate) mux: mux::Config,
}

/// Why connecting to the hub failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// No TCP connection.
    #[error("cannot connect to the hub at {addr}")]
    Tcp {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("tls handshake with the hub at {addr} failed")]
    Tls {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Everything together took longer than [`CONNECT_TIMEOUT`].
    #[error("connecting to the hub at {addr} timed out after {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The address.
        addr: String,
    },
    /// The mux session failed before publishing.
    #[error("session with the hub failed")]
    Mux(#[from] mux::Error),
    /// The hub refused the hello (token).
    #[error("the hub refused the connection")]
    Hello(#[from] AuthError),
    /// The hub refused the name.
    #[error("the hub refused the name {name:?}: {}", status.message())]
    Publish {
        /// The name.
        name: String,
        /// The hub's answer.
        status: Status,
    },
}

/// A published connection to the hub.
pub(crate) struct Link {
    session: Session,
    hub: HubClient,
    /// Serves the hub's calls to our export; aborted when the link is dropped.
    _export: JoinSet<()>,
}

/// Opens TCP (and TLS) to the hub and establishes a published [`Link`], all within
/// [`CONNECT_TIMEOUT`]. Cancel-safe (a half-made link is dropped).
pub(crate) async fn connect(opts: &ClientOptions) -> Result<Link, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(&opts.addr)
            .await
            .map_err(|source| ConnectError::Tcp {
                addr: opts.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &opts.tls {
            None => establish(tcp, opts).await,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ConnectError::Tls {
                        addr: opts.addr.clone(),
                        source: plaintext_hub_hint(source),
                    })?;
                establish(tls, opts).await
            }
        }
    })
    .await
    .map_err(|_| ConnectError::Timeout {
        addr: opts.addr.clone(),
    })?
}

/// A hub without TLS hangs up on a TLS handshake: say so instead of "eof".
fn plaintext_hub_hint(e: std::io::Error) -> std::io::Error {
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    if !matches!(e.kind(), UnexpectedEof | ConnectionReset) {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        format!("the hub hung up during the TLS handshake; it may be a plaintext hub ({e})"),
    )
}

/// Runs the client half of the protocol over `io`: session, hello, export listener, publish.
/// Not bounded in time by itself (see [`connect`]).
pub(crate) async fn establish<T>(io: T, opts: &ClientOptions) -> Result<Link, ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let session = Session::client(io, opts.mux.clone());
    let mut hello = session.dial(auth::CHANNEL).await?;
    auth::client_hello(&mut hello, opts.token.as_deref()).await?;
    drop(hello);
    // Listen before publishing: the hub dials back during Publish.
    let exports = session.listen(EXPORT_CHANNEL)?;
    let mut export_tasks = JoinSet::new();
    export_tasks.spawn(
        serve_exports(exports, opts.root.clone()).instrument(tracing::debug_span!("export")),
    );
    let hub = HubClient::new(rpc::Client::new(session.dial(HUB_CHANNEL).await?));
    hub.publish(PublishReq {
        name: opts.name.clone(),
    })
    .await
    .map_err(|status| ConnectError::Publish {
        name: opts.name.clone(),
        status,
    })?;
    Ok(Link {
        session,
        hub,
        _export: export_tasks,
    })
}

/// Serves [`Export`] on every channel the hub opens to [`EXPORT_CHANNEL`].
async fn serve_exports(mut listener: mux::Listener, root: Root) {
    // The hub forwards at most --max-reads-per-peer calls at once; this is a backstop.
    let mut server = rpc::Server::with_config(rpc::Config::default().max_in_flight(64));
    server.add(ExportService { root }.into_service());
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

/// The exported service: read-only access to the root (see [`crate::export`]).
pub(crate) struct ExportService {
    /// The confined root.
    pub(crate) root: Root,
}

impl Export for ExportService {
    async fn ls(&self, _ctx: Context, req: String) -> Result<Listing, Status> {
        Ok(self.root.list_async(req).await?)
    }

    async fn stat(&self, _ctx: Context, req: String) -> Result<Entry, Status> {
        Ok(self.root.stat_async(req).await?)
    }

    async fn read(&self, _ctx: Context, req: ReadReq) -> Result<ItemStream<Chunk>, Status> {
        let file = self.root.open_file_async(req.path.clone()).await?;
        debug!(path = %req.path, size = file.size(), "serving read");
        let size = file.size();
        // One chunk is read per poll, i.e. only when the hub's credit allows another item.
        let chunks = futures::stream::unfold(
            (file, req.offset, false),
            move |(file, offset, done)| async move {
                if done {
                    return None;
                }
                match file.read_chunk(offset).await {
                    Ok(data) => {
                        let eof = data.len() < crate::export::CHUNK_SIZE;
                        let next = offset.saturating_add(data.len() as u64);
                        let chunk = Chunk {
                            size,
                            offset,
                            data: ByteBuf::from(data),
                            eof,
                        };
                        Some((Ok(chunk), (file, next, eof)))
                    }
                    Err(e) => Some((Err(Status::from(e)), (file, offset, true))),
                }
            },
        );
        Ok(Box::pin(chunks))
    }
}

/// Why a command could not reach its result.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No link to the hub right now.
    #[error("not connected to the hub (reconnecting in the background)")]
    NotConnected,
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
}

impl From<Status> for CallError {
    fn from(s: Status) -> CallError {
        match s.code() {
            // The hub link itself failed mid-call (the hub marks a gone *peer* in the message).
            Code::Unavailable if !s.message().starts_with("peer gone") => CallError::Status(
                Status::unavailable(format!("lost the hub during the call: {}", s.message())),
            ),
            _ => CallError::Status(s),
        }
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
    #[cfg(test)]
    pub(crate) async fn stat(&self, peer: &str, path: &str) -> Result<Entry, CallError> {
        let req = PeerPath {
            peer: peer.to_owned(),
            path: path.to_owned(),
        };
        Ok(self.unary()?.stat(req).await?)
    }

    /// `Hub.read`: the file's chunks. Dropping the stream cancels the transfer.
    pub(crate) async fn read(&self, peer: &str, path: &str) -> Result<FileStream, CallError> {
        let req = PeerRead {
            peer: peer.to_owned(),
            path: path.to_owned(),
            offset: 0,
        };
        let inner = self.hub()?.read(req).await?;
        Ok(FileStream { inner, done: false })
    }

    /// Closes the link gracefully (the hub sees the departure at once), bounded in time.
    pub(crate) async fn close(&self) {
        self.supervisor.abort();
        let link = self.link.borrow().clone();
        if let Some(link) = link {
            let _ = tokio::time::timeout(Duration::from_secs(1), link.session.close()).await;
        }
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

/// The chunks of one file, checked for completeness.
pub(crate) struct FileStream {
    inner: ResponseStream<Chunk>,
    done: bool,
}

impl FileStream {
    /// The next chunk; `Ok(None)` after the last one. A stream that ends without its `eof`
    /// chunk is an error ([`CallError::CutShort`]). Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Option<Chunk>, CallError> {
        if self.done {
            return Ok(None);
        }
        let next = tokio::time::timeout(CHUNK_TIMEOUT, self.inner.next())
            .await
            .map_err(|_| {
                self.done = true;
                CallError::Stalled {
                    after: CHUNK_TIMEOUT,
                }
            })?;
        match next {
            Some(Ok(chunk)) => {
                self.done = chunk.eof;
                Ok(Some(chunk))
            }
            Some(Err(s)) => {
                self.done = true;
                Err(s.into())
            }
            None => {
                self.done = true;
                Err(CallError::CutShort)
            }
        }
    }
}

/// Keeps the link up: waits for the session to end, then reconnects with backoff.
async fn supervise(opts: ClientOptions, tx: watch::Sender<Option<Arc<Link>>>, notify: Notify) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    // Runs for the life of the client (aborted by `Peer`'s drop); each iteration waits for a
    // session to end, so it never spins.
    loop {
        let current = tx.borrow().clone();
        if let Some(link) = current {
            let reason = link.session.closed().await;
            tx.send_replace(None);
            drop(link);
            notify(lost_message(&opts.addr, &reason));
        }
        let mut attempt: u32 = 0;
        let link = loop {
            tokio::time::sleep(backoff(attempt, &mut rng)).await;
            match connect(&opts).await {
                Ok(link) => break link,
                Err(e) => {
                    // Say it on the first failure and then every 10th, not on every attempt.
                    if attempt % 10 == 0 {
                        notify(format!("reconnect failed: {}; retrying", chain(&e)));
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        notify(format!(
            "reconnected to the hub at {}; published as {}",
            opts.addr, opts.name
        ));
        tx.send_replace(Some(Arc::new(link)));
    }
}

/// What the user is told when the session with the hub ends: a hub that shut down closed the
/// session gracefully, anything else is a loss.
pub(crate) fn lost_message(addr: &str, reason: &mux::CloseReason) -> String {
    match reason {
        mux::CloseReason::Peer => {
            format!("the hub at {addr} closed the connection (shutting down?); reconnecting")
        }
        other => format!("lost the hub at {addr} ({other}); reconnecting"),
    }
}

/// `error: cause: cause` on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    // Bounded by the (finite) source chain.
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn jitter_spreads_clients_apart() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a: Vec<_> = (0..5).map(|_| backoff(5, &mut rng)).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]), "{a:?}");
    }

    #[test]
    fn a_hub_that_closed_the_session_reads_differently_from_a_lost_link() {
        let msg = lost_message("h:1", &mux::CloseReason::Peer);
        assert_eq!(
            msg,
            "the hub at h:1 closed the connection (shutting down?); reconnecting"
        );
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let msg = lost_message("h:1", &mux::CloseReason::Io(Arc::new(io)));
        assert!(
            msg.starts_with("lost the hub at h:1 (connection i/o error"),
            "{msg}"
        );
    }

    #[test]
    fn a_lost_hub_and_a_gone_peer_read_differently() {
        let e = CallError::from(Status::unavailable("connection reset"));
        assert!(e.to_string().starts_with("lost the hub"), "{e}");
        let e = CallError::from(Status::unavailable("peer gone: \"bob\" disconnected (x)"));
        assert!(e.to_string().starts_with("peer gone"), "{e}");
    }
}
