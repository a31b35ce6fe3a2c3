//! Bidi (bidirectional-streaming) and client streaming: ordering, credit-based flow control
//! for the requests, ends, errors and conn loss, and resolving like tonic's: the call's
//! `.await` returns once the handler accepted, or with its early error.

mod common;

use std::time::Duration;

use common::*;
use futures::{stream, StreamExt};
use netchan_rpc::{
    CallOptions, Code, Config, Error, PendingResponse, RequestSink, RequestStream, Server,
    ServiceDef, Status,
};
use tokio::io::AsyncWriteExt;

fn bidi_server(config: Config) -> Server {
    let mut server = test_server(config);
    server
        .add(
            ServiceDef::new("B")
                .bidi("echo", |_ctx, reqs: RequestStream<u64>| async move {
                    Ok(reqs.map(|r| r.map(|n| n * 10)))
                })
                .bidi("sum", |_ctx, mut reqs: RequestStream<u64>| async move {
                    let mut total = 0u64;
                    while let Some(n) = reqs.next().await {
                        total += n?;
                    }
                    Ok(stream::once(async move { Ok::<_, Status>(total) }))
                })
                .bidi("deaf", |_ctx, _reqs: RequestStream<u64>| async move {
                    std::future::pending::<Result<stream::Empty<Result<u64, Status>>, Status>>()
                        .await
                })
                .bidi("ignore", |_ctx, _reqs: RequestStream<u64>| async move {
                    Ok(stream::empty::<Result<u64, Status>>())
                })
                .bidi("refuse", |ctx, _reqs: RequestStream<u64>| async move {
                    if ctx.metadata().get("token") != Some("s3cret") {
                        return Err(Status::permission_denied("bad token"));
                    }
                    Ok(stream::iter([Ok::<_, Status>(1u64)]))
                }),
        )
        // Reads the first request (a login) before accepting, then echoes.
        .add(
            ServiceDef::new("B").bidi("login", |_ctx, mut reqs: RequestStream<u64>| async move {
                match reqs.next().await {
                    Some(Ok(42)) => Ok(reqs.map(|r| r.map(|n| n + 1))),
                    Some(Ok(n)) => Err(Status::unauthenticated(format!("wrong login {n}"))),
                    Some(Err(status)) => Err(status),
                    None => Err(Status::invalid_argument("no login")),
                }
            }),
        );
    server
}

#[tokio::test]
async fn bidi_echo_streams_both_ways_in_order_over_tcp() {
    let (client, _t) = tcp_pair(&bidi_server(Config::default()), Config::default()).await;
    // More items than any window: sent while the responses are read.
    let responses = guard(client.call_bidi::<u64, u64, _>(
        "B.echo",
        stream::iter(0..500u64),
        CallOptions::default(),
    ))
    .await
    .unwrap();
    let got: Vec<u64> = guard(responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(got, (0..500).map(|n| n * 10).collect::<Vec<_>>());
}

#[tokio::test]
async fn bidi_echo_with_a_sink_streams_both_ways_in_order_over_tcp() {
    let (client, _t) = tcp_pair(&bidi_server(Config::default()), Config::default()).await;
    let (mut sink, responses): (RequestSink<u64>, PendingResponse<u64>) =
        guard(client.open_bidi("B.echo", CallOptions::default()))
            .await
            .unwrap();
    // Send and receive concurrently: more items than any window.
    let sender = tokio::spawn(async move {
        for n in 0..500u64 {
            sink.send(&n).await.unwrap();
        }
        sink.finish();
    });
    let responses = guard(responses).await.unwrap();
    let got: Vec<u64> = guard(responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(got, (0..500).map(|n| n * 10).collect::<Vec<_>>());
    guard(sender).await.unwrap();
}

#[tokio::test]
async fn a_handlers_early_error_is_what_the_bidi_call_returns() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let err = guard(client.call_bidi::<u64, u64, _>(
        "B.refuse",
        stream::pending(),
        CallOptions::default(),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("bad token"), "{err}");

    // The same handler accepts good credentials: then the items flow.
    let opts = CallOptions::default().metadata("token", "s3cret");
    let items = guard(client.call_bidi::<u64, u64, _>("B.refuse", stream::pending(), opts))
        .await
        .unwrap();
    let got: Vec<u64> = guard(items.map(Result::unwrap).collect()).await;
    assert_eq!(got, [1]);

    // With a sink: the pending response fails the same way.
    let (_sink, pending) = guard(client.open_bidi::<u64, u64>("B.refuse", CallOptions::default()))
        .await
        .unwrap();
    let err = guard(pending).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn a_handler_that_reads_requests_before_accepting_gets_them() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    // Interactive: the requests come from a channel fed after the call resolves.
    let (mut tx, rx) = futures::channel::mpsc::channel::<u64>(4);
    tx.try_send(42).unwrap();
    let mut answers = guard(client.call_bidi::<u64, u64, _>("B.login", rx, CallOptions::default()))
        .await
        .expect("accepted after reading the login");
    for n in [7u64, 8] {
        tx.try_send(n).unwrap();
        assert_eq!(guard(answers.next()).await.unwrap().unwrap(), n + 1);
    }
    drop(tx);
    assert!(guard(answers.next()).await.is_none());

    let err = guard(client.call_bidi::<u64, u64, _>(
        "B.login",
        stream::iter([1u64, 2]),
        CallOptions::default(),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Client streaming: the handler reads everything before it answers.
    let total: u64 =
        guard(client.call_client_stream("B.sum", stream::iter(1..=100u64), CallOptions::default()))
            .await
            .unwrap();
    assert_eq!(total, 5050);
}

/// The client side of `Accept`: a bidi call resolves only on it, and an
/// item before it fails the call.
#[tokio::test(start_paused = true)]
async fn a_bidi_call_resolves_on_accept_and_not_before() {
    // Accept { id 1 }, then StreamItem { id 1 } with payload 7, then StreamEnd { id 1 }.
    const ACCEPT: [u8; 6] = [0, 0, 0, 2, 0x07, 0x01];
    const ITEM: [u8; 7] = [0, 0, 0, 3, 0x03, 0x01, 0x07];
    const END: [u8; 7] = [0, 0, 0, 3, 0x04, 0x01, 0x00];

    let (client, mut peer) = silent_server().await;
    let (_sink, mut pending) = guard(client.open_bidi::<u64, u64>("B.raw", CallOptions::default()))
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_secs(5), &mut pending).await;
    assert!(early.is_err(), "resolved before any accept: {early:?}");
    guard(peer.write_all(&ACCEPT)).await.unwrap();
    guard(peer.write_all(&ITEM)).await.unwrap();
    guard(peer.write_all(&END)).await.unwrap();
    let items = guard(pending).await.expect("accepted");
    let got: Vec<u64> = guard(items.map(Result::unwrap).collect()).await;
    assert_eq!(got, [7]);

    let (client, mut peer) = silent_server().await;
    let pending = client.call_bidi::<u64, u64, _>("B.raw", stream::empty(), CallOptions::default());
    guard(peer.write_all(&ITEM)).await.unwrap();
    let err = guard(pending).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("before accepting"), "{err}");
}

#[tokio::test]
async fn a_request_the_pump_cannot_send_fails_the_call() {
    let mut server = test_server(Config::default());
    server.add(ServiceDef::new("B").bidi(
        "count",
        |_ctx, reqs: RequestStream<netchan_rpc::ByteBuf>| async move {
            Ok(reqs.map(|r| r.map(|b| b.len() as u64)))
        },
    ));
    let small = Config::default().max_message_size(netchan_rpc::MIN_MESSAGE_SIZE);
    let (client, _t) = duplex_pair(&server, small);
    let big = netchan_rpc::ByteBuf::from(vec![0u8; 4 * netchan_rpc::MIN_MESSAGE_SIZE]);
    let (mut tx, rx) = futures::channel::mpsc::channel(4);
    tx.try_send(netchan_rpc::ByteBuf::from(vec![1u8; 8]))
        .unwrap();
    let mut sizes = guard(client.call_bidi::<netchan_rpc::ByteBuf, u64, _>(
        "B.count",
        rx,
        CallOptions::default(),
    ))
    .await
    .unwrap();
    assert_eq!(guard(sizes.next()).await.unwrap().unwrap(), 8);
    tx.try_send(big).unwrap();
    let err = guard(sizes.next()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(guard(sizes.next()).await.is_none());
    // The conn carries on.
    let s: String = guard(client.call("Test.echo", "fine")).await.unwrap();
    assert_eq!(s, "fine");
}

#[tokio::test]
async fn client_streaming_gets_one_answer_after_finish() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, total) = guard(client.open_bidi::<u64, u64>("B.sum", CallOptions::default()))
        .await
        .unwrap();
    // The handler reads every request before it accepts: the sink works
    // while the response is pending.
    for n in 1..=100u64 {
        guard(sink.send(&n)).await.unwrap();
    }
    drop(sink); // dropping also finishes the request stream
    let mut total = guard(total).await.unwrap();
    assert_eq!(guard(total.next()).await.unwrap().unwrap(), 5050);
    assert!(guard(total.next()).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_does_not_read_makes_the_sender_wait_after_one_window() {
    const WINDOW: u32 = 4;
    let server = bidi_server(Config::default().stream_window(WINDOW));
    let (client, _t) = duplex_pair(&server, Config::default());
    let (mut sink, responses) =
        guard(client.open_bidi::<u64, u64>("B.deaf", CallOptions::default()))
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
        guard(client.open_bidi::<u64, u64>("B.ignore", CallOptions::default()))
            .await
            .unwrap();
    let responses = guard(responses).await.unwrap();
    let got: Vec<Result<u64, Status>> = guard(responses.collect()).await;
    assert!(got.is_empty());
    let err = guard(sink.send(&1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn unknown_or_mismatched_bidi_methods_are_unimplemented() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    for method in ["B.nope", "Test.echo"] {
        let err = guard(client.call_bidi::<u64, u64, _>(
            method,
            stream::pending(),
            CallOptions::default(),
        ))
        .await
        .unwrap_err();
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
    let (mut sink, responses) =
        guard(client.open_bidi::<String, u64>("B.sum", CallOptions::default()))
            .await
            .unwrap();
    guard(sink.send(&"not a number, and long enough".to_owned()))
        .await
        .unwrap();
    // The handler fails before accepting: its error is the call's.
    let err = guard(responses).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn losing_the_conn_fails_the_sender_with_unavailable() {
    let (client, task) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (mut sink, _responses) =
        guard(client.open_bidi::<u64, u64>("B.deaf", CallOptions::default()))
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
    let (mut sink, _responses) = guard(client.open_bidi::<u64, u64>(
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
    let (mut sink, responses) = guard(client.open_bidi::<u64, u64>("B.echo", opts))
        .await
        .unwrap();
    guard(sink.send(&4)).await.unwrap();
    sink.finish();
    let responses = guard(responses).await.unwrap();
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
    server.add(ServiceDef::new("B").bidi(
        "hoard",
        |_ctx, reqs: RequestStream<netchan_rpc::ByteBuf>| async move {
            // Holds the request stream (and what is queued in it) unread.
            let _reqs = reqs;
            std::future::pending::<Result<stream::Empty<Result<u64, Status>>, Status>>().await
        },
    ));
    let (client, _t) = duplex_pair(&server, Config::default());
    let (mut sink, responses) =
        guard(client.open_bidi::<netchan_rpc::ByteBuf, u64>("B.hoard", CallOptions::default()))
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
    let end = guard(responses).await.expect_err("an end status");
    assert_eq!(end.code(), Code::ResourceExhausted);
    // The hoarding call's bytes were released: other calls carry on.
    let echoed: String = guard(client.call("Test.echo", "next")).await.unwrap();
    assert_eq!(echoed, "next");
}

/// Signals when dropped: tells a test that whoever held the stream let go.
struct DropSignal<S>(S, Option<tokio::sync::oneshot::Sender<()>>);

impl<S> Drop for DropSignal<S> {
    fn drop(&mut self) {
        if let Some(tx) = self.1.take() {
            let _ = tx.send(());
        }
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for DropSignal<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx)
    }
}

/// The task sending `call_bidi`'s requests does not outlive the call: a
/// request stream that never ends is dropped once the responses are.
#[tokio::test]
async fn dropping_the_responses_stops_sending_the_requests() {
    let (client, _t) = duplex_pair(&bidi_server(Config::default()), Config::default());
    let (tx, dropped) = tokio::sync::oneshot::channel();
    let requests = DropSignal(stream::pending::<u64>(), Some(tx));
    let responses =
        guard(client.call_bidi::<u64, u64, _>("B.echo", requests, CallOptions::default()))
            .await
            .unwrap();
    drop(responses);
    guard(dropped)
        .await
        .expect("the request stream was dropped");
}
