//! [`bind`] and [`Listener`]: an address to a stream of server [`Session`]s.

use std::{
    io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};

use super::{connect::abstract_path, AcceptError, Addr, BindError, IntoAddr};
use crate::mux::{self, Session};

fn start<T>(io: T, config: mux::Config, setup: Option<&super::gate::OnSession>) -> Session
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    super::gate::start(io, mux::Mode::Server, config, setup)
}

fn start_unix(
    io: tokio::net::UnixStream,
    config: mux::Config,
    setup: Option<&super::gate::OnSession>,
) -> Session {
    super::gate::start_unix(io, mux::Mode::Server, config, setup)
}

/// How [`bind`] listens. `BindOptions::default()` suits TCP and Unix sockets.
#[derive(Clone, Debug)]
pub struct BindOptions {
    mux: mux::Config,
    handshake_timeout: Duration,
    backlog: usize,
    on_session: Option<super::gate::OnSession>,
    #[cfg(feature = "tls")]
    tls: Option<super::TlsServer>,
}

impl Default for BindOptions {
    fn default() -> BindOptions {
        BindOptions {
            mux: mux::Config::default(),
            handshake_timeout: Duration::from_secs(10),
            backlog: 32,
            on_session: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl BindOptions {
    /// Every accepted session's configuration. Default: `mux::Config::default()`.
    pub fn mux(mut self, config: mux::Config) -> BindOptions {
        self.mux = config;
        self
    }

    /// The longest an incoming connection's TLS handshake may take; a client that stalls is
    /// dropped and reported as [`TlsError::HandshakeTimeout`](super::TlsError). Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> BindOptions {
        self.handshake_timeout = timeout;
        self
    }

    /// How many ready sessions (and accept errors) wait for [`Listener::accept`]; when they
    /// are all unclaimed the listener stops accepting, and further connections wait in the
    /// kernel's backlog. At most as many TLS handshakes run at once. Default: 32 (at least 1).
    pub fn backlog(mut self, n: usize) -> BindOptions {
        self.backlog = n.max(1);
        self
    }

    /// Runs `setup` on each new session before the session reads anything from the peer:
    /// the place to [`listen`](crate::mux::Session::listen) on the names the peer will dial,
    /// so that no dial arrives before its listener. Keep it short (it cannot await); spawn
    /// the tasks that serve the listeners. Default: none.
    pub fn on_session(mut self, setup: impl Fn(&Session) + Send + Sync + 'static) -> BindOptions {
        self.on_session = Some(super::gate::OnSession(std::sync::Arc::new(setup)));
        self
    }

    /// TLS for a `tls://` address (required there, refused elsewhere). Default: none.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: super::TlsServer) -> BindOptions {
        self.tls = Some(tls);
        self
    }
}

/// Server sessions from a bound address: [`accept`](Listener::accept) them one by one, or use
/// the listener as a [`Stream`].
///
/// A task owned by the listener accepts connections, runs their TLS handshakes (each bounded by
/// [`BindOptions::handshake_timeout`]) and queues the sessions; dropping the listener stops it
/// and drops the sessions nobody took. For a Unix socket at a path, dropping the listener also
/// removes the socket file, if it is still the one this listener created.
pub struct Listener {
    ready: mpsc::Receiver<Result<Session, AcceptError>>,
    local: Addr,
    task: JoinHandle<()>,
    /// The socket file to remove on drop, with its inode to be sure it is still ours.
    socket_file: Option<(PathBuf, u64, u64)>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local", &self.local)
            .finish()
    }
}

impl Listener {
    /// The next session a peer connected, or why one connection failed.
    ///
    /// An `Err` concerns one connection: keep calling `accept`. Cancel-safe: a session is
    /// never lost to a dropped `accept` future.
    pub async fn accept(&mut self) -> Result<Session, AcceptError> {
        match self.ready.recv().await {
            Some(next) => next,
            // The task ends only when aborted by our drop, so this cannot happen while `self`
            // lives; answer with an error rather than a panic all the same.
            None => Err(AcceptError::Io {
                error: io::Error::new(io::ErrorKind::BrokenPipe, "the accept task ended"),
            }),
        }
    }

    /// The address this listener is bound to, with the real port when bound to port 0.
    pub fn local_addr(&self) -> &Addr {
        &self.local
    }
}

impl Stream for Listener {
    type Item = Result<Session, AcceptError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((path, dev, ino)) = &self.socket_file {
            let ours = std::fs::symlink_metadata(path)
                .map(|m| m.dev() == *dev && m.ino() == *ino)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds `addr` and returns a [`Listener`] of server sessions.
///
/// `addr` is an [`Addr`] or a string as for [`connect`](crate::connect); port 0 picks a free
/// port (see [`Listener::local_addr`]). Accepted TCP links get `TCP_NODELAY`.
///
/// **Unix socket files.** A socket file left behind by a listener that is gone (a crash, a
/// `kill -9`) is *stale*: `bind` finds nothing answering on it, removes it and binds. A file
/// with a live listener behind it fails with [`BindError::UnixSocketInUse`], and a path that is
/// not a socket fails with [`BindError::NotASocket`]: neither is ever removed. The listener
/// removes its own socket file when dropped. Abstract sockets (`unix:@name`) have no file.
///
/// ```
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::env::temp_dir().join(format!("netchan-doc-bind-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let addr = format!("unix:{}", dir.join("hub.sock").display());
///
/// let mut sessions = netchan::bind(&addr, Default::default()).await?;
/// let client = netchan::connect(&addr, Default::default()).await?;
/// let hub = sessions.next().await.expect("a listener never ends")?;
/// let mut echo = hub.listen("echo")?;
/// let (dialled, accepted) = tokio::join!(client.dial("echo"), echo.accept());
/// assert!(dialled.is_ok() && accepted.is_ok());
/// # drop(sessions);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub async fn bind(addr: impl IntoAddr, options: BindOptions) -> Result<Listener, BindError> {
    let addr = addr.into_addr()?;
    #[cfg(feature = "tls")]
    if options.tls.is_some() && !addr.is_tls() {
        return Err(BindError::TlsForPlainAddr { addr });
    }
    let io_err = |addr: &Addr| {
        let addr = addr.clone();
        move |error| BindError::Io { addr, error }
    };
    let mut socket_file = None;
    let (raw, local) = match &addr {
        Addr::Tcp { host, port } | Addr::Tls { host, port } => {
            #[cfg(feature = "tls")]
            if addr.is_tls() && options.tls.is_none() {
                return Err(BindError::TlsNotConfigured { addr });
            }
            #[cfg(not(feature = "tls"))]
            if addr.is_tls() {
                return Err(BindError::TlsNotConfigured { addr });
            }
            let listener = TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(io_err(&addr))?;
            let port = listener.local_addr().map_err(io_err(&addr))?.port();
            let host = host.clone();
            let local = if addr.is_tls() {
                Addr::Tls { host, port }
            } else {
                Addr::Tcp { host, port }
            };
            (Raw::Tcp(listener), local)
        }
        Addr::Unix(path) => {
            let listener = bind_unix_path(path, &addr)?;
            let meta = std::fs::symlink_metadata(path).map_err(io_err(&addr))?;
            socket_file = Some((path.clone(), meta.dev(), meta.ino()));
            (Raw::Unix(listener), addr.clone())
        }
        Addr::AbstractUnix(name) => {
            let listener = UnixListener::bind(abstract_path(name)).map_err(io_err(&addr))?;
            (Raw::Unix(listener), addr.clone())
        }
    };
    let (sender, ready) = mpsc::channel(options.backlog);
    let span = tracing::info_span!("listener", addr = %local);
    let task = tokio::spawn(tracing::Instrument::instrument(
        accept_loop(raw, options, sender),
        span,
    ));
    Ok(Listener {
        ready,
        local,
        task,
        socket_file,
    })
}

/// Binds a Unix socket at `path`, replacing a stale socket file (see [`bind`]).
fn bind_unix_path(path: &Path, addr: &Addr) -> Result<UnixListener, BindError> {
    let io_err = |error| BindError::Io {
        addr: addr.clone(),
        error,
    };
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        other => return other.map_err(io_err),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_owned(),
        });
    }
    // A blocking connect to a Unix socket returns at once: accepted or queued by a live
    // listener, refused when nobody listens. Only a full backlog could block it, and a full
    // backlog means a live listener, so a non-blocking probe would tell us the same.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(BindError::UnixSocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale unix socket file");
            std::fs::remove_file(path).map_err(io_err)?;
            UnixListener::bind(path).map_err(io_err)
        }
        Err(e) => Err(io_err(e)),
    }
}

enum Raw {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts connections and turns each into a session, TLS handshakes running concurrently (at
/// most `backlog` of them) so one stalled client cannot hold up the others.
async fn accept_loop(
    raw: Raw,
    options: BindOptions,
    ready: mpsc::Sender<Result<Session, AcceptError>>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        // Bounded: at most `backlog` handshakes in flight; at the bound, wait for one to end.
        while handshakes.len() >= options.backlog {
            handshakes.join_next().await;
        }
        let accepted = tokio::select! {
            accepted = accept_raw(&raw) => accepted,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
        };
        let (io, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                if ready.send(Err(AcceptError::Io { error })).await.is_err() {
                    return;
                }
                // EMFILE and its kin persist for a while: do not spin on them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tracing::debug!(%peer, "accepted");
        #[cfg(feature = "tls")]
        if let Some(tls) = options.tls.clone() {
            let ready = ready.clone();
            let (timeout, config) = (options.handshake_timeout, options.mux.clone());
            let setup = options.on_session.clone();
            handshakes.spawn(async move {
                let result = match io {
                    Io::Tcp(tcp) => tls.handshake(tcp, timeout).await,
                    Io::Unix(_) => unreachable_unix_tls(),
                };
                let next = match result {
                    Ok(stream) => Ok(start(stream, config, setup.as_ref())),
                    Err(error) => {
                        tracing::info!(%peer, %error, "TLS handshake failed");
                        Err(AcceptError::Tls { peer, error })
                    }
                };
                let _ = ready.send(next).await;
            });
            continue;
        }
        let session = match io {
            Io::Tcp(tcp) => start(tcp, options.mux.clone(), options.on_session.as_ref()),
            Io::Unix(unix) => start_unix(unix, options.mux.clone(), options.on_session.as_ref()),
        };
        if ready.send(Ok(session)).await.is_err() {
            return;
        }
    }
}

/// TLS listeners are TCP only (`tls://host:port`), so a Unix stream never meets a TLS config.
#[cfg(feature = "tls")]
fn unreachable_unix_tls(
) -> Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, super::TlsError> {
    Err(super::TlsError::Handshake {
        error: io::Error::new(io::ErrorKind::Unsupported, "TLS over a unix socket"),
    })
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept_raw(raw: &Raw) -> io::Result<(Io, String)> {
    match raw {
        Raw::Tcp(listener) => {
            let (tcp, peer) = listener.accept().await?;
            // Set up to carry a session, TLS included (see `netchan_mux::tune_tcp`).
            netchan_mux::tune_tcp(&tcp)?;
            Ok((Io::Tcp(tcp), peer.to_string()))
        }
        Raw::Unix(listener) => {
            let (unix, _) = listener.accept().await?;
            Ok((Io::Unix(unix), "a unix socket peer".to_owned()))
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_tcp_link_caps_its_unsent_bytes_and_sends_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let raw = Raw::Tcp(listener);
        let (dialled, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), accept_raw(&raw));
        dialled.unwrap();
        let Ok((Io::Tcp(tcp), _)) = accepted else {
            panic!("a tcp listener accepts tcp links");
        };
        assert!(tcp.nodelay().unwrap());
        assert_eq!(
            socket2::SockRef::from(&tcp).tcp_notsent_lowat().unwrap(),
            netchan_mux::TCP_UNSENT_LIMIT
        );
    }
}
