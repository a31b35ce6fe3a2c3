//! Conn-level behaviour: loss of the peer, oversize messages, malformed
//! frames, version checks — driven by hand-written bytes where needed.

mod common;

use std::time::Duration;

use common::*;
use netchan_rpc::{CallOptions, Client, Code, Config, Error, Server, ServiceDef, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const PREAMBLE: &[u8] = b"NCRPC\x02";

/// Appends a frame (length prefix + body).
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// A Request header for `method` with id < 251, no metadata, and `timeout`.
fn request(id: u8, method: &str, timeout_ns: Option<u32>) -> Vec<u8> {
    assert!(id < 251 && method.len() < 251);
    let mut b = vec![0x00, id, method.len() as u8];
    b.extend_from_slice(method.as_bytes());
    match timeout_ns {
        None => b.push(0),
        Some(ns) => {
            b.extend_from_slice(&[0x01, 0xfc]);
            b.extend_from_slice(&ns.to_le_bytes());
        }
    }
    b.extend_from_slice(&[0x00, 0x00]); // unary, no metadata
    b
}

/// A served duplex whose client side the test drives by hand.
fn raw_server(server: &Server) -> (DuplexStream, tokio::task::JoinHandle<Result<(), Error>>) {
    let (a, b) = tokio::io::duplex(64 << 10);
    let server = server.clone();
    (a, tokio::spawn(async move { server.serve(b).await }))
}

async fn read_frame(io: &mut DuplexStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    io.read_exact(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn losing_the_conn_fails_every_pending_call_with_unavailable_promptly() {
    let server = test_server(Config::default());
    let (client, task) = tcp_pair(&server, Config::default()).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.call::<_, u64>("Test.sleep_ms", &600_000u64).await })
        })
        .collect();
    // Wait until all are on the wire by completing a later call.
    let _: String = guard(client.call("Test.echo", "sync")).await.unwrap();
    task.abort(); // the server goes away: its conn is dropped
    for call in calls {
        let err = guard(call).await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.is_conn_lost(), "{err}");
    }
    guard(client.closed()).await;
    let err = guard(client.call::<_, String>("Test.echo", "late"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.is_conn_lost(), "{err}");
}

#[tokio::test]
async fn an_unavailable_status_sent_by_the_server_is_not_a_lost_conn() {
    let mut server = Server::new();
    server.add(ServiceDef::new("T").unary("down", |_ctx, ()| async move {
        Err::<(), _>(Status::unavailable("backend down"))
    }));
    let (client, _task) = tcp_pair(&server, Config::default()).await;
    let err = guard(client.call::<_, ()>("T.down", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(!err.is_conn_lost(), "the conn is fine: {err}");
}

#[tokio::test]
async fn a_client_whose_peer_never_answers_the_preamble_fails_after_the_handshake_timeout() {
    let (a, _b) = tokio::io::duplex(1024);
    let client = Client::with_config(
        a,
        Config::default().handshake_timeout(Duration::from_millis(200)),
    );
    let err = guard(client.call::<_, String>("Test.echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("preamble"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_server_whose_peer_stays_silent_ends_with_a_handshake_timeout() {
    let server = Server::with_config(Config::default().handshake_timeout(Duration::from_secs(3)));
    let (_silent, b) = tokio::io::duplex(1024);
    let res = guard(server.serve(b)).await;
    assert!(
        matches!(res, Err(Error::HandshakeTimeout { after }) if after == Duration::from_secs(3)),
        "{res:?}"
    );
}

#[tokio::test]
async fn oversize_request_is_refused_before_sending() {
    let server = test_server(Config::default());
    let config = Config::default().max_message_size(4096);
    let (client, _t) = duplex_pair(&server, config);
    let big = "x".repeat(10_000);
    let err = guard(client.call::<_, String>("Test.echo", &big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("4096"), "{err}");
    // Nothing half-sent: the conn still works.
    let ok: String = guard(client.call("Test.echo", "small")).await.unwrap();
    assert_eq!(ok, "small");
}

#[tokio::test]
async fn oversize_response_becomes_resource_exhausted_for_that_call_only() {
    let server = test_server(Config::default().max_message_size(4096));
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, Vec<u8>>("Test.blob", &10_000usize))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let small: Vec<u8> = guard(client.call("Test.blob", &100usize)).await.unwrap();
    assert_eq!(small.len(), 100);
}

#[tokio::test]
async fn an_oversize_length_prefix_ends_that_conn_only() {
    let server = test_server(Config::default().max_message_size(4096));
    let (good, _t) = duplex_pair(&server, Config::default());
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    // Announce a 1 GiB frame; send nothing more.
    raw.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(
        matches!(res, Err(Error::FrameTooLarge { len, max: 4096 }) if len == 1 << 30),
        "{res:?}"
    );
    let ok: String = guard(good.call("Test.echo", "unaffected")).await.unwrap();
    assert_eq!(ok, "unaffected");
}

/// Regression for issue 24, item 1: a response over the client's limit
/// reset the whole conn (`UNAVAILABLE`), every other call with it. The
/// server knows the client's limit from its announcement and refuses the
/// response before sending it.
#[tokio::test]
async fn a_response_over_the_clients_limit_fails_alone_naming_the_limit() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default().max_message_size(4096));
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.call::<_, u64>("Test.sleep_ms", &50u64).await })
    };
    let err = guard(client.call::<_, Vec<u8>>("Test.blob", &100_000usize))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains("is over the client's max_message_size of 4096 bytes"),
        "{err}"
    );
    let small: Vec<u8> = guard(client.call("Test.blob", &100usize)).await.unwrap();
    assert_eq!(small.len(), 100);
    assert_eq!(guard(slow).await.unwrap().unwrap(), 50);
}

/// The other direction of issue 24, item 1: a request over the server's
/// limit fails alone. The first one races the server's announcement (the
/// server answers it alone); once the client knows the limit it refuses
/// before sending.
#[tokio::test]
async fn a_request_over_the_servers_limit_fails_alone_and_later_ones_are_not_sent() {
    let server = test_server(Config::default().max_message_size(4096));
    let (client, _t) = duplex_pair(&server, Config::default());
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.call::<_, u64>("Test.sleep_ms", &50u64).await })
    };
    let big = "x".repeat(10_000);
    let err = guard(client.call::<_, String>("Test.echo", &big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains("the server's max_message_size of 4096 bytes"),
        "{err}"
    );
    let ok: String = guard(client.call("Test.echo", "small")).await.unwrap();
    assert_eq!(ok, "small");
    // The server's announcement came before that answer: refused locally now.
    let err = guard(client.call::<_, String>("Test.echo", &big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        err.message(),
        "request to Test.echo is over the server's max_message_size of 4096 bytes; not sent"
    );
    assert_eq!(guard(slow).await.unwrap().unwrap(), 50);
}

/// The limit announcement: `Credit` for call 0 with the sender's
/// `max_message_size` (docs/protocol.md, Part 2).
fn announcement(max: u32) -> Vec<u8> {
    let mut body = vec![0x05, 0x00, 0xfc];
    body.extend_from_slice(&max.to_le_bytes());
    frame(&body)
}

#[tokio::test]
async fn a_server_answers_an_oversized_request_alone_once_the_client_announced_its_limit() {
    let server = test_server(Config::default().max_message_size(4096));
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    // A client allowing 1 MiB announces it, then sends a 10 000-byte request
    // before it could learn the server's limit, then a small one.
    raw.write_all(&announcement(1 << 20)).await.unwrap();
    let mut big = request(1, "Test.echo", None);
    big.extend_from_slice(&[0xfb, 0x10, 0x27]); // string of 10 000 bytes
    big.extend_from_slice(&[b'x'; 10_000]);
    raw.write_all(&frame(&big)).await.unwrap();
    let mut small = request(2, "Test.echo", None);
    small.extend_from_slice(&[0x02, b'h', b'i']);
    raw.write_all(&frame(&small)).await.unwrap();
    let mut preamble = [0u8; 6];
    guard(raw.read_exact(&mut preamble)).await.unwrap();
    assert_eq!(&preamble, PREAMBLE);
    // The server's own announcement: 4096 = fb 00 10.
    assert_eq!(
        guard(read_frame(&mut raw)).await,
        [0x05, 0x00, 0xfb, 0x00, 0x10]
    );
    // Response { id 1, Some(RESOURCE_EXHAUSTED = 8, message) }.
    let resp = guard(read_frame(&mut raw)).await;
    assert_eq!(&resp[..4], &[0x01, 0x01, 0x01, 0x08], "{resp:02x?}");
    let message = String::from_utf8_lossy(&resp[5..]);
    assert_eq!(
        message,
        "the 10018-byte request to Test.echo is over the server's max_message_size of 4096 bytes"
    );
    let resp = guard(read_frame(&mut raw)).await;
    assert_eq!(resp, [0x01, 0x02, 0x00, 0x02, b'h', b'i']);
    drop(raw);
    assert!(guard(task).await.unwrap().is_ok());
}

#[tokio::test]
async fn a_client_fails_an_oversized_response_alone_and_keeps_the_conn() {
    // A hand-driven server that announces a 1 MiB limit and then answers
    // call 1 with more than the client's 4 KiB.
    let (conn, mut raw) = tokio::io::duplex(64 << 10);
    let client = Client::with_config(conn, Config::default().max_message_size(4096));
    let first = {
        let c = client.clone();
        tokio::spawn(async move { c.call::<_, Vec<u8>>("Test.blob", &5000usize).await })
    };
    raw.write_all(PREAMBLE).await.unwrap();
    raw.write_all(&announcement(1 << 20)).await.unwrap();
    let mut preamble = [0u8; 6];
    guard(raw.read_exact(&mut preamble)).await.unwrap();
    assert_eq!(
        guard(read_frame(&mut raw)).await,
        [0x05, 0x00, 0xfb, 0x00, 0x10]
    );
    let req = guard(read_frame(&mut raw)).await;
    assert_eq!(&req[..2], &[0x00, 0x01], "{req:02x?}");
    // Response { id 1, None }, then a 5000-byte payload (fb 88 13 = 5000).
    let mut resp = vec![0x01, 0x01, 0x00, 0xfb, 0x88, 0x13];
    resp.extend_from_slice(&[7; 5000]);
    raw.write_all(&frame(&resp)).await.unwrap();
    let err = guard(first).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        err.message(),
        "the server sent a 5006-byte response, over this client's max_message_size of 4096 bytes"
    );
    // The conn carries on: call 2 is answered.
    let second = {
        let c = client.clone();
        tokio::spawn(async move { c.call::<_, String>("Test.echo", "ok").await })
    };
    let req = guard(read_frame(&mut raw)).await;
    assert_eq!(&req[..2], &[0x00, 0x02], "{req:02x?}");
    raw.write_all(&frame(&[0x01, 0x02, 0x00, 0x02, b'o', b'k']))
        .await
        .unwrap();
    assert_eq!(guard(second).await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn a_frame_over_the_limit_from_a_peer_that_announced_none_still_ends_the_conn() {
    // A peer of the version before the announcement: nothing says the frame
    // was sent in ignorance of our limit, so the conn ends before reading it.
    let server = test_server(Config::default().max_message_size(4096));
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    raw.write_all(&5000u32.to_be_bytes()).await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(
        matches!(
            res,
            Err(Error::FrameTooLarge {
                len: 5000,
                max: 4096
            })
        ),
        "{res:?}"
    );
}

#[tokio::test]
async fn a_malformed_frame_ends_that_conn_with_a_typed_error_and_others_live_on() {
    let server = test_server(Config::default());
    let (good, _t) = duplex_pair(&server, Config::default());
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    // Envelope kind 10 does not exist.
    raw.write_all(&frame(&[0x0a, 0x01, 0x02])).await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(matches!(res, Err(Error::Malformed(_))), "{res:?}");
    // Kind 9 (file descriptors) on a conn that cannot carry them.
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    raw.write_all(&frame(&[0x09, 0x01, 0x02])).await.unwrap();
    let res = guard(task).await.unwrap();
    match res {
        Err(Error::Protocol { reason }) => assert!(reason.contains("cannot carry"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let ok: String = guard(good.call("Test.echo", "unaffected")).await.unwrap();
    assert_eq!(ok, "unaffected");
}

#[tokio::test]
async fn a_response_frame_sent_to_a_server_is_a_protocol_error() {
    let server = test_server(Config::default());
    let (mut raw, task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    raw.write_all(&frame(&[0x01, 0x01, 0x00])).await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(matches!(res, Err(Error::Protocol { .. })), "{res:?}");
}

#[tokio::test]
async fn a_hand_written_request_gets_the_documented_response_bytes() {
    let server = test_server(Config::default());
    let (mut raw, _task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    // Test.echo("hi"): payload is the string: len 2, "hi".
    let mut body = request(5, "Test.echo", None);
    body.extend_from_slice(&[0x02, b'h', b'i']);
    raw.write_all(&frame(&body)).await.unwrap();
    let mut preamble = [0u8; 6];
    guard(raw.read_exact(&mut preamble)).await.unwrap();
    assert_eq!(&preamble, PREAMBLE);
    let resp = guard(read_frame(&mut raw)).await;
    // Response { id: 5, status: None }, then the payload "hi".
    assert_eq!(resp, [0x01, 0x05, 0x00, 0x02, b'h', b'i']);
}

#[tokio::test(start_paused = true)]
async fn the_server_enforces_a_deadline_on_its_own() {
    // A hand-driven client that never cancels: the answer must come from
    // the server's own deadline.
    let server = test_server(Config::default());
    let (mut raw, _task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    let mut body = request(9, "Test.sleep_ms", Some(100_000_000)); // 100 ms
    body.extend_from_slice(&[0xfc]);
    body.extend_from_slice(&600_000u32.to_le_bytes()); // sleep 10 min
    raw.write_all(&frame(&body)).await.unwrap();
    let mut preamble = [0u8; 6];
    guard(raw.read_exact(&mut preamble)).await.unwrap();
    let started = tokio::time::Instant::now();
    let resp = guard(read_frame(&mut raw)).await;
    // Response { id: 9, status: Some(DEADLINE_EXCEEDED = 4, ..) }
    assert_eq!(&resp[..4], &[0x01, 0x09, 0x01, 0x04], "{resp:02x?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_zero_timeout_on_the_wire_is_already_expired() {
    let server = test_server(Config::default());
    let (mut raw, _task) = raw_server(&server);
    raw.write_all(PREAMBLE).await.unwrap();
    let mut body = request(3, "Test.echo", Some(0));
    body.extend_from_slice(&[0x01, b'x']);
    raw.write_all(&frame(&body)).await.unwrap();
    let mut preamble = [0u8; 6];
    guard(raw.read_exact(&mut preamble)).await.unwrap();
    let resp = guard(read_frame(&mut raw)).await;
    assert_eq!(&resp[..4], &[0x01, 0x03, 0x01, 0x04], "{resp:02x?}");
}

#[tokio::test]
async fn version_mismatch_is_reported_on_both_sides() {
    // A server facing a client from the future.
    let server = test_server(Config::default());
    let (mut raw, task) = raw_server(&server);
    raw.write_all(b"NCRPC\x07").await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(
        matches!(res, Err(Error::VersionMismatch { ours: 2, theirs: 7 })),
        "{res:?}"
    );
    // A client facing a server from the future.
    let (a, mut b) = tokio::io::duplex(1024);
    let client = Client::new(a);
    b.write_all(b"NCRPC\x07").await.unwrap();
    let err = guard(client.call::<_, String>("Test.echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("version"), "{err}");
}

#[tokio::test]
async fn a_peer_that_is_not_speaking_rpc_is_rejected() {
    let server = test_server(Config::default());
    let (mut raw, task) = raw_server(&server);
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let res = guard(task).await.unwrap();
    assert!(matches!(res, Err(Error::BadPreamble { .. })), "{res:?}");
}

#[tokio::test]
async fn a_call_waiting_on_a_dead_conn_never_hangs_even_without_a_deadline() {
    let (a, b) = tokio::io::duplex(1024);
    let client = Client::new(a);
    let c = client.clone();
    let call = tokio::spawn(async move {
        c.call_with::<_, String>("Test.echo", "x", CallOptions::default())
            .await
    });
    drop(b);
    let err = guard(call).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}
