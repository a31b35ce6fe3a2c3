//! Helpers shared by the mux integration tests: link set-up, bounded waits, echo servers.
#![allow(dead_code, unreachable_pub)]

use netchan_mux::{Config, Conn, Listener, Session};
use std::{future::Future, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Awaits `f`, failing the test if it takes longer than `secs` seconds (a hang guard).
pub async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// A connected pair of loopback TCP sockets.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.unwrap();
    let (server, _) = server.unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// A client and a server session over loopback TCP.
pub async fn tcp_sessions(client: Config, server: Config) -> (Session, Session) {
    let (a, b) = tcp_pair().await;
    (Session::client(a, client), Session::server(b, server))
}

/// A client and a server session over an in-memory duplex pipe.
pub fn duplex_sessions(client: Config, server: Config) -> (Session, Session) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    (Session::client(a, client), Session::server(b, server))
}

/// Echoes every accepted channel until its peer half-closes, then half-closes back.
pub fn spawn_echo(mut listener: Listener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            tokio::spawn(echo(conn));
        }
    })
}

/// Echoes one channel: copies what it reads back until EOF, then shuts down.
pub async fn echo(conn: Conn) {
    let (mut r, mut w) = tokio::io::split(conn);
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// Sends `payload` on a fresh channel to `name`, half-closes, and returns what came back.
pub async fn round_trip(session: &Session, name: &str, payload: &[u8]) -> Vec<u8> {
    let mut conn = session.dial(name).await.expect("dial");
    let (mut r, mut w) = tokio::io::split(&mut conn);
    let write = async {
        w.write_all(payload).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut back = Vec::with_capacity(payload.len());
        r.read_to_end(&mut back).await.expect("read");
        back
    };
    let ((), back) = tokio::join!(write, read);
    back
}

/// A bare yamux peer (no netchan handshake) for tests that misbehave on purpose: open
/// outbound streams through `opens`, receive inbound ones from `inbound`.
pub struct RawPeer {
    pub opens: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<yamux::Stream>>,
    pub inbound: tokio::sync::mpsc::Receiver<yamux::Stream>,
}

impl RawPeer {
    pub fn start<T>(io: T, mode: yamux::Mode) -> RawPeer
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        use std::task::Poll;
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (opens, mut open_rx) =
            tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<yamux::Stream>>(16);
        let (inbound_tx, inbound) = tokio::sync::mpsc::channel(1024);
        let mut conn = yamux::Connection::new(io.compat(), yamux::Config::default(), mode);
        tokio::spawn(async move {
            let mut waiting: Option<tokio::sync::oneshot::Sender<yamux::Stream>> = None;
            futures::future::poll_fn(|cx| loop {
                if waiting.is_none() {
                    if let Poll::Ready(Some(reply)) = open_rx.poll_recv(cx) {
                        waiting = Some(reply);
                    }
                }
                if waiting.is_some() {
                    if let Poll::Ready(Ok(stream)) = conn.poll_new_outbound(cx) {
                        let _ = waiting.take().unwrap().send(stream);
                        continue;
                    }
                }
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(stream))) => {
                        let _ = inbound_tx.try_send(stream);
                    }
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            })
            .await;
        });
        RawPeer { opens, inbound }
    }

    /// Opens an outbound stream (visible to the peer once something is written on it).
    pub async fn open(&self) -> tokio_util::compat::Compat<yamux::Stream> {
        use tokio_util::compat::FuturesAsyncReadCompatExt;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.opens.send(tx).await.expect("raw peer gone");
        rx.await.expect("raw peer gone").compat()
    }
}

/// A TCP proxy on 127.0.0.1 between one client and `upstream`, which a test can slow down,
/// blackhole (it keeps reading but forwards nothing) or sever (it drops both sockets).
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    blackhole: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sever: tokio_util::sync::CancellationToken,
}

impl Proxy {
    /// `bytes_per_tick`: if set, each direction forwards at most that many bytes per
    /// millisecond tick (a slow link); otherwise it forwards as fast as it can.
    pub async fn start(upstream: std::net::SocketAddr, bytes_per_tick: Option<usize>) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blackhole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sever = tokio_util::sync::CancellationToken::new();
        let (bh, cut) = (blackhole.clone(), sever.clone());
        tokio::spawn(async move {
            let (inbound, _) = listener.accept().await.unwrap();
            let outbound = TcpStream::connect(upstream).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let forward = |mut r: tokio::net::tcp::OwnedReadHalf,
                           mut w: tokio::net::tcp::OwnedWriteHalf| {
                let bh = bh.clone();
                async move {
                    let chunk = bytes_per_tick.unwrap_or(64 * 1024);
                    let mut buf = vec![0u8; chunk];
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    loop {
                        if bytes_per_tick.is_some() {
                            tick.tick().await;
                        }
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if bh.load(Ordering::SeqCst) {
                            continue; // swallowed
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            };
            tokio::select! {
                _ = forward(ri, wo) => {}
                _ = forward(ro, wi) => {}
                _ = cut.cancelled() => {}
            }
            // Returning drops every socket: the link is cut.
        });
        Proxy {
            addr,
            blackhole,
            sever,
        }
    }

    /// Stops forwarding in both directions, keeping the sockets open (a half-dead link).
    pub fn blackhole(&self) {
        self.blackhole
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes both sides of the link at once.
    pub fn sever(&self) {
        self.sever.cancel();
    }
}

/// A client session talking through `proxy` to a server session; returns both.
pub async fn proxied_sessions(
    client: Config,
    server: Config,
    bytes_per_tick: Option<usize>,
) -> (Session, Session, Proxy) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap(), bytes_per_tick).await;
    let (c, s) = tokio::join!(TcpStream::connect(proxy.addr), listener.accept());
    let c = c.unwrap();
    c.set_nodelay(true).unwrap();
    let (s, _) = s.unwrap();
    s.set_nodelay(true).unwrap();
    (
        Session::client(c, client),
        Session::server(s, server),
        proxy,
    )
}
