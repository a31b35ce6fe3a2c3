//! Bidi (bidirectional-streaming) and client streaming: ordering, credit-based flow control
//! for the requests, ends, errors and conn loss.

mod common;

use std::time::Duration;

use common::*;
use futures::{stream, StreamExt};
use netchan_rpc::{
    CallOptions, Code, Config, Error, RequestSink, RequestStream, ResponseStream, Server, Status,
};
use tokio::io::AsyncWriteExt;

fn bidi_server(config: Config) -> Server {
    let mut server = test_server(config);
    server
        .register_bidi("B.echo", |_ctx, reqs: RequestStream<u64>| async move {
            Ok(reqs.map(|r| r.map(|n| n * 10)))
        })
        .register_bidi("B.sum", |_ctx, mut reqs: RequestStream<u64>| async move {
            let mut total = 0u64;
            while let Some(n) = reqs.next().await {
                total += n?;
            }
            Ok(stream::once(async move { Ok::<_, Status>(total) }))
        })
        .register_bidi("B.deaf", |_ctx, _reqs: RequestStream<u64>| async move {
            std::future::pending::<Result<stream::Empty<Result<u64, Status>>, Status>>().await
        })
        .register_bidi("B.ignore", |_ctx, _reqs: RequestStream<u64>| async move {
            Ok(stream::empty::<Result<u64, Status>>())
        });
    server
}

#[tokio::test]
async fn bidi_echo_streams_both_ways_in_order_over_tcp() {
    let (client, _t) = tcp_pair(&bidi_server(Config::default()), Config::default()).await;
    let (mut sink, responses): (RequestSink<u64>, ResponseStream<u64>) =
        guard(client.call_bidi("B.echo", CallOptions::default()))
            .await
            .unwrap();
    // Send and receive concurrently: more items than any window.
    let sender = tokio::spawn(async move {
        for n in 0..500u64 {
            sink.send(&n).await.unwrap();
        }
        sink.finish();
    });
    let got: Vec<u64> = guard(responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(got, (0..500).map(|n| n * 10).collect::<Vec<_>>());
    guard(sender).await.unwrap();
}

#[tokio::test]
async fn client_streaming_gets_one_answer_after_finish() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, mut total) =
        guard(client.call_bidi::<u64, u64>("B.sum", CallOptions::default()))
            .await
            .unwrap();
    for n in 1..=100u64 {
        guard(sink.send(&n)).await.unwrap();
    }
    drop(sink); // dropping also finishes the request stream
    assert_eq!(guard(total.next()).await.unwrap().unwrap(), 5050);
    assert!(guard(total.next()).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_does_not_read_makes_the_sender_wait_after_one_window() {
    const WINDOW: u32 = 4;
    let server = bidi_server(Config::default().stream_window(WINDOW));
    let (client, _t) = duplex_pair(&server, Config::default());
    let (mut sink, responses) =
        guard(client.call_bidi::<u64, u64>("B.deaf", CallOptions::default()))
            .await
            .unwrap();
    for n in 0..WINDOW as u64 {
        guard(sink.send(&n)).await.unwrap();
    }
    // No credit left: the next send waits (time is paused, so this only
    // elapses once everything else is idle).
    let blocked = tokio::time::timeout(Duration::from_secs(5), sink.send(&99)).await;
    assert!(
        blocked.is_err(),
        "send beyond the window completed: {blocked:?}"
    );
    // Ending the call wakes the sender with an error instead of a hang.
    drop(responses);
    let err = guard(sink.send(&100)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // Other calls were never affected.
    let s: String = guard(client.call("Test.echo", "fine")).await.unwrap();
    assert_eq!(s, "fine");
}

#[tokio::test]
async fn sending_after_the_server_finished_fails_instead_of_hanging() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, responses) =
        guard(client.call_bidi::<u64, u64>("B.ignore", CallOptions::default()))
            .await
            .unwrap();
    let got: Vec<Result<u64, Status>> = guard(responses.collect()).await;
    assert!(got.is_empty());
    let err = guard(sink.send(&1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn unknown_or_mismatched_bidi_methods_are_unimplemented() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    for method in ["B.nope", "Test.echo"] {
        let (_sink, mut responses) =
            guard(client.call_bidi::<u64, u64>(method, CallOptions::default()))
                .await
                .unwrap();
        let err = guard(responses.next()).await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{method}: {err}");
    }
    let err = guard(client.call::<_, u64>("B.sum", &1u64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn an_undecodable_request_item_is_invalid_argument() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, mut responses) =
        guard(client.call_bidi::<String, u64>("B.sum", CallOptions::default()))
            .await
            .unwrap();
    guard(sink.send(&"not a number, and long enough".to_owned()))
        .await
        .unwrap();
    let err = guard(responses.next()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn losing_the_conn_fails_the_sender_with_unavailable() {
    let (client, task) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, _responses) =
        guard(client.call_bidi::<u64, u64>("B.deaf", CallOptions::default()))
            .await
            .unwrap();
    guard(sink.send(&1)).await.unwrap();
    task.abort();
    guard(client.closed()).await;
    let err = guard(sink.send(&2)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[tokio::test]
async fn request_items_beyond_the_credit_are_a_protocol_error() {
    let server = bidi_server(Config::default().stream_window(4));
    let (mut raw, b) = tokio::io::duplex(64 << 10);
    let s = server.clone();
    let serving = tokio::spawn(async move { s.serve(b).await });
    raw.write_all(b"NCRPC\x02").await.unwrap();
    // Open { id 1, "B.deaf", no timeout, credit 1, no metadata }
    let mut open = vec![0x06, 0x01, 0x06];
    open.extend_from_slice(b"B.deaf");
    open.extend_from_slice(&[0x00, 0x01, 0x00]);
    let mut bytes = (open.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&open);
    // 50 items without waiting for credit: StreamItem { id 1 }, payload 7.
    for _ in 0..50 {
        bytes.extend_from_slice(&[0, 0, 0, 3, 0x03, 0x01, 0x07]);
    }
    raw.write_all(&bytes).await.unwrap();
    let res = guard(serving).await.unwrap();
    assert!(matches!(res, Err(Error::Protocol { .. })), "{res:?}");
}

/// A peer that completes the preamble and then never answers or grants
/// credit: only the client's own deadline can end a wait on it.
async fn silent_server() -> (netchan_rpc::Client, tokio::io::DuplexStream) {
    let (a, mut b) = tokio::io::duplex(256 << 10);
    let client = netchan_rpc::Client::new(a);
    // The preamble is "NCRPC" + version 2 (docs/protocol.md, Part 2).
    guard(b.write_all(b"NCRPC\x02")).await.unwrap();
    (client, b)
}

/// Regression: `RequestSink::send` waited for request credit with no bound
/// but the server's goodwill, so a call with a deadline could hang in
/// `send` long past it when the server granted no credit.
#[tokio::test(start_paused = true)]
async fn request_sink_send_waiting_for_credit_ends_at_the_call_deadline() {
    let (client, _peer) = silent_server().await;
    let (mut sink, _responses) = guard(client.call_bidi::<u64, u64>(
        "B.silent",
        CallOptions::default().timeout(Duration::from_secs(2)),
    ))
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let err = guard(sink.send(&1)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() <= Duration::from_secs(2));
}

/// Regression: a caller-supplied deadline far in the future (a "never"
/// deadline near the end of `Instant`'s range) reached tokio's timer
/// unclamped, whose rounding `Instant + Duration` overflowed and panicked
/// in the caller's task.
#[tokio::test]
async fn a_deadline_at_the_end_of_time_is_clamped_not_a_panic() {
    let mut far = tokio::time::Instant::now();
    let mut step = Duration::from_secs(1 << 62);
    // Bounded: `step` halves every miss, from 2^62 s down to 1 ms.
    while step > Duration::from_millis(1) {
        match far.checked_add(step) {
            Some(t) => far = t,
            None => step /= 2,
        }
    }
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let opts = CallOptions::default().deadline(far);
    let echoed: String = guard(client.call_with("Test.echo", "far", opts.clone()))
        .await
        .unwrap();
    assert_eq!(echoed, "far");
    let (mut sink, responses) = guard(client.call_bidi::<u64, u64>("B.echo", opts))
        .await
        .unwrap();
    guard(sink.send(&4)).await.unwrap();
    sink.finish();
    let got: Vec<u64> = guard(responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(got, [40]);
}

/// Regression: request items a bidi handler had not consumed yet
/// were not counted against `max_in_flight_bytes`, so one conn could make
/// the server buffer `max_in_flight × stream_window × max_message_size`
/// bytes (Open frames carry no payload and were always admitted). Now the
/// call that would take the conn past its budget ends with
/// `ResourceExhausted`, and its bytes are released for other calls.
#[tokio::test]
async fn unread_request_items_count_against_the_in_flight_byte_budget() {
    let budget = 64 << 10;
    let mut server = test_server(Config::default().max_in_flight_bytes(budget));
    server.register_bidi(
        "B.hoard",
        |_ctx, reqs: RequestStream<netchan_rpc::ByteBuf>| async move {
            // Holds the request stream (and what is queued in it) unread.
            let _reqs = reqs;
            std::future::pending::<Result<stream::Empty<Result<u64, Status>>, Status>>().await
        },
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    let (mut sink, mut responses) =
        guard(client.call_bidi::<netchan_rpc::ByteBuf, u64>("B.hoard", CallOptions::default()))
            .await
            .unwrap();
    // The default window (16) of 16 KiB items is four times the budget.
    let blob = netchan_rpc::ByteBuf::from(vec![1u8; 16 << 10]);
    // (Sends within the credit succeed once queued locally; the server
    // ends the call when the items arrive.)
    for _ in 0..16 {
        if guard(sink.send(&blob)).await.is_err() {
            break;
        }
    }
    let end = guard(responses.next()).await.expect("an end status");
    assert_eq!(end.unwrap_err().code(), Code::ResourceExhausted);
    // The hoarding call's bytes were released: other calls carry on.
    let echoed: String = guard(client.call("Test.echo", "next")).await.unwrap();
    assert_eq!(echoed, "next");
}
