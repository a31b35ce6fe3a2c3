//! The client side: one connection to the hub, the exported service, and reconnection.
//!
//! [`establish`] turns any byte stream into a published [`Link`]: a client-side mux session,
//! the hello exchange, an [`rpc::Peer`] link that serves [`Export`] over the root to the hub
//! and gives the [`HubClient`], which has called `Hub.publish`, and a listener on
//! [`EXPORT_CHANNEL`] serving [`Export`] too (the hub reads files over channels it opens there). [`Peer`] keeps a link up:
//! when the session ends it says so and reconnects with exponential backoff and jitter,
//! re-publishing under the same name; commands issued meanwhile fail with "not connected".

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use netchan_mux::{self as mux, Session};
use netchan_rpc::{
    self as rpc, ByteBuf, CallOptions, Code, Context, ItemStream, ResponseStream, Status,
};
use rand::{Rng, SeedableRng};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::auth::{self, AuthError};
use crate::export::{Entry, ExportError, Listing, OpenFile, Root, CHUNK_SIZE};
use crate::proto::{
    Chunk, Export, HubClient, ListReq, PeerPath, PeerRead, PublishReq, ReadReq, DIGEST_LEN,
    EXPORT_CHANNEL, READER_KEY,
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
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    session: Session,
    /// What the hub said when it let us in.
    welcome: auth::Welcome,
    hub: HubClient,
    /// Both directions of rpc with the hub; the hub's `ls`/`stat` calls arrive here.
    _rpc: rpc::Peer,
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
                        why: crate::tls::explain_handshake(&opts.addr, &source),
                        source,
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

/// Runs the client half of the protocol over `io`: session, hello, export listener, publish.
/// Not bounded in time by itself (see [`connect`]).
pub(crate) async fn establish<T>(io: T, opts: &ClientOptions) -> Result<Link, ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let session = Session::client(io, opts.mux.clone());
    let hello = async {
        let mut hello = session.dial(auth::CHANNEL).await?;
        let welcome = auth::client_hello(&mut hello, opts.token.as_deref()).await?;
        Ok::<_, ConnectError>((hello, welcome))
    };
    let (mut hello, welcome) = match hello.await {
        Ok(hello) => hello,
        Err(e) => return Err(tls_refusal(&session, &opts.addr).await.unwrap_or(e)),
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
    let hub = HubClient::new(link.client().clone());
    hub.publish(PublishReq {
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
    Ok(Link {
        session,
        welcome,
        hub,
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

/// The rpc server of [`Export`] over `root`, for the peer link and the reads channels.
pub(crate) fn export_server(root: Root) -> rpc::Server {
    // The hub forwards at most --max-reads-per-peer calls at once; this is a backstop.
    let mut server = rpc::Server::with_config(rpc::Config::default().max_in_flight(64));
    server.add(ExportService { root }.into_service());
    server
}

/// Serves [`Export`] on every channel the hub opens to [`EXPORT_CHANNEL`].
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

/// The exported service: read-only access to the root (see [`crate::export`]).
pub(crate) struct ExportService {
    /// The confined root.
    pub(crate) root: Root,
}

/// Who is calling, as the hub names the reader (`a peer` when it does not say).
fn reader_of(ctx: &Context) -> String {
    ctx.metadata()
        .get(READER_KEY)
        .map_or_else(|| "a peer".to_owned(), |r| format!("{r:?}"))
}

/// How [`ExportService::read`] walks one file: hash the prefix before `offset` (for a
/// resumed read, so that the final digest covers the whole file), then one chunk per poll.
struct ReadState {
    file: OpenFile,
    offset: u64,
    start: u64,
    hasher: Option<ring::digest::Context>,
    done: bool,
}

impl ReadState {
    /// The next chunk, on the blocking pool: reads, hashes and, at the end, checks that the
    /// file is still the version it was when opened.
    async fn step(&mut self) -> Result<Chunk, ExportError> {
        let (offset, start) = (self.offset, self.start);
        let mut hasher = self.hasher.take().unwrap_or_else(new_hasher);
        let (chunk, hasher) = self
            .file
            .blocking(move |f| {
                let v = f.version();
                if offset == start && start > 0 {
                    hash_prefix(f, start.min(v.size), &mut hasher)?;
                }
                let changed = |detail: String| ExportError::Changed {
                    path: f.path().to_owned(),
                    detail,
                };
                let want = v.size.saturating_sub(offset).min(CHUNK_SIZE as u64) as usize;
                // Past the end a probe read still runs: it errors on an absurd offset and
                // tells a grown file from an unchanged one.
                let data = f.read_at(offset, want.max(usize::from(offset >= v.size)))?;
                if data.len() != want {
                    return Err(changed(format!(
                        "{} bytes at offset {offset} where {want} were expected",
                        data.len()
                    )));
                }
                hasher.update(&data);
                let eof = offset.saturating_add(want as u64) >= v.size;
                let sha256 = if eof {
                    f.check_unchanged()?;
                    ByteBuf::from(hasher.clone().finish().as_ref().to_vec())
                } else {
                    ByteBuf::default()
                };
                let chunk = Chunk {
                    size: v.size,
                    offset,
                    data: ByteBuf::from(data),
                    eof,
                    mtime: v.mtime.0,
                    mtime_nanos: v.mtime.1,
                    mode: v.mode,
                    sha256,
                };
                Ok((chunk, hasher))
            })
            .await?;
        self.hasher = Some(hasher);
        self.offset = offset.saturating_add(chunk.data.len() as u64);
        self.done = chunk.eof;
        Ok(chunk)
    }
}

/// A fresh SHA-256 context.
pub(crate) fn new_hasher() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}

/// Feeds `[0, len)` of `f` into `hasher`, chunk by chunk.
fn hash_prefix(
    f: &OpenFile,
    len: u64,
    hasher: &mut ring::digest::Context,
) -> Result<(), ExportError> {
    let mut at = 0;
    // Bounded by `len`: every iteration advances by a full chunk or fails.
    while at < len {
        let want = (len - at).min(CHUNK_SIZE as u64) as usize;
        let data = f.read_at(at, want)?;
        if data.len() != want {
            return Err(ExportError::Changed {
                path: f.path().to_owned(),
                detail: "it shrank".to_owned(),
            });
        }
        hasher.update(&data);
        at += want as u64;
    }
    Ok(())
}

impl Export for ExportService {
    async fn ls(&self, ctx: Context, req: String) -> Result<Listing, Status> {
        self.root.log_access(
            &reader_of(&ctx),
            format_args!("listed /{}", req.trim_start_matches('/')),
        );
        Ok(self.root.list_async(req).await?)
    }

    async fn stat(&self, ctx: Context, req: String) -> Result<Entry, Status> {
        // The hub's own liveness probe carries no reader and is not an access.
        if ctx.metadata().get(READER_KEY).is_some() {
            self.root
                .log_access(&reader_of(&ctx), format_args!("looked up {req}"));
        }
        Ok(self.root.stat_async(req).await?)
    }

    async fn read(&self, ctx: Context, req: ReadReq) -> Result<ItemStream<Chunk>, Status> {
        let reader = reader_of(&ctx);
        let file = match self.root.open_file_async(req.path.clone()).await {
            Ok(file) => file,
            Err(e) => {
                self.root
                    .log_access(&reader, format_args!("was refused {}: {e}", req.path));
                return Err(e.into());
            }
        };
        let from = if req.offset > 0 {
            format!(" from byte {}", req.offset)
        } else {
            String::new()
        };
        self.root.log_access(
            &reader,
            format_args!("reads {} ({} bytes){from}", req.path, file.size()),
        );
        debug!(path = %req.path, size = file.size(), offset = req.offset, "serving read");
        let state = ReadState {
            file,
            offset: req.offset,
            start: req.offset,
            hasher: None,
            done: false,
        };
        // One chunk is read per poll, i.e. only when the hub's credit allows another item.
        let chunks = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            match st.step().await {
                Ok(chunk) => Some((Ok(chunk), st)),
                Err(e) => {
                    st.done = true;
                    Some((Err(Status::from(e)), st))
                }
            }
        });
        Ok(Box::pin(chunks))
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
         try again in a moment{}",
        detail_if_verbose(.detail)
    )]
    HubLost {
        /// What the rpc layer said (shown with -v or RUST_LOG).
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
            // The hub link itself failed mid-call (the hub marks a gone *peer* in the message).
            Code::Unavailable if !s.message().starts_with("peer gone") => CallError::HubLost {
                detail: s.message().to_owned(),
            },
            _ => CallError::Status(s),
        }
    }
}

/// Whether error details (the layers below a message) are shown: `-v`, or `RUST_LOG` set.
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Shows error details from now on (see [`VERBOSE`]).
pub(crate) fn set_verbose(yes: bool) {
    VERBOSE.store(yes, AtomicOrdering::Relaxed);
}

/// ` (detail: ...)` when verbose, else a pointer to `-v`.
pub(crate) fn detail_if_verbose(detail: &str) -> String {
    if VERBOSE.load(AtomicOrdering::Relaxed) {
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
        self.read_from(peer, path, 0, new_hasher()).await
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
        let inner = self.hub()?.read(req).await?;
        Ok(FileStream {
            inner,
            done: false,
            check: Verifier::resume(offset, prefix),
        })
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

/// The chunks of one file, checked as they come: in order, within the announced size, and at
/// the end complete and matching the exporter's SHA-256.
pub(crate) struct FileStream {
    inner: ResponseStream<Chunk>,
    done: bool,
    check: Verifier,
}

/// The reader's check of a streamed file.
pub(crate) struct Verifier {
    next_offset: u64,
    size: Option<u64>,
    hasher: Option<ring::digest::Context>,
}

impl Verifier {
    /// For a stream from `offset`, the first `offset` bytes already fed into `prefix`.
    pub(crate) fn resume(offset: u64, prefix: ring::digest::Context) -> Verifier {
        Verifier {
            next_offset: offset,
            size: None,
            hasher: Some(prefix),
        }
    }

    /// Checks `chunk` against what came before; on the last one, checks size and digest.
    pub(crate) fn verify(&mut self, chunk: &Chunk) -> Result<(), CallError> {
        let corrupt = |detail: String| CallError::Corrupt { detail };
        let size = *self.size.get_or_insert(chunk.size);
        if chunk.size != size {
            return Err(corrupt(format!(
                "the announced size changed from {size} to {} bytes mid-transfer",
                chunk.size
            )));
        }
        if chunk.offset != self.next_offset {
            return Err(corrupt(format!(
                "a chunk for byte {} arrived where byte {} was due",
                chunk.offset, self.next_offset
            )));
        }
        let end = chunk.offset.saturating_add(chunk.data.len() as u64);
        if end > size {
            return Err(corrupt(format!(
                "{end} bytes arrived of a file announced as {size} bytes"
            )));
        }
        self.next_offset = end;
        let hasher = self.hasher.get_or_insert_with(new_hasher);
        hasher.update(&chunk.data);
        if chunk.eof {
            if end != size {
                return Err(corrupt(format!(
                    "the transfer ended at byte {end} of {size}"
                )));
            }
            let got = hasher.clone().finish();
            if chunk.sha256.len() != DIGEST_LEN {
                return Err(corrupt("the exporter sent no SHA-256".to_owned()));
            }
            if got.as_ref() != &chunk.sha256[..] {
                return Err(corrupt(
                    "SHA-256 mismatch: the bytes received differ from the exporter's file"
                        .to_owned(),
                ));
            }
        }
        Ok(())
    }
}

impl FileStream {
    /// The next chunk, verified; `Ok(None)` after the last one. A stream that ends without
    /// its `eof` chunk is an error ([`CallError::CutShort`]); so is any mismatch
    /// ([`CallError::Corrupt`]). Cancel-safe.
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
                if let Err(e) = self.check.verify(&chunk) {
                    self.done = true;
                    return Err(e);
                }
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
                        notify(format!(
                            "cannot reach the hub at {} yet; still trying (is it running?){}",
                            opts.addr,
                            detail_if_verbose(&chain(&e))
                        ));
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        // Up before it is said, so that whatever shows the notice sees the link up.
        tx.send_replace(Some(Arc::new(link)));
        notify(format!(
            "reconnected to the hub at {}; published as {}",
            opts.addr, opts.name
        ));
    }
}

/// What the user is told when the session with the hub ends: a hub that shut down closed the
/// session gracefully, anything else is a loss.
pub(crate) fn lost_message(addr: &str, reason: &mux::CloseReason) -> String {
    match reason {
        mux::CloseReason::Peer => {
            format!("the hub at {addr} closed the connection (shutting down?); reconnecting")
        }
        mux::CloseReason::KeepaliveTimeout { after } => format!(
            "lost the hub at {addr}: it stopped answering for {}s; reconnecting in the \
             background{}",
            after.as_secs(),
            detail_if_verbose(&reason.to_string())
        ),
        other => format!(
            "lost the hub at {addr}: the connection broke; reconnecting in the background{}",
            detail_if_verbose(&other.to_string())
        ),
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
        assert_eq!(
            msg,
            "lost the hub at h:1: the connection broke; reconnecting in the background"
        );
        let msg = lost_message(
            "h:1",
            &mux::CloseReason::KeepaliveTimeout {
                after: Duration::from_millis(15_001),
            },
        );
        assert_eq!(
            msg,
            "lost the hub at h:1: it stopped answering for 15s; reconnecting in the background"
        );
    }

    /// Every item of `export`'s read of `path` from `offset`, called directly (no hub).
    async fn read_items(root: &Root, path: &str, offset: u64) -> Vec<Result<Chunk, Status>> {
        let export = ExportService { root: root.clone() };
        let req = ReadReq {
            path: path.into(),
            offset,
        };
        match export.read(Context::detached("Export.read"), req).await {
            Ok(s) => s.collect().await,
            Err(e) => vec![Err(e)],
        }
    }

    fn sha256(bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .to_vec()
    }

    #[tokio::test]
    async fn the_last_chunk_carries_the_whole_files_sha256_also_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 7).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for offset in [0, 5, CHUNK_SIZE as u64 * 2 + 7, 1 << 40] {
            let items = read_items(&root, "f", offset).await;
            let chunks: Vec<Chunk> = items.into_iter().map(Result::unwrap).collect();
            let last = chunks.last().unwrap();
            assert!(last.eof, "offset {offset}");
            assert_eq!(&last.sha256[..], &sha256(&data)[..], "offset {offset}");
            assert!(chunks[..chunks.len() - 1]
                .iter()
                .all(|c| !c.eof && c.sha256.is_empty()));
            // The reader, given the prefix, accepts it; with a wrong prefix it does not.
            let start = offset.min(data.len() as u64) as usize;
            let mut prefix = new_hasher();
            prefix.update(&data[..start]);
            let mut v = Verifier::resume(offset, prefix);
            let ok = chunks.iter().try_for_each(|c| v.verify(c));
            assert_eq!(
                ok.is_ok(),
                offset <= data.len() as u64,
                "offset {offset}: {ok:?}"
            );
            if offset > 0 && offset <= data.len() as u64 {
                let mut wrong = new_hasher();
                wrong.update(&vec![0xAA; start]);
                let mut v = Verifier::resume(offset, wrong);
                let err = chunks.iter().try_for_each(|c| v.verify(c)).unwrap_err();
                assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
            }
        }
    }

    #[test]
    fn the_reader_refuses_gaps_short_ends_and_bad_digests() {
        let chunk = |offset: u64, data: &[u8], eof: bool, digest: &[u8]| Chunk {
            size: 6,
            offset,
            data: ByteBuf::from(data.to_vec()),
            eof,
            sha256: ByteBuf::from(digest.to_vec()),
            ..Chunk::default()
        };
        let good = sha256(b"abcdef");
        let mut v = Verifier::resume(0, new_hasher());
        v.verify(&chunk(0, b"abc", false, &[])).unwrap();
        v.verify(&chunk(3, b"def", true, &good)).unwrap();
        let cases = [
            (
                vec![chunk(0, b"abc", false, &[]), chunk(4, b"ef", true, &good)],
                "where byte 3 was due",
            ),
            (vec![chunk(0, b"abc", true, &good)], "ended at byte 3 of 6"),
            (vec![chunk(0, b"abcdeX", true, &good)], "SHA-256 mismatch"),
            (vec![chunk(0, b"abcdef", true, &[])], "no SHA-256"),
            (vec![chunk(0, b"abcdefg", true, &good)], "announced as 6"),
        ];
        for (chunks, want) in cases {
            let mut v = Verifier::resume(0, new_hasher());
            let err = chunks.iter().try_for_each(|c| v.verify(c)).unwrap_err();
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
    }

    #[tokio::test]
    async fn a_file_that_changes_during_a_read_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; CHUNK_SIZE * 3]).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for change in ["grow", "shrink", "rewrite"] {
            std::fs::write(&path, vec![1u8; CHUNK_SIZE * 3]).unwrap();
            // An old mtime, so that the rewrite below moves it whatever the clock's grain.
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
                .unwrap();
            let export = ExportService { root: root.clone() };
            let req = ReadReq {
                path: "f".into(),
                offset: 0,
            };
            let mut s = export
                .read(Context::detached("Export.read"), req)
                .await
                .unwrap();
            s.next().await.unwrap().unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            match change {
                "grow" => f.set_len(CHUNK_SIZE as u64 * 4).unwrap(),
                "shrink" => f.set_len(CHUNK_SIZE as u64).unwrap(),
                _ => {
                    use std::os::unix::fs::FileExt;
                    // Same size, new content, a new mtime.
                    f.write_at(b"X", 0).unwrap();
                }
            }
            let rest: Vec<_> = s.collect().await;
            let err = rest
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{change}: no error"));
            assert_eq!(err.code(), Code::Aborted, "{change}: {err}");
            assert!(
                err.message().contains("changed while it was being read"),
                "{change}: {err}"
            );
        }
    }

    #[test]
    fn a_lost_hub_and_a_gone_peer_read_differently() {
        let e = CallError::from(Status::unavailable("connection reset"));
        assert!(
            e.to_string().starts_with("lost the connection to the hub"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("connection reset"),
            "detail only with -v: {e}"
        );
        let e = CallError::from(Status::unavailable("peer gone: \"bob\" disconnected (x)"));
        assert!(e.to_string().starts_with("peer gone"), "{e}");
    }
}
