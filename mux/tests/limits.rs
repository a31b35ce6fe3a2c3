//! Limits and misbehaving peers: the channel limit, handshake timeouts, bad handshakes.

mod common;

use common::{tcp_sessions, within};
use netchan_mux::{Config, Error, Session};
use netchan_testkit::yamux::{YamuxPeer, YamuxStream};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a raw yamux stream to the session and sends `request` on it (the whole or a part of
/// a channel handshake).
async fn open_with(raw: &YamuxPeer, request: &[u8]) -> YamuxStream {
    let mut s = raw.open().await;
    s.write_all(request).await.unwrap();
    s.flush().await.unwrap();
    s
}

/// Sends `request` on a fresh raw stream and reads all the session answers until it closes
/// the stream (`what` names the wait).
async fn whole_answer(raw: &YamuxPeer, request: &[u8], what: &str) -> Vec<u8> {
    let mut s = open_with(raw, request).await;
    let mut reply = Vec::new();
    within(5, what, s.read_to_end(&mut reply)).await.unwrap();
    reply
}

/// Sends a proper handshake for channel `abc` on a fresh raw stream; returns the stream (still
/// open) and the two-byte reply.
async fn handshake_for_abc(raw: &YamuxPeer) -> (YamuxStream, [u8; 2]) {
    let mut good = open_with(raw, &[1, 3, b'a', b'b', b'c']).await;
    let mut reply = [0u8; 2];
    within(5, "reply", good.read_exact(&mut reply))
        .await
        .unwrap();
    (good, reply)
}

#[tokio::test]
async fn channel_limit_refuses_the_excess_and_the_session_survives() {
    let (client, server) = tcp_sessions(Config::default(), Config::default().max_channels(4)).await;
    let mut listener = server.listen("svc").unwrap();
    // Each accepted channel is held until its peer closes it, then dropped and reported.
    let (released_tx, mut released) = tokio::sync::mpsc::channel::<()>(16);
    tokio::spawn(async move {
        while let Ok(mut conn) = listener.accept().await {
            let released_tx = released_tx.clone();
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink).await;
                drop(conn);
                let _ = released_tx.send(()).await;
            });
        }
    });

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            within(5, "dial under limit", client.dial("svc"))
                .await
                .unwrap(),
        );
    }
    // An inbound flood beyond the limit is refused channel by channel.
    let excess = futures::future::join_all((0..6).map(|_| client.dial("svc")));
    for result in within(10, "excess dials", excess).await {
        match result {
            Err(Error::Refused { name, reason }) => {
                assert_eq!(name, "svc");
                assert!(reason.contains("too many open channels"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(!client.is_closed() && !server.is_closed());

    // Freeing two channels makes room for two more on the same session.
    held.truncate(2);
    within(5, "server releases", async {
        released.recv().await.unwrap();
        released.recv().await.unwrap();
    })
    .await;
    for _ in 0..2 {
        let mut conn = within(5, "dial after release", client.dial("svc"))
            .await
            .unwrap();
        conn.write_all(b"still alive").await.unwrap();
        held.push(conn);
    }
}

#[tokio::test]
async fn dials_beyond_our_own_limit_fail_with_too_many_channels() {
    let (client, server) =
        common::duplex_sessions(Config::default().max_channels(2), Config::default());
    common::spawn_echo(server.listen("svc").unwrap());
    let _a = within(5, "dial", client.dial("svc")).await.unwrap();
    let _b = within(5, "dial", client.dial("svc")).await.unwrap();
    match client.dial("svc").await {
        Err(Error::TooManyChannels { limit }) => assert_eq!(limit, 2),
        other => panic!("expected TooManyChannels, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_handshake_with_no_answer_fails_after_the_timeout() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let timeout = Duration::from_secs(3);
    let client = Session::client(a, Config::default().handshake_timeout(timeout));
    // The peer speaks yamux but never answers our handshake.
    let mut raw = YamuxPeer::start(b, yamux::Mode::Server);
    let started = tokio::time::Instant::now();
    match within(60, "dial", client.dial("silent")).await {
        Err(Error::HandshakeTimeout { name, after }) => {
            assert_eq!(name, "silent");
            assert_eq!(after, timeout);
        }
        other => panic!("expected HandshakeTimeout, got {other:?}"),
    }
    assert!(started.elapsed() >= timeout);
    // The stream did reach the peer; the session is fine.
    assert!(raw.try_accept().is_some());
    assert!(!client.is_closed());
}

#[tokio::test(start_paused = true)]
async fn an_inbound_handshake_that_never_finishes_is_dropped_after_the_timeout() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let timeout = Duration::from_secs(3);
    let server = Session::server(a, Config::default().handshake_timeout(timeout));
    let _listener = server.listen("abc").unwrap();
    let raw = YamuxPeer::start(b, yamux::Mode::Client);

    // Half a request, then silence.
    let mut stuck = open_with(&raw, &[1]).await;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 8];
    let n = within(60, "stuck stream ends", stuck.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to a half handshake");
    assert!(started.elapsed() >= timeout);

    // The session still serves proper handshakes, byte for byte as documented.
    let (_good, reply) = handshake_for_abc(&raw).await;
    assert_eq!(reply, [1, 0]);
    assert!(!server.is_closed());
}

#[tokio::test]
async fn unsupported_version_and_bad_names_are_refused_with_a_reason() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = Session::server(a, Config::default());
    let raw = YamuxPeer::start(b, yamux::Mode::Client);

    let reply = whole_answer(&raw, &[9, 1, b'x'], "version refusal").await;
    assert_eq!(&reply[..2], &[1, 5]);
    assert_eq!(usize::from(reply[2]), reply.len() - 3);
    assert!(String::from_utf8_lossy(&reply[3..]).contains("version 9"));

    let reply = whole_answer(&raw, &[1, 2, b'a', b'\n'], "name refusal").await;
    assert_eq!(&reply[..2], &[1, 4]);

    let reply = whole_answer(&raw, &[1, 4, b'n', b'o', b'n', b'e'], "no listener").await;
    assert_eq!(&reply[..2], &[1, 1]);
    assert!(!server.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_unfinished_handshakes_is_reset_stream_by_stream_and_the_session_survives() {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let config = Config::default()
        .max_pending_handshakes(8)
        .max_channels(16)
        .handshake_timeout(Duration::from_secs(5));
    let server = Session::server(a, config);
    let _listener = server.listen("abc").unwrap();
    let raw = YamuxPeer::start(b, yamux::Mode::Client);

    // 200 streams, each stuck after one byte of its request: far more than the 16 + 2 × 8 + 8
    // streams yamux would accept before killing the whole connection.
    let mut stuck = Vec::new();
    for _ in 0..200 {
        stuck.push(open_with(&raw, &[1]).await);
    }
    // Every one of them ends (reset at once beyond the 8 being served, the 8 after the
    // handshake timeout); none gets an answer.
    for (i, s) in stuck.iter_mut().enumerate() {
        let mut buf = [0u8; 4];
        let n = within(60, "stuck stream ends", s.read(&mut buf))
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "stream {i} got an answer");
    }
    assert!(!server.is_closed(), "the flood killed the session");
    let (_good, reply) = handshake_for_abc(&raw).await;
    assert_eq!(reply, [1, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_full_accept_backlog_refuses_new_channels_as_busy() {
    let timeout = Duration::from_secs(4);
    let (client, server) = common::duplex_sessions(
        Config::default().handshake_timeout(timeout),
        Config::default()
            .handshake_timeout(timeout)
            .accept_backlog(1),
    );
    // Registered but never accepting: the first channel fills the backlog.
    let listener = server.listen("lazy").unwrap();
    let _queued = within(5, "first dial", client.dial("lazy")).await.unwrap();
    let started = tokio::time::Instant::now();
    match within(60, "second dial", client.dial("lazy")).await {
        Err(Error::Refused { name, reason }) => {
            assert_eq!(name, "lazy");
            assert!(reason.contains("backlog full"), "{reason}");
        }
        other => panic!("expected a busy refusal, got {other:?}"),
    }
    assert!(started.elapsed() >= timeout / 2);
    drop(listener);
}

/// Regression: `accept_backlog` was used unclamped as a tokio channel capacity, and tokio
/// panics above `usize::MAX >> 3`, so `accept_backlog(usize::MAX)` ("unbounded backlog")
/// panicked in `listen`. No more than `max_channels` channels can ever wait in a backlog
/// (each holds a channel slot), so the capacity is clamped to that.
#[tokio::test]
async fn a_huge_accept_backlog_is_clamped_instead_of_panicking_in_listen() {
    let (client, server) = common::duplex_sessions(
        Config::default(),
        Config::default().accept_backlog(usize::MAX),
    );
    let listener = server.listen("echo").expect("listen with a huge backlog");
    common::spawn_echo(listener);
    let reply = within(5, "round trip", common::round_trip(&client, "echo", b"ok")).await;
    assert_eq!(reply, b"ok");
}
