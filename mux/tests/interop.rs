//! Interop with the `yamux` crate (libp2p's rust-yamux) as the other end of the link, in both
//! modes: it speaks plain yamux and our channel handshake (docs/protocol.md) by hand.

mod common;

use common::{spawn_echo, within};
use netchan_mux::{CloseReason, Config, Mode, Session};
use netchan_testkit::yamux::{YamuxPeer, YamuxStream};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type YStream = YamuxStream;

/// The `yamux` crate's end of the link, speaking our channel handshake by hand on top.
struct Peer(YamuxPeer);

impl Peer {
    fn start<T>(io: T, mode: yamux::Mode) -> Peer
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        Peer(YamuxPeer::start(io, mode))
    }

    /// Dials our session's listener `name` with the channel handshake.
    async fn dial(&self, name: &str) -> YStream {
        let mut s = self.0.open().await;
        let mut req = vec![1, name.len() as u8];
        req.extend_from_slice(name.as_bytes());
        s.write_all(&req).await.unwrap();
        s.flush().await.unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [1, 0], "our session accepts");
        s
    }

    /// Accepts the next inbound stream and answers its handshake; returns it and the name.
    async fn accept(&mut self) -> (YStream, String) {
        let mut s = self.0.accept().await.expect("an inbound stream");
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 1);
        let mut name = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut name).await.unwrap();
        s.write_all(&[1, 0]).await.unwrap();
        s.flush().await.unwrap();
        (s, String::from_utf8(name).unwrap())
    }

    async fn close(&self) {
        self.0.close().await;
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i * 31 + usize::from(seed)) as u8)
        .collect()
}

/// Our session in `mode` over loopback TCP, the yamux crate in the other mode.
fn their_mode(mode: Mode) -> yamux::Mode {
    match mode {
        Mode::Client => yamux::Mode::Server,
        Mode::Server => yamux::Mode::Client,
    }
}

async fn pair(mode: Mode) -> (Session, Peer) {
    let (a, b) = common::tcp_pair().await;
    (
        Session::new(a, mode, Config::default()),
        Peer::start(b, their_mode(mode)),
    )
}

async fn yamux_echo(mut s: YStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

async fn channels_both_ways_and_bulk(mode: Mode) {
    let (session, peer) = pair(mode).await;
    carries_channels_both_ways_and_bulk(session, peer).await;
}

async fn carries_channels_both_ways_and_bulk(session: Session, mut peer: Peer) {
    spawn_echo(session.listen("echo").unwrap());

    // The yamux crate dials us: 4 MiB echoed, checksummed.
    let data = pattern(4 << 20, 1);
    let s = within(10, "yamux dials", peer.dial("echo")).await;
    let (mut r, mut w) = tokio::io::split(s);
    let sent = checksum(&data);
    let writer = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = within(60, "echo through us", async {
        tokio::join!(writer, reader)
    })
    .await;
    assert_eq!(back.len(), data.len());
    assert_eq!(checksum(&back), sent);

    // We dial the yamux crate: 4 MiB echoed by it.
    let dial = session.dial("theirs");
    let accept = peer.accept();
    let (conn, (theirs, name)) = within(10, "we dial", async { tokio::join!(dial, accept) }).await;
    assert_eq!(name, "theirs");
    tokio::spawn(yamux_echo(theirs));
    let (mut r, mut w) = tokio::io::split(conn.unwrap());
    let data = pattern(4 << 20, 2);
    let writer = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = within(60, "echo through yamux", async {
        tokio::join!(writer, reader)
    })
    .await;
    assert_eq!(checksum(&back), checksum(&data));
    assert!(!session.is_closed());
}

/// A session that passes file descriptors announces it with a ping; a peer without the
/// extension just answers it, everything else works as usual, and no fds are ever sent to it.
#[cfg(unix)]
#[tokio::test]
async fn a_session_passing_fds_works_with_the_yamux_crate_over_a_unix_socket() {
    use std::os::fd::AsFd;
    for mode in [Mode::Client, Mode::Server] {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let session = Session::with_fds(a, mode, Config::default());
        let mut peer = Peer::start(b, their_mode(mode));
        let (dialed, (theirs, _)) = within(10, "we dial", async {
            tokio::join!(session.dial("fds?"), peer.accept())
        })
        .await;
        let mut conn = dialed.unwrap();
        assert!(!conn.can_send_fds());
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            conn.send_fds(&[file.as_fd()]),
            Err(netchan_mux::Error::FdsUnsupported { .. })
        ));
        drop((conn, theirs));
        carries_channels_both_ways_and_bulk(session, peer).await;
    }
}

#[tokio::test]
async fn the_yamux_crate_as_server_carries_channels_both_ways_and_bulk_intact() {
    channels_both_ways_and_bulk(Mode::Client).await;
}

#[tokio::test]
async fn the_yamux_crate_as_client_carries_channels_both_ways_and_bulk_intact() {
    channels_both_ways_and_bulk(Mode::Server).await;
}

#[tokio::test]
async fn half_close_and_reset_reach_the_yamux_crate_and_back() {
    let (session, peer) = pair(Mode::Client).await;
    let mut listener = session.listen("half").unwrap();

    // The yamux side half-closes; we read EOF and still answer.
    let mut s = within(10, "dial", peer.dial("half")).await;
    let mut ours = within(10, "accept", listener.accept()).await.unwrap();
    s.write_all(b"question").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(10, "read to eof", ours.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"question");
    ours.write_all(b"answer").await.unwrap();
    drop(ours); // a close: the answer is delivered, then EOF
    let mut got = Vec::new();
    within(10, "answer", s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"answer");

    // The yamux side drops a stream without closing it: a reset, never a clean EOF here.
    let s = within(10, "dial", peer.dial("half")).await;
    let mut ours = within(10, "accept", listener.accept()).await.unwrap();
    drop(s);
    let mut buf = [0u8; 8];
    let err = within(10, "read after reset", ours.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");

    // We reset: the yamux side's stream ends.
    let mut s = within(10, "dial", peer.dial("half")).await;
    let ours = within(10, "accept", listener.accept()).await.unwrap();
    ours.reset();
    let mut buf = [0u8; 8];
    let r = within(10, "yamux read after our reset", s.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(!session.is_closed());
}

#[tokio::test]
async fn our_close_sends_go_away_and_the_yamux_crate_sees_the_end() {
    let (session, mut peer) = pair(Mode::Server).await;
    within(10, "our close", session.close()).await;
    let how = within(10, "yamux sees the end", peer.0.ended())
        .await
        .unwrap();
    assert!(
        how.contains("ended by the peer") || how.contains("error"),
        "{how}"
    );
    assert!(matches!(session.closed().await, CloseReason::Local));
}

#[tokio::test]
async fn the_yamux_crates_close_ends_our_session_as_closed_by_the_peer() {
    let (session, peer) = pair(Mode::Client).await;
    within(10, "yamux close", peer.close()).await;
    let reason = within(10, "our session ends", session.closed()).await;
    assert!(matches!(reason, CloseReason::Peer), "{reason:?}");
}
