//! Liveness: keepalive, vanished peers and graceful close, over loopback TCP and duplex pipes.

mod common;

use common::{proxied_sessions, spawn_echo, within};
use netchan_mux::{CloseReason, Config, Error, Session};
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quick_keepalive() -> Config {
    Config::default()
        .keepalive_interval(Some(Duration::from_millis(200)))
        .keepalive_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn keepalive_detects_a_peer_behind_a_proxy_that_stops_forwarding() {
    let server_cfg = Config::default().keepalive_interval(None);
    let (client, server, proxy) = proxied_sessions(quick_keepalive(), server_cfg, None).await;
    spawn_echo(server.listen("echo").unwrap());
    let mut conn = within(5, "dial", client.dial("echo")).await.unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within(5, "echo", conn.read_exact(&mut buf)).await.unwrap();
    let mut own_listener = client.listen("never-dialed").unwrap();

    proxy.blackhole_both();
    // Everything waiting on the session must end with an error instead of hanging.
    let read = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        conn.read(&mut buf).await
    });
    let accept = tokio::spawn(async move { own_listener.accept().await });
    let dialer = client.clone();
    let dial = tokio::spawn(async move { dialer.dial("echo").await });

    let reason = within(10, "keepalive timeout", client.closed()).await;
    assert!(
        matches!(reason, CloseReason::KeepaliveTimeout { .. }),
        "{reason:?}"
    );
    let err = within(5, "pending read", read).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(matches!(
        within(5, "pending accept", accept).await.unwrap(),
        Err(Error::SessionClosed(CloseReason::KeepaliveTimeout { .. }))
    ));
    assert!(matches!(
        within(5, "pending dial", dial).await.unwrap(),
        Err(Error::SessionClosed(_))
    ));
    assert!(matches!(
        client.dial("echo").await,
        Err(Error::SessionClosed(CloseReason::KeepaliveTimeout { .. }))
    ));
}

#[tokio::test]
async fn bulk_transfer_over_a_slow_link_causes_no_false_keepalive_timeout() {
    // At most ~1.5 MB/s, 3 MiB take two seconds or more: twice keepalive interval + timeout
    // (and generous for a loaded machine). Every chunk the slow link delivers counts as
    // liveness, so the session must never time out, even though whole frames arrive slowly.
    let keepalive = || {
        Config::default()
            .keepalive_interval(Some(Duration::from_millis(400)))
            .keepalive_timeout(Duration::from_millis(600))
    };
    let (client, server, _proxy) =
        proxied_sessions(keepalive(), keepalive(), Some(1_536_000)).await;
    let mut listener = server.listen("bulk").unwrap();
    const TOTAL: usize = 3 * 1024 * 1024;
    let receiver = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let mut sum = 0u64;
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            sum = buf[..n]
                .iter()
                .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
            total += n;
        }
        (total, sum)
    });
    let mut conn = within(5, "dial", client.dial("bulk")).await.unwrap();
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 256) as u8).collect();
    let expected = data
        .iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
    within(30, "slow bulk write", async {
        conn.write_all(&data).await.unwrap();
        conn.shutdown().await.unwrap();
    })
    .await;
    let (total, sum) = within(30, "slow bulk read", receiver).await.unwrap();
    assert_eq!((total, sum), (TOTAL, expected));
    assert!(
        !client.is_closed(),
        "client session ended: false keepalive timeout"
    );
    assert!(
        !server.is_closed(),
        "server session ended: false keepalive timeout"
    );
}

#[tokio::test]
async fn a_peer_that_vanishes_mid_transfer_gives_errors_within_a_bound() {
    let cfg = || Config::default().keepalive_interval(None);
    let (client, server, proxy) = proxied_sessions(cfg(), cfg(), None).await;
    let mut listener = server.listen("upload").unwrap();
    let (got_some_tx, got_some) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = conn.read_exact(&mut buf).await;
        let _ = got_some_tx.send(());
        // Stop reading; keep the channel open.
        std::future::pending::<()>().await;
    });
    let conn = within(5, "dial", client.dial("upload")).await.unwrap();
    let (mut r, mut w) = tokio::io::split(conn);
    let writer = tokio::spawn(async move {
        let block = vec![0x5au8; 64 * 1024];
        // Bounded: the link is cut long before 16 GiB.
        for _ in 0..256 * 1024 {
            w.write_all(&block).await?;
        }
        Ok::<_, io::Error>(())
    });
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        r.read(&mut buf).await
    });
    within(5, "first bytes arrive", got_some).await.unwrap();
    proxy.reset();

    let err = within(5, "writer fails", writer)
        .await
        .unwrap()
        .unwrap_err();
    assert_ne!(err.kind(), io::ErrorKind::Other, "{err}");
    assert!(within(5, "reader fails", reader).await.unwrap().is_err());
    let reason = within(5, "client ends", client.closed()).await;
    assert!(reason.is_error(), "{reason:?}");
    within(5, "server ends", server.closed()).await;
}

#[tokio::test]
async fn graceful_close_lets_an_open_channel_finish() {
    let (client, server) = common::duplex_sessions(Config::default(), Config::default());
    spawn_echo(server.listen("echo").unwrap());
    let mut conn = within(5, "dial", client.dial("echo")).await.unwrap();

    let closer = client.clone();
    let closing = tokio::spawn(async move { closer.close().await });
    // New channels are refused while closing...
    let refused = within(5, "dial while closing", async {
        loop {
            match client.dial("echo").await {
                Err(Error::SessionClosed(_)) => break,
                // The close may not have started yet; the channel is usable then.
                Ok(_) => tokio::task::yield_now().await,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
    });
    refused.await;
    // ...but the open one still works to its end.
    conn.write_all(b"last words").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    within(5, "echo while closing", conn.read_to_end(&mut back))
        .await
        .unwrap();
    assert_eq!(back, b"last words");
    // The close waits for this channel (the 5 s grace is far away).
    assert!(!closing.is_finished());
    drop(conn);
    within(5, "close completes", closing).await.unwrap();
    assert!(matches!(client.closed().await, CloseReason::Local));
    assert!(matches!(
        within(5, "peer sees the close", server.closed()).await,
        CloseReason::Peer
    ));
}

#[tokio::test(start_paused = true)]
async fn close_grace_expiry_cuts_open_channels_with_errors() {
    let grace = Duration::from_secs(2);
    let (client, server) =
        common::duplex_sessions(Config::default().close_grace(grace), Config::default());
    let mut listener = server.listen("idle").unwrap();
    let accepted = tokio::spawn(async move { listener.accept().await.unwrap() });
    let mut conn = within(5, "dial", client.dial("idle")).await.unwrap();
    let _held = within(5, "accept", accepted).await.unwrap();

    let started = tokio::time::Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        conn.read(&mut buf).await
    });
    within(60, "close", client.close()).await;
    assert!(started.elapsed() >= grace);
    let err = within(5, "cut read", reader).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected, "{err}");
}

#[tokio::test]
async fn closed_resolves_for_every_waiter_and_after_the_end() {
    let (client, server) = common::duplex_sessions(Config::default(), Config::default());
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let s = server.clone();
            tokio::spawn(async move { s.closed().await })
        })
        .collect();
    within(5, "close", client.close()).await;
    for w in waiters {
        assert!(matches!(
            within(5, "waiter", w).await.unwrap(),
            CloseReason::Peer
        ));
    }
    assert!(matches!(server.closed().await, CloseReason::Peer));
    assert!(server.is_closed());
    assert!(matches!(server.listen("x"), Err(Error::SessionClosed(_))));
}

#[tokio::test]
async fn dropping_every_handle_ends_the_session() {
    let (client, server) = common::duplex_sessions(Config::default(), Config::default());
    drop(client);
    let reason = within(5, "peer sees the end", server.closed()).await;
    assert!(matches!(reason, CloseReason::Peer), "{reason:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_detected_exactly_after_interval_plus_timeout() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (interval, timeout) = (Duration::from_secs(10), Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let session = netchan_mux::Session::client(
        a,
        Config::default()
            .keepalive_interval(Some(interval))
            .keepalive_timeout(timeout),
    );
    // A peer that never sends a byte, so never answers our pings.
    let _silent = b;
    let reason = within(120, "keepalive", session.closed()).await;
    let CloseReason::KeepaliveTimeout { after } = reason else {
        panic!("expected a keepalive timeout, got {reason:?}");
    };
    assert!(after >= interval + timeout, "{after:?}");
    let elapsed = started.elapsed();
    assert!(elapsed >= interval + timeout, "{elapsed:?}");
    assert!(
        elapsed < interval + timeout + Duration::from_millis(100),
        "{elapsed:?}"
    );
}

/// Regression: the keepalive timer added `keepalive_interval + keepalive_timeout` (and
/// `last read + …`) unchecked, so a huge timeout (`Duration::MAX`, "never give up") overflowed
/// and panicked the driver task once the link had been quiet for one interval, killing the
/// session.
#[tokio::test(start_paused = true)]
async fn keepalive_with_a_huge_timeout_does_not_overflow_and_panic_the_driver() {
    for (interval, timeout) in [
        (Duration::from_secs(1), Duration::MAX),
        (Duration::MAX, Duration::from_secs(1)),
        (Duration::MAX, Duration::MAX),
    ] {
        let config = Config::default()
            .keepalive_interval(Some(interval))
            .keepalive_timeout(timeout);
        let (client, server) = common::duplex_sessions(config.clone(), config);
        spawn_echo(server.listen("echo").unwrap());
        // Idle past the interval (when the timer first fires and computes the next deadline),
        // and past a few more re-arms.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!client.is_closed(), "{interval:?} + {timeout:?}");
        assert!(!server.is_closed(), "{interval:?} + {timeout:?}");
        let reply = within(
            5,
            "round trip",
            common::round_trip(&client, "echo", b"alive"),
        )
        .await;
        assert_eq!(reply, b"alive");
    }
}

/// A peer's new stream whose handshake request never comes: a yamux Data frame with SYN on
/// stream `id` and no body. The handshake task serving it waits for the request.
fn stalled_open(id: u32) -> [u8; 12] {
    let mut frame = [0u8; 12];
    frame[2..4].copy_from_slice(&1u16.to_be_bytes()); // SYN
    frame[4..8].copy_from_slice(&id.to_be_bytes());
    frame
}

/// Every task a session spawns (its driver, the handshakes of inbound channels) has
/// returned once `close()` resolves, and once `closed()` does when the peer ends the link:
/// the runtime counts no task of it left, even with handshakes in flight.
#[tokio::test(flavor = "current_thread")]
async fn no_task_outlives_its_session() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let config = Config::default().handshake_timeout(Duration::from_secs(60));

    // Ended by `close()`.
    let (mut peer, ours) = tokio::io::duplex(64 * 1024);
    let server = netchan_mux::Session::server(ours, config.clone());
    let _listener = server.listen("x").unwrap();
    peer.write_all(&stalled_open(1)).await.unwrap();
    peer.write_all(&stalled_open(3)).await.unwrap();
    // Both handshakes are being served: the driver and two tasks.
    within(5, "the handshakes start", async {
        while metrics.num_alive_tasks() < before + 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    within(5, "close", server.close()).await;
    assert_eq!(metrics.num_alive_tasks(), before, "every task returned");

    // Ended by the peer (its end of the link gone).
    let (mut peer, ours) = tokio::io::duplex(64 * 1024);
    let server = netchan_mux::Session::server(ours, config);
    peer.write_all(&stalled_open(1)).await.unwrap();
    within(5, "the handshake starts", async {
        while metrics.num_alive_tasks() < before + 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(peer);
    let reason = within(5, "the end", server.closed()).await;
    assert!(matches!(reason, CloseReason::Io(_)), "{reason:?}");
    assert_eq!(metrics.num_alive_tasks(), before, "every task returned");
}

/// The close grace and then the flush of the last frames are timers of the core: a closing
/// session with a channel open whose peer reads nothing ends after both have passed, with
/// our own close as the reason (paused time: the deadlines are checked exactly).
#[tokio::test(start_paused = true)]
async fn a_closing_session_whose_peer_reads_nothing_ends_after_the_grace_and_the_flush() {
    let grace = Duration::from_secs(2);
    let flush = Duration::from_secs(3);
    // Room for 8 bytes: the dial's request alone fills it.
    let (ours, mut theirs) = tokio::io::duplex(8);
    let config = Config::default()
        .keepalive_interval(None)
        .close_grace(grace)
        .handshake_timeout(flush);
    let client = Session::client(ours, config);
    let dialer = client.clone();
    let dial = tokio::spawn(async move { dialer.dial("never-answered").await });
    // The dial's first byte arrived: its channel is open, and the link is full again.
    within(5, "the dial's first byte", theirs.read_u8())
        .await
        .unwrap();

    let started = tokio::time::Instant::now();
    within(60, "close", client.close()).await;
    assert!(
        started.elapsed() >= grace + flush,
        "ended after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < grace + flush + Duration::from_secs(1));
    assert!(matches!(client.closed().await, CloseReason::Local));
    assert!(within(5, "dial", dial).await.unwrap().is_err());
}

/// A byte stream whose reads never complete and whose writes fail as if the peer had gone.
struct WritesGone;

impl tokio::io::AsyncRead for WritesGone {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl tokio::io::AsyncWrite for WritesGone {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// After a write that failed as if the peer had gone, the session reads on for the peer's
/// GoAway for one second, a timer of the core, then ends with the write's error.
#[tokio::test(start_paused = true)]
async fn a_failed_write_waits_one_second_for_a_go_away_then_ends_with_its_error() {
    let client = Session::client(WritesGone, Config::default().keepalive_interval(None));
    let started = tokio::time::Instant::now();
    let dial = within(5, "dial", client.dial("anyone")).await;
    assert!(dial.is_err());
    let reason = within(5, "end", client.closed()).await;
    assert!(
        matches!(&reason, CloseReason::Io(e) if e.kind() == io::ErrorKind::BrokenPipe),
        "{reason:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(2),
        "ended after {waited:?}"
    );
}
