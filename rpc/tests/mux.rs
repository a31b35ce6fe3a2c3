//! The rpc semantics over netchan-mux channels on one loopback TCP
//! connection: the transport the library is built for.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use futures::{stream, StreamExt};
use netchan_rpc::{CallOptions, Client, Code, Config, Error, ResponseStream, ServiceDef, Status};
use tokio::{
    io::AsyncWriteExt,
    sync::{oneshot, Notify},
};

#[tokio::test]
async fn calls_and_errors_work_over_a_mux_channel() {
    let server = test_server(Config::default());
    let (client, _near, _far) = mux_pair(&server, Config::default()).await;
    let s: String = guard(client.call("Test.echo", "over mux")).await.unwrap();
    assert_eq!(s, "over mux");
    let err = guard(client.call::<_, ()>("Test.nope", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let err = guard(client.call::<_, u64>("Test.add", &1u8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = guard(client.call::<_, ()>("Test.panic", "kaboom"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let peer: Option<String> = guard(client.call("Test.peer", &())).await.unwrap();
    assert_eq!(
        peer.as_deref(),
        Some("rpc"),
        "the peer label is the channel name"
    );
    let md: Option<String> = guard(client.call_with(
        "Test.metadata",
        "token",
        CallOptions::default().metadata("token", "s3cret"),
    ))
    .await
    .unwrap();
    assert_eq!(md.as_deref(), Some("s3cret"));
}

#[tokio::test]
async fn concurrent_calls_on_one_channel_and_across_channels() {
    let server = test_server(Config::default());
    let (near, far) = mux_sessions().await;
    let _serving = serve_mux(&server, &far, "rpc");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::new(guard(near.dial("rpc")).await.unwrap()));
    }
    let calls = (0..400u64).map(|i| {
        let c = clients[i as usize % clients.len()].clone();
        tokio::spawn(async move {
            let sum: u64 = c.call("Test.add", &(i, i)).await.unwrap();
            assert_eq!(sum, 2 * i);
        })
    });
    guard(futures::future::try_join_all(calls)).await.unwrap();
}

#[tokio::test]
async fn deadline_and_cancellation_reach_the_handler_over_mux() {
    let mut server = test_server(Config::default());
    let (started_rx, dropped_rx) = register_forever(&mut server, "M.forever");
    let (client, _near, _far) = mux_pair(&server, Config::default()).await;
    let err = guard(client.call_with::<_, u64>(
        "Test.sleep_ms",
        &600_000u64,
        CallOptions::default().timeout(Duration::from_millis(100)),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let c = client.clone();
    let call = tokio::spawn(async move { c.call::<_, ()>("M.forever", &()).await });
    guard(started_rx).await.unwrap();
    call.abort();
    guard(dropped_rx).await.expect("the handler was dropped");
}

#[tokio::test]
async fn losing_the_tcp_connection_fails_pending_calls_with_unavailable() {
    let server = test_server(Config::default());
    let (client, near, far) = mux_pair(&server, Config::default()).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.call::<_, u64>("Test.sleep_ms", &600_000u64).await })
        })
        .collect();
    let _: String = guard(client.call("Test.echo", "sync")).await.unwrap();
    // The far side goes away entirely.
    guard(far.close()).await;
    for call in calls {
        let err = guard(call).await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }
    guard(client.closed()).await;
    drop(near);
}

#[tokio::test]
async fn a_malformed_channel_ends_only_itself_on_the_session() {
    let server = test_server(Config::default());
    let (near, far) = mux_sessions().await;
    let mut listener = far.listen("rpc").unwrap();
    let good = Client::new(guard(near.dial("rpc")).await.unwrap());
    let good_conn = guard(listener.accept()).await.unwrap();
    let s = server.clone();
    let _good_serving = tokio::spawn(async move { s.serve(good_conn).await });

    let mut raw = guard(near.dial("rpc")).await.unwrap();
    let raw_conn = guard(listener.accept()).await.unwrap();
    let s = server.clone();
    let raw_serving = tokio::spawn(async move { s.serve(raw_conn).await });
    raw.write_all(b"NCRPC\x02").await.unwrap();
    raw.write_all(&[0, 0, 0, 3, 0x0a, 0x09, 0x09])
        .await
        .unwrap();
    let res = guard(raw_serving).await.unwrap();
    assert!(matches!(res, Err(Error::Malformed(_))), "{res:?}");

    let s: String = guard(good.call("Test.echo", "still fine")).await.unwrap();
    assert_eq!(s, "still fine");
    assert!(!near.is_closed() && !far.is_closed());
}

#[tokio::test]
async fn oversize_messages_are_refused_over_mux() {
    let server = test_server(Config::default().max_message_size(64 << 10));
    let (client, _near, _far) =
        mux_pair(&server, Config::default().max_message_size(64 << 10)).await;
    let err = guard(client.call::<_, String>("Test.echo", &"x".repeat(100_000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = guard(client.call::<_, Vec<u8>>("Test.blob", &100_000usize))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let ok: Vec<u8> = guard(client.call("Test.blob", &1000usize)).await.unwrap();
    assert_eq!(ok.len(), 1000);
}

#[tokio::test]
async fn a_slow_stream_consumer_over_mux_is_bounded_and_blocks_nothing() {
    const WINDOW: u32 = 4;
    let produced = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let mut server = test_server(Config::default());
    let (p, n) = (Arc::clone(&produced), Arc::clone(&progress));
    server.add(ServiceDef::new("M").stream("count", move |_ctx, ()| {
        let (p, n) = (Arc::clone(&p), Arc::clone(&n));
        async move {
            Ok(stream::iter(0u64..).map(move |i| {
                p.fetch_add(1, Ordering::SeqCst);
                n.notify_one();
                Ok::<_, Status>(i)
            }))
        }
    }));
    let (client, _near, _far) = mux_pair(&server, Config::default().stream_window(WINDOW)).await;
    let mut items: ResponseStream<u64> =
        guard(client.call_stream("M.count", &(), CallOptions::default()))
            .await
            .unwrap();
    until_count(&produced, &progress, WINDOW as usize).await;
    let s: String = guard(client.call("Test.echo", "not stalled"))
        .await
        .unwrap();
    assert_eq!(s, "not stalled");
    assert_eq!(produced.load(Ordering::SeqCst), WINDOW as usize);
    for want in 0..20u64 {
        assert_eq!(guard(items.next()).await.unwrap().unwrap(), want);
    }
    drop(items);
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_over_mux_are_resource_exhausted() {
    let release = Arc::new(Notify::new());
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let mut server = test_server(Config::default().max_in_flight(2));
    let (r, s) = (Arc::clone(&release), Arc::clone(&started));
    server.add(ServiceDef::new("M").unary("park", move |_ctx, ()| {
        let (r, s) = (Arc::clone(&r), Arc::clone(&s));
        async move {
            let parked = r.notified();
            s.add_permits(1);
            parked.await;
            Ok(())
        }
    }));
    let (client, _near, _far) = mux_pair(&server, Config::default()).await;
    let parked = spawn_calls(&client, "M.park", 2);
    guard(started.acquire_many(2)).await.unwrap().forget();
    let err = guard(client.call::<_, String>("Test.echo", "over"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    release.notify_waiters();
    for p in parked {
        guard(p).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn dropping_a_stream_over_mux_cancels_it_on_the_server() {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let slot = Mutex::new(Some(dropped_tx));
    let mut server = test_server(Config::default());
    server.add(ServiceDef::new("M").stream("endless", move |_ctx, ()| {
        let signal = DropSignal(slot.lock().unwrap().take());
        async move {
            Ok(stream::unfold((0u64, signal), |(i, signal)| async move {
                Some((Ok::<_, Status>(i), (i + 1, signal)))
            }))
        }
    }));
    let (client, _near, _far) = mux_pair(&server, Config::default()).await;
    let mut s: ResponseStream<u64> =
        guard(client.call_stream("M.endless", &(), CallOptions::default()))
            .await
            .unwrap();
    for want in 0..40 {
        assert_eq!(guard(s.next()).await.unwrap().unwrap(), want);
    }
    drop(s);
    guard(dropped_rx)
        .await
        .expect("the server dropped the stream");
}

#[tokio::test]
async fn a_version_mismatch_on_a_mux_channel_is_reported_and_ends_only_it() {
    let server = test_server(Config::default());
    let (near, far) = mux_sessions().await;
    let mut listener = far.listen("rpc").unwrap();
    let mut raw = guard(near.dial("rpc")).await.unwrap();
    let conn = guard(listener.accept()).await.unwrap();
    let s = server.clone();
    let serving = tokio::spawn(async move { s.serve(conn).await });
    raw.write_all(b"NCRPC\x03").await.unwrap();
    let res = guard(serving).await.unwrap();
    assert!(
        matches!(res, Err(Error::VersionMismatch { ours: 2, theirs: 3 })),
        "{res:?}"
    );
    // The session and a fresh channel are fine.
    let _serving = serve_mux(&server, &far, "rpc2");
    let client = Client::new(guard(near.dial("rpc2")).await.unwrap());
    let s: String = guard(client.call("Test.echo", "fine")).await.unwrap();
    assert_eq!(s, "fine");
}

#[tokio::test]
async fn bidirectional_streaming_works_over_mux() {
    let mut server = test_server(Config::default());
    server.add(
        ServiceDef::new("M").bidi(
            "double",
            |_ctx, reqs: netchan_rpc::RequestStream<u64>| async move {
                Ok(reqs.map(|r| r.map(|n| n * 2)))
            },
        ),
    );
    let (client, _near, _far) = mux_pair(&server, Config::default().stream_window(4)).await;
    let responses = guard(client.call_bidi::<u64, u64, _>(
        "M.double",
        futures::stream::iter(0..100u64),
        CallOptions::default(),
    ))
    .await
    .unwrap();
    let got: Vec<u64> = guard(responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(got, (0..100).map(|n| n * 2).collect::<Vec<_>>());
}
