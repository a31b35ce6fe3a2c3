//! Channel and session semantics of netchan's yamux engine: reset, GoAway drain, listen race,
//! waiting dials, the worst-case memory bound, and hostile frames.

mod common;

use common::{duplex_sessions, spawn_echo, within};
use netchan_mux::{CloseReason, Config, Error, Mode, Session, Violation};
use std::{io, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_reset_reads_and_writes_as_connection_reset_on_the_peer_never_as_eof() {
    let (client, server) = duplex_sessions(Config::default(), Config::default());
    let mut listener = server.listen("r").unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let mut dialed = within(5, "dial", client.dial("r")).await.unwrap();
    let mut accepted = within(5, "accept", accept).await.unwrap();
    dialed.write_all(b"partial").await.unwrap();
    let mut buf = [0u8; 7];
    within(5, "data", accepted.read_exact(&mut buf))
        .await
        .unwrap();
    dialed.reset();
    let err = within(5, "read after reset", accepted.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    let err = accepted.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(!client.is_closed() && !server.is_closed());
}

#[tokio::test]
async fn a_peers_go_away_stops_new_channels_while_open_ones_drain_both_ways() {
    let (client, server) = duplex_sessions(Config::default(), Config::default());
    spawn_echo(server.listen("echo").unwrap());
    let mut back_listener = client.listen("back").unwrap();
    let mut conn = within(5, "dial", client.dial("echo")).await.unwrap();

    let closer = client.clone();
    let closing = tokio::spawn(async move { closer.close().await });
    // The server learns of the GoAway and dials no more; bounded: each failed attempt is
    // answered by the client's session.
    let refused = within(5, "server dial after go-away", async {
        loop {
            match server.dial("back").await {
                Err(Error::SessionClosed(CloseReason::Peer)) => return,
                Err(Error::SessionClosed(CloseReason::Local)) => return,
                Ok(_) | Err(Error::Refused { .. }) => tokio::task::yield_now().await,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
    });
    refused.await;
    assert!(
        !server.is_closed(),
        "go-away must not end the peer's session"
    );
    // The open channel still works to its end.
    conn.write_all(b"drain me").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(5, "drain", conn.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"drain me");
    drop(conn);
    within(5, "close completes", closing).await.unwrap();
    assert!(matches!(
        within(5, "server ends", server.closed()).await,
        CloseReason::Peer
    ));
    assert!(back_listener.accept().await.is_err());
}

#[tokio::test]
async fn listeners_registered_on_the_builder_see_the_very_first_dial() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let client = Session::client(a, Config::default());
    // The client dials before the server side has even started.
    let dial = tokio::spawn({
        let client = client.clone();
        async move { client.dial("early").await }
    });
    tokio::task::yield_now().await;
    let builder = Session::builder(b, Mode::Server, Config::default());
    let mut early = builder.listen("early").unwrap();
    let _server = builder.start();
    let mut dialed = within(5, "early dial", dial).await.unwrap().unwrap();
    let mut accepted = within(5, "accept", early.accept()).await.unwrap();
    dialed.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 5];
    within(5, "read", accepted.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"first");
}

#[tokio::test]
async fn dropping_an_unstarted_builder_ends_its_session() {
    let (_a, b) = tokio::io::duplex(1024);
    let builder = Session::builder(b, Mode::Server, Config::default());
    let mut listener = builder.listen("x").unwrap();
    let session = builder.session().clone();
    drop(builder);
    assert!(session.is_closed());
    assert!(matches!(
        listener.accept().await,
        Err(Error::SessionClosed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn dial_waiting_waits_for_a_listener_the_peer_registers_late() {
    let (client, server) = duplex_sessions(Config::default(), Config::default());
    // Fast by default.
    assert!(matches!(
        client.dial("late").await,
        Err(Error::NoListener { .. })
    ));
    let started = tokio::time::Instant::now();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.dial_waiting("late", Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut listener = server.listen("late").unwrap();
    let conn = within(60, "waiting dial", waiting).await.unwrap().unwrap();
    assert_eq!(conn.name(), "late");
    within(5, "accept", listener.accept()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));

    // With nobody ever listening, it gives up after the bound.
    let started = tokio::time::Instant::now();
    let err = within(
        60,
        "bounded wait",
        client.dial_waiting("never", Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NoListener { .. }), "{err:?}");
    let waited = started.elapsed();
    assert!(
        waited <= Duration::from_secs(2) && waited >= Duration::from_millis(1500),
        "{waited:?}"
    );
}

/// Pins the documented worst case: channels whose windows are filled and never read hold
/// exactly their 256 KiB windows (no growth without reads), within `worst_case_buffered`.
#[tokio::test(start_paused = true)]
async fn unread_channels_hold_exactly_their_windows_within_the_documented_worst_case() {
    let config = Config::default()
        .max_channels(3)
        .max_pending_handshakes(1)
        .receive_window_growth(1024 * 1024);
    assert_eq!(
        config.worst_case_buffered(),
        (3 + 2 + 8) * 256 * 1024 + 1024 * 1024
    );
    let (client, server) = duplex_sessions(Config::default(), config.clone());
    let mut listener = server.listen("sink").unwrap();
    let mut held = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..3 {
        let mut conn = within(5, "dial", client.dial("sink")).await.unwrap();
        held.push(within(5, "accept", listener.accept()).await.unwrap());
        writers.push(tokio::spawn(async move {
            let block = vec![1u8; 64 * 1024];
            // Bounded: blocks for good once the window is used up.
            for _ in 0..64 {
                conn.write_all(&block).await.unwrap();
            }
        }));
    }
    // Paused time only advances once every task is idle: the writers are then blocked.
    for _ in 0..1000 {
        if server.buffered_bytes() >= 3 * (256 * 1024 - 6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Each window also carried the 6-byte handshake request ("sink"), read by the session and
    // not yet worth a window update.
    assert_eq!(server.buffered_bytes(), 3 * (256 * 1024 - 6));
    assert!(server.buffered_bytes() <= config.worst_case_buffered());
    assert!(writers.iter().all(|w| !w.is_finished()));
}

/// Sends `frames` as a raw peer in client mode and returns why the session ended.
async fn hostile(frames: Vec<u8>, read_answers: bool) -> CloseReason {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let session = Session::server(ours, Config::default());
    let (mut r, mut w) = tokio::io::split(theirs);
    if read_answers {
        tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    } else {
        std::mem::forget(r);
    }
    tokio::spawn(async move {
        let _ = w.write_all(&frames).await;
        // Keep the link open: the session must end because of the frames alone.
        std::future::pending::<()>().await;
        drop(w);
    });
    within(10, "hostile peer ends the session", session.closed()).await
}

fn frame(ty: u8, flags: u16, stream: u32, length: u32) -> Vec<u8> {
    let mut f = vec![0, ty];
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&length.to_be_bytes());
    f
}

/// What a hostile case is called, its bytes, whether its peer reads our answers, and the
/// violation it must end with.
type Case = (&'static str, Vec<u8>, bool, fn(&Violation) -> bool);

#[tokio::test]
async fn hostile_frames_end_only_their_session_with_a_typed_reason() {
    // A healthy session on the same runtime carries on throughout.
    let (client, server) = duplex_sessions(Config::default(), Config::default());
    spawn_echo(server.listen("echo").unwrap());

    let mut bad_version = frame(0, 0, 1, 0);
    bad_version[0] = 1;
    let mut overflow = frame(1, 1, 1, 0);
    overflow.extend(frame(1, 0, 1, u32::MAX));
    let mut duplicate = frame(1, 1, 1, 0);
    duplicate.extend(frame(1, 1, 1, 0));
    let empty_flood: Vec<u8> = std::iter::once(frame(1, 1, 1, 0))
        .chain((0..5000).map(|_| frame(0, 0, 1, 0)))
        .flatten()
        .collect();
    let ping_flood: Vec<u8> = (0..5000u32).flat_map(|i| frame(2, 1, 0, i)).collect();
    let cases: Vec<Case> = vec![
        ("bad version", bad_version, true, |v| {
            matches!(v, Violation::BadVersion { version: 1 })
        }),
        ("bad type", frame(9, 0, 1, 0), true, |v| {
            matches!(v, Violation::BadType { ty: 9 })
        }),
        ("window overflow", overflow, true, |v| {
            matches!(v, Violation::WindowOverflow { stream: 1 })
        }),
        ("data on stream 0", frame(0, 0, 0, 1), true, |v| {
            matches!(v, Violation::StreamZero { .. })
        }),
        ("wrong parity", frame(1, 1, 2, 0), true, |v| {
            matches!(v, Violation::WrongParity { stream: 2 })
        }),
        ("duplicate syn", duplicate, true, |v| {
            matches!(v, Violation::DuplicateSyn { stream: 1 })
        }),
        ("oversized frame", frame(0, 1, 1, 1 << 30), true, |v| {
            matches!(v, Violation::WindowExceeded { .. })
        }),
        ("empty-frame flood", empty_flood, true, |v| {
            matches!(v, Violation::Flood { .. })
        }),
        ("ping flood, answers unread", ping_flood, false, |v| {
            matches!(v, Violation::Flood { .. })
        }),
    ];
    for (what, bytes, read_answers, expected) in cases {
        let reason = hostile(bytes, read_answers).await;
        match &reason {
            CloseReason::ProtocolViolation(v) => assert!(expected(v), "{what}: {v:?}"),
            other => panic!("{what}: ended with {other:?}"),
        }
        assert!(reason.is_error());
        assert_eq!(
            within(
                5,
                "healthy session",
                common::round_trip(&client, "echo", b"ok")
            )
            .await,
            b"ok",
            "{what}"
        );
    }
}
