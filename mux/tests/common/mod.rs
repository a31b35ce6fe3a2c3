//! Helpers shared by the mux integration tests: link set-up, bounded waits, echo servers.
#![allow(dead_code, unreachable_pub)]

use netchan_mux::{Config, Conn, Listener, Session};
use netchan_testkit::proxy::{Link, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use netchan_testkit::{tcp_pair, within};

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

/// A client session talking through a [`Proxy`] to a server session; returns both and the
/// proxy. `bytes_per_sec`: if set, each direction forwards at most that many bytes per
/// second (a slow link); otherwise it forwards as fast as it can.
pub async fn proxied_sessions(
    client: Config,
    server: Config,
    bytes_per_sec: Option<u64>,
) -> (Session, Session, Proxy) {
    let link = Link {
        rate: bytes_per_sec,
        ..Link::ideal()
    };
    let (c, s, proxy) = Proxy::pair(link).await.expect("proxied loopback pair");
    (
        Session::client(c, client),
        Session::server(s, server),
        proxy,
    )
}
