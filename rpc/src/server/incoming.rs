//! Serving a stream of conns: [`Incoming`] sources and
//! [`Server::serve_incoming`] with graceful shutdown.

use std::{future::Future, io, time::Duration};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::Server;
use crate::context::Origin;

/// How long accepting pauses after an accept error (out of file
/// descriptors, say) before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A source of conns for [`Server::serve_incoming`]: a TCP or Unix
/// listener, a netchan-mux [`Listener`](netchan_mux::Listener), or any
/// stream of conns wrapped in [`FromStream`].
pub trait Incoming: Send {
    /// The conns it yields.
    type Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// The next conn and a label for it (handlers see it as
    /// [`Context::peer`](crate::Context::peer)); `None` once no more will
    /// come. An error is logged and accepting goes on after a short pause.
    fn accept(&mut self) -> impl Future<Output = Option<io::Result<(Self::Conn, String)>>> + Send;
}

impl Incoming for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;

    /// Accepts a TCP conn (with `TCP_NODELAY` set: calls are small
    /// messages); the label is the peer's address.
    async fn accept(&mut self) -> Option<io::Result<(Self::Conn, String)>> {
        Some(
            tokio::net::TcpListener::accept(self)
                .await
                .and_then(|(stream, addr)| {
                    stream.set_nodelay(true)?;
                    Ok((stream, addr.to_string()))
                }),
        )
    }
}

#[cfg(unix)]
impl Incoming for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;

    async fn accept(&mut self) -> Option<io::Result<(Self::Conn, String)>> {
        Some(
            tokio::net::UnixListener::accept(self)
                .await
                .map(|(stream, addr)| (stream, format!("{addr:?}"))),
        )
    }
}

impl Incoming for netchan_mux::Listener {
    type Conn = netchan_mux::Conn;

    /// Accepts a channel; ends when the session does. The label is the
    /// listener's name.
    async fn accept(&mut self) -> Option<io::Result<(Self::Conn, String)>> {
        match netchan_mux::Listener::accept(self).await {
            Ok(conn) => Some(Ok((conn, self.name().to_owned()))),
            Err(netchan_mux::Error::SessionClosed(_)) => None,
            Err(e) => Some(Err(io::Error::other(e))),
        }
    }
}

/// Any stream of conns as an [`Incoming`]; each conn is labelled with its
/// position (`"conn 0"`, `"conn 1"`, ...). The stream ending ends
/// accepting.
#[derive(Debug)]
pub struct FromStream<S> {
    stream: S,
    next: u64,
}

impl<S> FromStream<S> {
    /// Wraps `stream`.
    pub fn new(stream: S) -> FromStream<S> {
        FromStream { stream, next: 0 }
    }
}

impl<S, T> Incoming for FromStream<S>
where
    S: Stream<Item = io::Result<T>> + Send + Unpin,
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Conn = T;

    async fn accept(&mut self) -> Option<io::Result<(T, String)>> {
        let conn = self.stream.next().await?;
        let label = format!("conn {}", self.next);
        self.next += 1;
        Some(conn.map(|c| (c, label)))
    }
}

impl Server {
    /// Serves every conn `incoming` yields, each in its own task, until
    /// `incoming` ends (a mux listener ends with its session; a TCP or Unix
    /// listener never does) and its last conn has closed: for a server that
    /// stops with its process. [`Server::serve_incoming`] adds graceful
    /// shutdown.
    ///
    /// ```no_run
    /// # use netchan_rpc::Server;
    /// # async fn run(server: Server) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:7000").await?;
    /// server.serve_all(listener).await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve_all<I: Incoming>(&self, incoming: I) {
        self.serve_incoming(incoming, std::future::pending(), Duration::ZERO)
            .await
    }

    /// Serves every conn `incoming` yields, each in its own task, until
    /// `shutdown` resolves (or `incoming` ends and its conns are done);
    /// then shuts down gracefully:
    ///
    /// 1. stops accepting (`incoming` is dropped) and refuses new calls on
    ///    the open conns with `Unavailable` ("the server is shutting down");
    /// 2. lets running calls finish: each conn ends once its last call has
    ///    been answered;
    /// 3. after `grace`, cuts the conns still open: their handlers are
    ///    dropped and their callers see the conn lost.
    ///
    /// Returns once every conn has ended. A conn's failure is logged and
    /// ends only that conn.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use netchan_rpc::Server;
    /// # async fn run(server: Server) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:7000").await?;
    /// let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
    /// server.serve_incoming(listener, ctrl_c, Duration::from_secs(10)).await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve_incoming<I: Incoming>(
        &self,
        mut incoming: I,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let drain = CancellationToken::new();
        // One task per open conn; bounded by what the source yields (the
        // OS's descriptor limit, the mux session's channel limit).
        let mut conns = JoinSet::new();
        let mut accepting = true;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                next = incoming.accept(), if accepting => match next {
                    None => accepting = false,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "rpc accept failed; retrying shortly");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Some(Ok((conn, label))) => {
                        let server = self.clone();
                        let origin = Origin { label: Some(label.into()), ..Origin::default() };
                        let drain = drain.clone();
                        conns.spawn(async move { server.serve_conn(conn, origin, drain).await });
                    }
                },
                Some(done) = conns.join_next(), if !conns.is_empty() => log_conn_end(done),
            }
            if !accepting && conns.is_empty() {
                return;
            }
        }
        drop(incoming);
        tracing::debug!(conns = conns.len(), ?grace, "rpc server shutting down");
        drain.cancel();
        let finished = tokio::time::timeout(grace, async {
            while let Some(done) = conns.join_next().await {
                log_conn_end(done);
            }
        })
        .await;
        if finished.is_err() {
            tracing::debug!(
                conns = conns.len(),
                "rpc shutdown grace over; cutting the conns left"
            );
            conns.shutdown().await;
        }
    }
}

fn log_conn_end(done: Result<Result<(), crate::error::Error>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %crate::error::chain(&e), "rpc conn failed"),
        Err(e) => tracing::warn!(error = %e, "rpc conn task failed"),
    }
}
