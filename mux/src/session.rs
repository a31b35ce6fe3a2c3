//! The `Session` handle, its builder, and the dialing side of the channel-open handshake.

use netchan_mux_proto::OpenError;

use crate::{
    channel::Conn,
    config::Config,
    driver::{Driver, OnInbound},
    error::{CloseReason, Error},
    handshake,
    io::transport::{self, LinkRead, LinkWrite},
    listener::{self, Listener},
    shared::{HandleToken, ListenerEntry, Shared, StreamHandle},
    stream::RawStream,
};
use std::{
    fmt,
    marker::PhantomData,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tracing::Instrument;

pub use crate::shared::Mode;

/// A handle to one multiplexed session over a byte stream.
///
/// Cheap to clone (all clones drive the same session). Whichever side opened the underlying
/// connection, either side can [`listen`](Session::listen) and [`dial`](Session::dial). The
/// session runs in a driver task spawned by [`Session::new`] (or
/// [`SessionBuilder::start`]); it ends when [`close`](Session::close) is called, the peer
/// closes it, the link fails or keepalive gives up, or when every `Session`, [`Listener`] and
/// [`Conn`] of it has been dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
    token: Arc<HandleToken>,
}

/// Sets a session up before it processes anything from the peer, so that listeners are in
/// place before the first inbound channel can arrive (no listen race). Created by
/// [`Session::builder`]; nothing is read from or written to the link until
/// [`start`](SessionBuilder::start). Dropping it unstarted ends the session (its listeners
/// then report [`Error::SessionClosed`]).
///
/// ```
/// use netchan_mux::{Config, Mode, Session};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), netchan_mux::Error> {
/// let (a, b) = tokio::io::duplex(64 * 1024);
/// let builder = Session::builder(b, Mode::Server, Config::default());
/// let mut hello = builder.listen("hello")?;
/// let server = builder.start();
///
/// let client = Session::client(a, Config::default());
/// let dialed = client.dial("hello").await?; // never NoListener: "hello" was there first
/// let accepted = hello.accept().await?;
/// assert_eq!(accepted.name(), "hello");
/// # drop((dialed, server));
/// # Ok(())
/// # }
/// ```
pub struct SessionBuilder<T> {
    session: Session,
    driver: Option<Driver>,
    _io: PhantomData<fn() -> T>,
}

impl<T> SessionBuilder<T>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Registers a listener before the session starts; see [`Session::listen`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] or [`Error::NameInUse`].
    pub fn listen(&self, name: &str) -> Result<Listener, Error> {
        self.session.listen(name)
    }

    /// The session's handle (usable before `start`: dials wait until the session runs).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Lets the session explain a failed link: when the byte stream ends without the peer
    /// closing the session, or fails ([`CloseReason::Io`]), `explain` gets that reason and
    /// the session ends with the one its future yields. For a peer whose vanishing has a
    /// better account elsewhere: a child process's exit status, say. The future should be
    /// bounded (channels see the end only once it resolves).
    #[must_use]
    pub fn explain_end<F, Fut>(mut self, explain: F) -> Self
    where
        F: FnOnce(CloseReason) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = CloseReason> + Send + 'static,
    {
        if let Some(driver) = &mut self.driver {
            driver.set_explain(Box::new(move |reason| Box::pin(explain(reason))));
        }
        self
    }

    /// Starts the session: spawns its driver task on the current tokio runtime (tracked by the
    /// session: [`Session::closed`] resolves only once it has returned).
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    pub fn start(mut self) -> Session {
        if let Some(driver) = self.driver.take() {
            let shared = &self.session.shared;
            // The runtime the driver runs on (see `Link::wake_after_body`).
            let flavour = tokio::runtime::Handle::current().runtime_flavor();
            shared
                .link
                .set_multi_thread(flavour == tokio::runtime::RuntimeFlavor::MultiThread);
            let span = tracing::info_span!("session", id = shared.id, mode = ?shared.mode);
            shared.tasks.spawn(driver.run().instrument(span));
        }
        self.session.clone()
    }
}

impl<T> Drop for SessionBuilder<T> {
    fn drop(&mut self) {
        if self.driver.take().is_some() {
            self.session.shared.finish(CloseReason::Local);
        }
    }
}

impl<T> fmt::Debug for SessionBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("session", &self.session)
            .finish()
    }
}

impl Session {
    /// Starts a session over `io` and spawns its driver task on the current tokio runtime.
    ///
    /// The two ends of the link must pass different [`Mode`]s. To register listeners before
    /// the peer's first channel can arrive, use [`Session::builder`].
    ///
    /// A [`tokio::net::TcpStream`] or [`tokio::net::UnixStream`] is read and written at the
    /// same time (split into its owned halves). Any other `io`, such as a TLS stream, is split
    /// with [`tokio::io::split`], whose halves share a lock: there the session's reads wait
    /// for a write in progress, and its writes for a read.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (it spawns the driver task).
    pub fn new<T>(io: T, mode: Mode, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Session::builder(io, mode, config).start()
    }

    /// Prepares a session over `io` without starting it; see [`SessionBuilder`].
    pub fn builder<T>(io: T, mode: Mode, config: Config) -> SessionBuilder<T>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = transport::split(io);
        Session::build(read, write, false, mode, config)
    }

    /// Starts a session over a unix stream socket that also passes file descriptors: a
    /// [`Conn`] of it can send open files, sockets or memfds to the peer with its bytes
    /// ([`Conn::send_fds`], [`Conn::take_fds`]). Both ends must use it (or another
    /// implementation of the same extension, docs/protocol.md "File descriptors"); with a
    /// peer that does not, the session works as usual and sending fds fails with
    /// [`Error::FdsUnsupported`].
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime (it spawns the driver task).
    ///
    /// ```
    /// use std::os::fd::AsFd;
    /// use netchan_mux::{Config, Mode, Session};
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = tokio::net::UnixStream::pair()?;
    /// let builder = Session::builder_with_fds(b, Mode::Server, Config::default());
    /// let mut files = builder.listen("files")?;
    /// let _server = builder.start();
    /// let client = Session::with_fds(a, Mode::Client, Config::default());
    ///
    /// let mut sender = client.dial("files").await?;
    /// let mut receiver = files.accept().await?;
    ///
    /// let (mine, _keep) = std::os::unix::net::UnixStream::pair()?;
    /// sender.send_fds(&[mine.as_fd()])?;
    /// sender.write_all(b"here").await?;
    ///
    /// let mut buf = [0u8; 4];
    /// receiver.read_exact(&mut buf).await?;
    /// let fds = receiver.take_fds();
    /// assert_eq!(fds.len(), 1); // a new descriptor for the same socket
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(unix)]
    pub fn with_fds(stream: tokio::net::UnixStream, mode: Mode, config: Config) -> Session {
        Session::builder_with_fds(stream, mode, config).start()
    }

    /// Prepares a session like [`Session::with_fds`] without starting it; see
    /// [`SessionBuilder`].
    #[cfg(unix)]
    pub fn builder_with_fds(
        stream: tokio::net::UnixStream,
        mode: Mode,
        config: Config,
    ) -> SessionBuilder<tokio::net::UnixStream> {
        use crate::io::transport::unix::{UnixRead, UnixWrite};
        let (read, write) = stream.into_split();
        Session::build(
            Box::new(UnixRead::new(read)),
            Box::new(UnixWrite::new(write)),
            true,
            mode,
            config,
        )
    }

    fn build<T>(
        read: Box<dyn LinkRead>,
        write: Box<dyn LinkWrite>,
        fds: bool,
        mode: Mode,
        config: Config,
    ) -> SessionBuilder<T> {
        let shared = Arc::new(Shared::new(config, mode, read, write, fds));
        let on_last_drop = {
            let shared = shared.clone();
            Arc::new(move || {
                // Every handle, listener and channel is gone: nobody can use the session.
                tracing::debug!("all handles dropped");
                shared.set_closing();
            })
        };
        let token = Arc::new(HandleToken::new(on_last_drop));
        let weak = Arc::downgrade(&token);
        let on_inbound: OnInbound = Arc::new(move |stream| listener::on_inbound(stream, &weak));
        let driver = Driver::new(shared.clone(), on_inbound);
        SessionBuilder {
            session: Session { shared, token },
            driver: Some(driver),
            _io: PhantomData,
        }
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

    /// Registers `name`; channels the peer dials to it are yielded by the returned [`Listener`].
    /// Dropping the listener frees the name (later dials get [`Error::NoListener`]).
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
        Ok(Listener::new(
            name,
            id,
            rx,
            self.shared.clone(),
            self.token.clone(),
        ))
    }

    /// Opens a channel to the peer's listener `name`; resolves once the peer has accepted it.
    ///
    /// Bytes written to the returned [`Conn`] right away are delivered in order. Fails promptly
    /// with [`Error::NoListener`] if the peer has no listener for `name`, with
    /// [`Error::TooManyChannels`] if this session is at [`Config::max_channels`], with
    /// [`Error::HandshakeTimeout`] if the peer does not answer within
    /// [`Config::handshake_timeout`], and with [`Error::SessionClosed`] once the session ends
    /// or the peer has said it accepts no new channels (GoAway).
    ///
    /// Not cancel-safe in the sense that a dropped dial abandons the channel (the peer sees it
    /// closed); nothing else is affected.
    pub async fn dial(&self, name: &str) -> Result<Conn, Error> {
        handshake::validate_name(name)?;
        self.check_usable()?;
        let slot = self
            .shared
            .try_channel_slot()
            .ok_or(Error::TooManyChannels {
                limit: self.shared.config.channel_limit(),
            })?;
        let io = open_stream(&self.shared, name).await?;
        tracing::debug!(name, "dialed");
        Ok(Conn::new(
            name.into(),
            io,
            Some(slot),
            Some(self.token.clone()),
        ))
    }

    /// Like [`dial`](Session::dial), but a [`Error::NoListener`] answer is retried until the
    /// peer listens on `name` or `wait` has passed (then the last `NoListener` is returned).
    /// For a peer that registers its listener after connecting (a callback channel). Retries
    /// start 5 ms apart and back off to 200 ms.
    ///
    /// Not cancel-safe in the same sense as `dial`.
    pub async fn dial_waiting(&self, name: &str, wait: Duration) -> Result<Conn, Error> {
        let deadline = tokio::time::Instant::now().checked_add(wait);
        let mut pause = Duration::from_millis(5);
        // Bounded: every pass waits at least `pause` and the deadline ends the loop.
        loop {
            match self.dial(name).await {
                Err(Error::NoListener { name }) => {
                    let now = tokio::time::Instant::now();
                    let next = now + pause;
                    if deadline.is_some_and(|d| next > d) {
                        return Err(Error::NoListener { name });
                    }
                    tokio::time::sleep_until(next).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// Closes the session gracefully and resolves once it has ended: the peer is told at once
    /// (yamux GoAway) and new channels are refused in both directions, open ones may finish
    /// within [`Config::close_grace`], then the session ends (channels still open are cut and
    /// report [`Error::SessionClosed`]). When it resolves, every task of the session (its
    /// driver, the handshakes of inbound channels) has returned.
    ///
    /// Cancel-safe: the close proceeds even if this future is dropped.
    pub async fn close(&self) {
        self.shared.set_closing();
        self.closed().await;
    }

    /// Resolves with why the session ended; any number of callers, at any time (also long after
    /// the end). It resolves once every task of the session (its driver, the handshakes of
    /// inbound channels) has returned: they end with the session, so this waits only for them
    /// to notice. Cancel-safe.
    pub async fn closed(&self) -> CloseReason {
        self.shared.ended.cancelled().await;
        self.shared.tasks.wait().await;
        self.shared.reason().unwrap_or(CloseReason::Local)
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.is_cancelled()
    }

    /// Bytes received on this session's channels and not yet read by their users (at most
    /// [`Config::worst_case_buffered`]).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.core().buffered()
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

/// Opens a yamux stream and runs the dialer's side of the handshake on it, all within the
/// handshake timeout.
async fn open_stream(shared: &Arc<Shared>, name: &str) -> Result<RawStream, Error> {
    let timeout = shared.config.handshake_timeout;
    let attempt = async {
        // Bounds handshakes in flight, so a well-behaved peer never has to reset ours.
        let _permit = shared
            .dial_slots
            .acquire()
            .await
            .map_err(|_| shared.closed_error())?;
        let opened = shared.core().open();
        let id = opened.map_err(|e| match e {
            OpenError::GoAway => Error::SessionClosed(CloseReason::Peer),
            OpenError::Closing => Error::SessionClosed(CloseReason::Local),
            OpenError::TooMany | OpenError::IdsExhausted => Error::TooManyChannels {
                limit: shared.config.channel_limit(),
            },
            OpenError::Ended => shared.closed_error(),
        })?;
        let mut io = RawStream::new(StreamHandle {
            id,
            shared: shared.clone(),
        });
        io.set_name(name.into());
        io.write_all(&handshake::encode_request(name)).await?;
        match handshake::read_reply(&mut io, name).await {
            Ok(()) => Ok::<_, Error>(io),
            Err(e) => {
                io.reset();
                Err(e)
            }
        }
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
            None if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
            {
                Error::Refused {
                    name: name.to_owned(),
                    reason: "peer closed the channel without answering".to_owned(),
                }
            }
            None => Error::Io(e),
        },
        e => e,
    })
}
