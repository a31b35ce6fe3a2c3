//! The `Session` handle and the state it shares with its driver, channels and listeners.

use crate::{
    channel::Conn,
    config::Config,
    driver::{Command, Driver},
    error::{CloseReason, Error},
    handshake,
    listener::Listener,
};
use futures::task::AtomicWaker;
use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot, Semaphore},
};
use tokio_util::{
    compat::{Compat, FuturesAsyncReadCompatExt},
    sync::CancellationToken,
};
use tracing::Instrument;

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Which end of the link a session is. The two ends of one link must use different modes
/// (yamux allocates odd stream ids to the client and even ones to the server). By convention
/// the side that opened the underlying connection is the [`Mode::Client`]. The mode does not
/// restrict anything else: both ends can listen and dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The end that opened the underlying connection.
    Client,
    /// The end that accepted the underlying connection.
    Server,
}

impl From<Mode> for yamux::Mode {
    fn from(mode: Mode) -> yamux::Mode {
        match mode {
            Mode::Client => yamux::Mode::Client,
            Mode::Server => yamux::Mode::Server,
        }
    }
}

/// A handle to one multiplexed session over a byte stream.
///
/// Cheap to clone (all clones drive the same session). Whichever side opened the underlying
/// connection, either side can [`listen`](Session::listen) and [`dial`](Session::dial). The
/// session runs in a driver task spawned by [`Session::new`]; it ends when
/// [`close`](Session::close) is called, the peer closes it, the link fails or keepalive gives
/// up, or when every `Session`, [`Listener`] and [`Conn`] of it has been dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl Session {
    /// Starts a session over `io` and spawns its driver task on the current tokio runtime.
    ///
    /// The two ends of the link must pass different [`Mode`]s.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (it spawns the driver task).
    pub fn new<T>(io: T, mode: Mode, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = Arc::new(Shared::new(config, mode));
        // Bound: every queued `Open` holds one of `pending_limit` dial permits; the slack covers
        // internal keepalive opens.
        let (commands, receiver) = mpsc::channel(shared.config.pending_limit() + 4);
        let span = tracing::info_span!("session", id = shared.id, ?mode);
        let driver = Driver::new(io, mode, shared.clone(), receiver, commands.downgrade());
        tokio::spawn(driver.run().instrument(span));
        Session { shared, commands }
    }

    /// Starts the [`Mode::Client`] end of a session: `Session::new(io, Mode::Client, config)`.
    pub fn client<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Session::new(io, Mode::Client, config)
    }

    /// Starts the [`Mode::Server`] end of a session: `Session::new(io, Mode::Server, config)`.
    pub fn server<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Session::new(io, Mode::Server, config)
    }

    /// Rebuilds a handle from the driver's weak sender (`None` once every handle is gone).
    pub(crate) fn from_parts(shared: Arc<Shared>, commands: mpsc::Sender<Command>) -> Session {
        Session { shared, commands }
    }

    /// Registers `name`; channels the peer dials to it are yielded by the returned [`Listener`].
    /// Dropping the listener frees the name (later dials get
    /// [`Error::NoListener`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::NameInUse`], or [`Error::SessionClosed`] if the session
    /// is closing or has ended.
    pub fn listen(&self, name: &str) -> Result<Listener, Error> {
        handshake::validate_name(name)?;
        self.check_usable()?;
        let (tx, rx) = mpsc::channel(self.shared.config.backlog());
        let id = self.shared.next_listener_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut listeners = self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if listeners.contains_key(name) {
                return Err(Error::NameInUse {
                    name: name.to_owned(),
                });
            }
            listeners.insert(name.to_owned(), ListenerEntry { id, sender: tx });
        }
        tracing::debug!(name, "listening");
        Ok(Listener::new(name, id, rx, self.clone()))
    }

    /// Opens a channel to the peer's listener `name`; resolves once the peer has accepted it.
    ///
    /// Bytes written to the returned [`Conn`] right away are delivered in order. Fails promptly
    /// with [`Error::NoListener`] if the peer has no listener for `name`, with
    /// [`Error::TooManyChannels`] if this session is at [`Config::max_channels`], with
    /// [`Error::HandshakeTimeout`] if the peer does not answer within
    /// [`Config::handshake_timeout`], and with [`Error::SessionClosed`] once the session ends.
    ///
    /// Not cancel-safe in the sense that a dropped dial abandons the channel (the peer sees it
    /// reset); nothing else is affected.
    pub async fn dial(&self, name: &str) -> Result<Conn, Error> {
        handshake::validate_name(name)?;
        self.check_usable()?;
        let slot = self
            .shared
            .try_channel_slot()
            .ok_or(Error::TooManyChannels {
                limit: self.shared.config.channel_limit(),
            })?;
        let io = open_stream(&self.shared, &self.commands, name).await?;
        tracing::debug!(name, "dialed");
        Ok(Conn::new(
            name,
            io,
            Some(slot),
            self.shared.clone(),
            Some(self.clone()),
        ))
    }

    /// Closes the session gracefully and resolves once it has ended: new channels are refused
    /// at once, open ones may finish within [`Config::close_grace`], then the session ends
    /// (channels still open are cut and report [`Error::SessionClosed`]).
    ///
    /// Cancel-safe: the close proceeds even if this future is dropped.
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.driver_waker.wake();
        self.closed().await;
    }

    /// Resolves with why the session ended; any number of callers, at any time (also long after
    /// the end). Cancel-safe.
    pub async fn closed(&self) -> CloseReason {
        self.shared.ended.cancelled().await;
        self.shared.reason().unwrap_or(CloseReason::Local)
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.is_cancelled()
    }

    fn check_usable(&self) -> Result<(), Error> {
        if let Some(reason) = self.shared.ended_reason() {
            return Err(Error::SessionClosed(reason));
        }
        if self.shared.is_closing() {
            return Err(Error::SessionClosed(CloseReason::Local));
        }
        Ok(())
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.id)
            .field("mode", &self.shared.mode)
            .field("open_channels", &self.shared.open_channels())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Opens a yamux stream through the driver and runs the dialer's side of the handshake, all
/// within the handshake timeout. Used for user dials and internal (keepalive) channels.
pub(crate) async fn open_stream(
    shared: &Arc<Shared>,
    commands: &mpsc::Sender<Command>,
    name: &str,
) -> Result<Compat<yamux::Stream>, Error> {
    let timeout = shared.config.handshake_timeout;
    let attempt = async {
        // Bounds handshakes in flight, so a well-behaved peer never has to reset ours.
        let _permit = shared
            .dial_slots
            .acquire()
            .await
            .map_err(|_| shared.closed_error())?;
        let (reply, rx) = oneshot::channel();
        commands
            .send(Command::Open { reply })
            .await
            .map_err(|_| shared.closed_error())?;
        let stream = rx.await.map_err(|_| shared.closed_error())??;
        let mut io = stream.compat();
        io.write_all(&handshake::encode_request(name)).await?;
        io.flush().await?;
        handshake::read_reply(&mut io, name).await?;
        Ok::<_, Error>(io)
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, attempt) => r.unwrap_or_else(|_| {
            Err(Error::HandshakeTimeout { name: name.to_owned(), after: timeout })
        }),
        _ = shared.ended.cancelled() => Err(shared.closed_error()),
    };
    result.map_err(|e| match e {
        // An i/o error while the session is going down is the session's end, reported as such.
        Error::Io(e) => match shared.reason() {
            Some(reason) => Error::SessionClosed(reason),
            None if e.kind() == std::io::ErrorKind::UnexpectedEof => Error::Refused {
                name: name.to_owned(),
                reason: "peer closed the channel without answering".to_owned(),
            },
            None => Error::Io(e),
        },
        e => e,
    })
}

/// A registered listener: where accepted channels for its name go.
pub(crate) struct ListenerEntry {
    /// Tells a stale removal (from an old listener of the same name) from the current one.
    pub(crate) id: u64,
    pub(crate) sender: mpsc::Sender<Conn>,
}

/// State shared by the driver, the handles, the channels and the listeners of one session.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) mode: Mode,
    pub(crate) config: Config,
    pub(crate) listeners: Mutex<HashMap<String, ListenerEntry>>,
    pub(crate) next_listener_id: AtomicU64,
    /// Open channels in both directions, dials in flight included (see [`ChannelSlot`]).
    open_channels: AtomicUsize,
    /// Set by `close()`: refuse new channels, end once the open ones are done.
    closing: AtomicBool,
    /// Why the session ended; the first reason recorded wins.
    reason: OnceLock<CloseReason>,
    /// Cancelled once the session has ended (after `reason` is set).
    pub(crate) ended: CancellationToken,
    /// Wakes the driver (close requested, last channel gone while closing).
    pub(crate) driver_waker: AtomicWaker,
    /// Permits for our dials whose handshake is in flight.
    pub(crate) dial_slots: Semaphore,
    /// Permits for inbound handshakes being served.
    pub(crate) inbound_slots: Arc<Semaphore>,
    /// Whether the peer's keepalive channel is being served (at most one at a time).
    pub(crate) keepalive_echo_active: AtomicBool,
    /// Milliseconds since `epoch` at which the last bytes arrived from the peer.
    last_read_ms: AtomicU64,
    epoch: tokio::time::Instant,
}

impl Shared {
    fn new(config: Config, mode: Mode) -> Shared {
        let pending = config.pending_limit();
        Shared {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            mode,
            config,
            listeners: Mutex::new(HashMap::new()),
            next_listener_id: AtomicU64::new(1),
            open_channels: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reason: OnceLock::new(),
            ended: CancellationToken::new(),
            driver_waker: AtomicWaker::new(),
            dial_slots: Semaphore::new(pending),
            inbound_slots: Arc::new(Semaphore::new(pending)),
            keepalive_echo_active: AtomicBool::new(false),
            last_read_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub(crate) fn open_channels(&self) -> usize {
        self.open_channels.load(Ordering::SeqCst)
    }

    /// Takes one of `max_channels` slots, or `None` if all are taken.
    pub(crate) fn try_channel_slot(self: &Arc<Self>) -> Option<ChannelSlot> {
        let limit = self.config.channel_limit();
        self.open_channels
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot {
                shared: self.clone(),
            })
    }

    /// The recorded reason, whether or not the driver has finished ending the session.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason.get().cloned()
    }

    /// The reason, once the session has fully ended.
    pub(crate) fn ended_reason(&self) -> Option<CloseReason> {
        if self.ended.is_cancelled() {
            Some(self.reason().unwrap_or(CloseReason::Local))
        } else {
            None
        }
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::SessionClosed(self.reason().unwrap_or(CloseReason::Local))
    }

    /// Records why the link failed, before yamux wakes the channels with the news (so they can
    /// report it). The first reason recorded wins.
    pub(crate) fn record_reason(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
    }

    /// Ends the session: records `reason` (unless one is already recorded), drops every
    /// listener registration and wakes everything waiting on the session. Returns the reason
    /// that stands.
    pub(crate) fn finish(&self, reason: CloseReason) -> CloseReason {
        let _ = self.reason.set(reason);
        self.closing.store(true, Ordering::SeqCst);
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.dial_slots.close();
        self.inbound_slots.close();
        self.ended.cancel();
        self.reason().unwrap_or(CloseReason::Local)
    }

    pub(crate) fn listener_sender(&self, name: &str) -> Option<mpsc::Sender<Conn>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.get(name).map(|entry| entry.sender.clone())
    }

    pub(crate) fn remove_listener(&self, name: &str, id: u64) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if listeners.get(name).is_some_and(|entry| entry.id == id) {
            listeners.remove(name);
        }
    }

    /// Notes that bytes just arrived from the peer (keepalive liveness).
    pub(crate) fn stamp_read(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_read_ms.store(ms, Ordering::Relaxed);
    }

    /// When bytes last arrived from the peer (the session start if none yet).
    pub(crate) fn last_read(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed))
    }
}

/// One of the session's `max_channels` slots, held by an open channel (or a dial in flight)
/// and released when dropped.
pub(crate) struct ChannelSlot {
    shared: Arc<Shared>,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.shared.open_channels.fetch_sub(1, Ordering::SeqCst);
        if self.shared.is_closing() {
            // A graceful close waits for the last channel to go.
            self.shared.driver_waker.wake();
        }
    }
}
