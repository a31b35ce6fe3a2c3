//! [`connect`]: an address to a client [`Session`].

use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::{Addr, ConnectError, IntoAddr};

fn start<T>(io: T, config: mux::Config, setup: Option<&super::gate::OnSession>) -> Session
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    super::gate::start(io, mux::Mode::Client, config, setup)
}

fn start_unix(
    io: UnixStream,
    config: mux::Config,
    setup: Option<&super::gate::OnSession>,
) -> Session {
    super::gate::start_unix(io, mux::Mode::Client, config, setup)
}
use crate::mux::{self, Session};

/// How [`connect`] connects. `ConnectOptions::default()` suits TCP and Unix sockets.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    mux: mux::Config,
    timeout: Duration,
    on_session: Option<super::gate::OnSession>,
    #[cfg(feature = "tls")]
    tls: Option<super::TlsClient>,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            mux: mux::Config::default(),
            timeout: Duration::from_secs(10),
            on_session: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ConnectOptions {
    /// The session's configuration. Default: `mux::Config::default()`.
    pub fn mux(mut self, config: mux::Config) -> ConnectOptions {
        self.mux = config;
        self
    }

    /// The longest the whole connect may take: name resolution, the TCP or Unix connect and
    /// the TLS handshake. Default: 10 s.
    pub fn timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.timeout = timeout;
        self
    }

    /// Runs `setup` on each new session before the session reads anything from the peer:
    /// the place to [`listen`](crate::mux::Session::listen) on the names the peer will dial,
    /// so that no dial arrives before its listener. Keep it short (it cannot await); spawn
    /// the tasks that serve the listeners. Default: none.
    pub fn on_session(
        mut self,
        setup: impl Fn(&Session) + Send + Sync + 'static,
    ) -> ConnectOptions {
        self.on_session = Some(super::gate::OnSession(std::sync::Arc::new(setup)));
        self
    }

    /// TLS for a `tls://` address (required there, refused elsewhere). Default: none.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: super::TlsClient) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }
}

/// Connects to `addr` and starts the client end of a session over the link.
///
/// `addr` is an [`Addr`] or a string such as `"127.0.0.1:8765"`, `"tls://hub.example:8765"`,
/// `"unix:/run/hub.sock"` or `"unix:@hub"`. TCP links get `TCP_NODELAY` (RPC traffic is small
/// messages that must not wait for Nagle). Everything up to the session's start, TLS
/// handshake included, is bounded by [`ConnectOptions::timeout`].
///
/// Cancel-safe: dropping the future drops the half-made link.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut listener = netchan::bind("127.0.0.1:0", Default::default()).await?;
/// let addr = listener.local_addr().clone();
/// let client = netchan::connect(&addr, Default::default()).await?;
/// let hub = listener.accept().await?;
/// let _greet = hub.listen("greet")?;
/// assert!(client.dial("greet").await.is_ok());
/// # Ok(())
/// # }
/// ```
pub async fn connect(
    addr: impl IntoAddr,
    options: ConnectOptions,
) -> Result<Session, ConnectError> {
    let addr = addr.into_addr()?;
    #[cfg(feature = "tls")]
    if options.tls.is_some() && !addr.is_tls() {
        return Err(ConnectError::TlsForPlainAddr { addr });
    }
    let deadline = tokio::time::Instant::now() + options.timeout;
    let timed_out = |addr: &Addr| ConnectError::Timeout {
        addr: addr.clone(),
        after: options.timeout,
    };
    let io_err = |addr: &Addr| {
        let addr = addr.clone();
        move |error| ConnectError::Io { addr, error }
    };
    let session = match &addr {
        Addr::Tcp { host, port } => {
            let tcp = tokio::time::timeout_at(deadline, tcp(host, *port))
                .await
                .map_err(|_| timed_out(&addr))?
                .map_err(io_err(&addr))?;
            start(tcp, options.mux, options.on_session.as_ref())
        }
        Addr::Unix(path) => {
            let unix = tokio::time::timeout_at(deadline, UnixStream::connect(path))
                .await
                .map_err(|_| timed_out(&addr))?
                .map_err(io_err(&addr))?;
            start_unix(unix, options.mux, options.on_session.as_ref())
        }
        Addr::AbstractUnix(name) => {
            let unix = tokio::time::timeout_at(deadline, UnixStream::connect(abstract_path(name)))
                .await
                .map_err(|_| timed_out(&addr))?
                .map_err(io_err(&addr))?;
            start_unix(unix, options.mux, options.on_session.as_ref())
        }
        #[cfg(feature = "tls")]
        Addr::Tls { host, port } => {
            let Some(tls) = &options.tls else {
                return Err(ConnectError::TlsNotConfigured { addr });
            };
            let tcp = tokio::time::timeout_at(deadline, tcp(host, *port))
                .await
                .map_err(|_| timed_out(&addr))?
                .map_err(io_err(&addr))?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let stream =
                tls.handshake(tcp, host, left)
                    .await
                    .map_err(|error| ConnectError::Tls {
                        addr: addr.clone(),
                        error,
                    })?;
            start(stream, options.mux, options.on_session.as_ref())
        }
        #[cfg(not(feature = "tls"))]
        Addr::Tls { .. } => return Err(ConnectError::TlsNotConfigured { addr }),
    };
    tracing::debug!(%addr, "connected");
    Ok(session)
}

/// A TCP connection set up to carry a session (TLS included): see [`netchan_mux::tune_tcp`].
async fn tcp(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect((host, port)).await?;
    netchan_mux::tune_tcp(&tcp)?;
    Ok(tcp)
}

/// The path tokio takes for an abstract name: a leading NUL byte.
pub(crate) fn abstract_path(name: &str) -> String {
    format!("\0{name}")
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[tokio::test]
    async fn a_dialled_tcp_link_caps_its_unsent_bytes_and_sends_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = super::tcp("127.0.0.1", port).await.unwrap();
        assert!(tcp.nodelay().unwrap());
        assert_eq!(
            socket2::SockRef::from(&tcp).tcp_notsent_lowat().unwrap(),
            netchan_mux::TCP_UNSENT_LIMIT
        );
    }
}
