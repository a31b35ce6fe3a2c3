//! Opening, naming, using and closing channels: the everyday paths of a session.

mod common;

use common::{round_trip, spawn_echo, tcp_sessions, within};
use netchan_mux::{Config, Error};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn slow_handshakes() -> Config {
    // A long handshake timeout: anything that "fails fast" cannot be a timeout.
    Config::default().handshake_timeout(Duration::from_secs(60))
}

#[tokio::test]
async fn dial_to_unknown_name_fails_fast_naming_it() {
    let (client, _server) = tcp_sessions(slow_handshakes(), slow_handshakes()).await;
    let err = within(5, "dial", client.dial("nobody-home"))
        .await
        .unwrap_err();
    match err {
        Error::NoListener { name } => assert_eq!(name, "nobody-home"),
        other => panic!("expected NoListener, got {other:?}"),
    }
    assert!(err_message_names(
        &client.dial("nobody-home").await.unwrap_err(),
        "nobody-home"
    ));
}

fn err_message_names(err: &Error, name: &str) -> bool {
    err.to_string().contains(name)
}

#[tokio::test]
async fn both_peers_listen_and_dial_on_one_link_at_once() {
    let (client, server) = tcp_sessions(Config::default(), Config::default()).await;
    spawn_echo(client.listen("on-client").unwrap());
    spawn_echo(server.listen("on-server").unwrap());
    let mut calls = Vec::new();
    for i in 0..20u32 {
        let (c, s) = (client.clone(), server.clone());
        calls.push(tokio::spawn(async move {
            let payload = format!("from client {i}").into_bytes();
            assert_eq!(round_trip(&c, "on-server", &payload).await, payload);
        }));
        calls.push(tokio::spawn(async move {
            let payload = format!("from server {i}").into_bytes();
            assert_eq!(round_trip(&s, "on-client", &payload).await, payload);
        }));
    }
    within(20, "40 crossing round trips", async {
        for call in calls {
            call.await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn second_listen_on_a_name_in_use_fails() {
    let (client, _server) = common::duplex_sessions(Config::default(), Config::default());
    let _first = client.listen("svc").unwrap();
    match client.listen("svc") {
        Err(Error::NameInUse { name }) => assert_eq!(name, "svc"),
        other => panic!("expected NameInUse, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_names_are_rejected_on_listen_and_dial() {
    let (client, _server) = common::duplex_sessions(Config::default(), Config::default());
    let long = "x".repeat(256);
    for bad in ["", "line\nbreak", "nul\0", long.as_str()] {
        assert!(
            matches!(client.listen(bad), Err(Error::InvalidName { .. })),
            "listen({bad:?})"
        );
        assert!(
            matches!(client.dial(bad).await, Err(Error::InvalidName { .. })),
            "dial({bad:?})"
        );
    }
    // The longest valid name and non-ASCII names are fine.
    assert!(client.listen(&"x".repeat(255)).is_ok());
    assert!(client.listen("fichiers/élodie").is_ok());
}

#[tokio::test]
async fn dropping_a_listener_frees_the_name_and_later_dials_get_no_listener() {
    let (client, server) = tcp_sessions(slow_handshakes(), slow_handshakes()).await;
    let listener = server.listen("svc").unwrap();
    let echo = spawn_echo(listener);
    assert_eq!(round_trip(&client, "svc", b"one").await, b"one");
    echo.abort();
    let _ = echo.await; // the aborted task drops the listener
    let err = within(5, "dial after drop", client.dial("svc"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoListener { .. }), "{err:?}");
    // The name is free again.
    spawn_echo(server.listen("svc").unwrap());
    assert_eq!(round_trip(&client, "svc", b"two").await, b"two");
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    let (client, server) = tcp_sessions(Config::default(), Config::default()).await;
    let mut listener = server.listen("half").unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });

    // Dialer half-closes first; the listener reads EOF and can still answer.
    let mut dialed = within(5, "dial", client.dial("half")).await.unwrap();
    let mut accepted = within(5, "accept", accept).await.unwrap();
    dialed.write_all(b"request").await.unwrap();
    dialed.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(5, "read to eof", accepted.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"request");
    accepted.write_all(b"response").await.unwrap();
    accepted.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(5, "read answer", dialed.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"response");

    // The listening side half-closes first; the dialer can still write afterwards.
    let mut listener = server.listen("half2").unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let mut dialed = within(5, "dial", client.dial("half2")).await.unwrap();
    let mut accepted = within(5, "accept", accept).await.unwrap();
    accepted.write_all(b"greeting").await.unwrap();
    accepted.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(5, "read greeting", dialed.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"greeting");
    dialed.write_all(b"late words").await.unwrap();
    dialed.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(5, "read late words", accepted.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"late words");
}

#[tokio::test]
async fn bytes_written_right_after_dial_are_neither_lost_nor_reordered() {
    let (client, server) = tcp_sessions(Config::default(), Config::default()).await;
    let mut listener = server.listen("seq").unwrap();
    let reader = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut conn = within(5, "dial", client.dial("seq")).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..2000u32 {
        let chunk = i.to_be_bytes();
        conn.write_all(&chunk).await.unwrap();
        expected.extend_from_slice(&chunk);
    }
    conn.shutdown().await.unwrap();
    let got = within(10, "reader", reader).await.unwrap();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn split_conn_reads_and_writes_from_two_tasks_without_deadlock() {
    let (client, server) = tcp_sessions(Config::default(), Config::default()).await;
    spawn_echo(server.listen("echo").unwrap());
    let conn = within(5, "dial", client.dial("echo")).await.unwrap();
    let (mut r, mut w) = tokio::io::split(conn);
    // Far more than the 256 KiB window: the writer must wait for the reader to make room.
    const TOTAL: usize = 8 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..TOTAL / block.len() {
            w.write_all(&block).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut total = 0usize;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, ((total + k) % (64 * 1024) % 251) as u8);
            }
            total += n;
        }
        total
    });
    within(60, "split echo", async {
        writer.await.unwrap();
        assert_eq!(reader.await.unwrap(), TOTAL);
    })
    .await;
}

#[tokio::test]
async fn a_thousand_channels_open_at_once_each_echo_a_distinct_payload() {
    let cfg = || Config::default().max_channels(1100);
    let (client, server) = tcp_sessions(cfg(), cfg()).await;
    spawn_echo(server.listen("echo").unwrap());
    let mut calls = Vec::with_capacity(1000);
    for i in 0..1000u32 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            // Distinct length and content per channel.
            let len = 100 + (i as usize * 37) % 4000;
            let payload: Vec<u8> = (0..len).map(|k| (i as usize * 31 + k * 7) as u8).collect();
            let back = round_trip(&client, "echo", &payload).await;
            assert_eq!(back, payload, "channel {i}");
        }));
    }
    within(60, "1000 channels", async {
        for call in calls {
            call.await.unwrap();
        }
    })
    .await;
}

/// Dropping a `Conn` is a close, not an abort: the bytes written just before the drop arrive
/// (regression: with the `yamux` crate a drop sent RST, and a Go peer discarded the unread
/// answer), then EOF; the peer's writes after that are answered with RST and fail with
/// `ConnectionReset` instead of piling up unread.
#[tokio::test]
async fn dropping_a_conn_delivers_its_bytes_then_eof_and_later_peer_writes_fail_with_reset() {
    let (client, server) = common::duplex_sessions(Config::default(), Config::default());
    let mut listener = server.listen("drop").unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let mut dialed = within(5, "dial", client.dial("drop")).await.unwrap();
    let mut accepted = within(5, "accept", accept).await.unwrap();
    dialed.write_all(b"bye").await.unwrap();
    drop(dialed);
    let mut got = Vec::new();
    within(5, "read to eof", accepted.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"bye");
    // The first writes may be in flight before the RST comes back; the window (256 KiB)
    // bounds how many can succeed, so the loop ends well within 64 MiB.
    let err = within(5, "write after peer drop", async {
        let block = [7u8; 1024];
        for _ in 0..64 * 1024 {
            if let Err(e) = accepted.write_all(&block).await {
                return e;
            }
            tokio::task::yield_now().await;
        }
        panic!("64 MiB written to a dropped channel");
    })
    .await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    // The session itself is unaffected.
    assert!(!client.is_closed() && !server.is_closed());
}

#[tokio::test]
async fn a_byte_stream_that_takes_tiny_writes_still_carries_everything_in_order() {
    // A 512-byte pipe forces partial writes and reads at every layer under yamux.
    let (a, b) = tokio::io::duplex(512);
    let client = netchan_mux::Session::client(a, Config::default());
    let server = netchan_mux::Session::server(b, Config::default());
    spawn_echo(server.listen("echo").unwrap());
    let payload: Vec<u8> = (0..1024 * 1024)
        .map(|i: usize| (i * 13 % 256) as u8)
        .collect();
    let small = b"small and early".to_vec();
    let (big, little) = within(60, "two echoes over a tiny pipe", async {
        tokio::join!(
            round_trip(&client, "echo", &payload),
            round_trip(&client, "echo", &small)
        )
    })
    .await;
    assert!(big == payload, "1 MiB echo corrupted");
    assert_eq!(little, small);
}
