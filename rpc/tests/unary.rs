//! Unary calls: results, status codes, concurrency, limits and metadata,
//! over an in-memory duplex and loopback TCP.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use netchan_rpc::{CallOptions, Client, Code, Config, Server, ServiceDef, Status};
use tokio::sync::{Barrier, Notify};

#[tokio::test]
async fn echo_round_trips_over_duplex_and_tcp() {
    let server = test_server(Config::default());
    let (duplex_client, _t1) = duplex_pair(&server, Config::default());
    let (tcp_client, _t2) = tcp_pair(&server, Config::default()).await;
    for client in [duplex_client, tcp_client] {
        let got: String = guard(client.call("Test.echo", "hi there")).await.unwrap();
        assert_eq!(got, "hi there");
        let sum: u64 = guard(client.call("Test.add", &(40u64, 2u64)))
            .await
            .unwrap();
        assert_eq!(sum, 42);
    }
}

#[tokio::test]
async fn handler_errors_reach_the_caller_with_code_and_message() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, ()>("Test.fail", "no such file: a.txt"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such file: a.txt");
    let err = guard(client.call::<_, u64>("Test.add", &(u64::MAX, 1u64)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn unknown_method_is_unimplemented_and_names_the_method() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, ()>("Test.nope", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("Test.nope"), "{err}");
    // The conn is fine afterwards.
    let ok: String = guard(client.call("Test.echo", "still here")).await.unwrap();
    assert_eq!(ok, "still here");
}

#[tokio::test]
async fn undecodable_request_is_invalid_argument() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    // Test.add wants two u64s; one byte cannot be that.
    let err = guard(client.call::<_, u64>("Test.add", &1u8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A string where a u64 pair is expected leaves trailing bytes or fails.
    let err = guard(client.call::<_, u64>("Test.add", "a long string, not numbers"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn undecodable_response_is_internal_on_the_client() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    // Test.echo answers "xy" as 3 bytes; four u64s need at least 4.
    let err = guard(client.call::<_, (u64, u64, u64, u64)>("Test.echo", "xy"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
}

#[tokio::test]
async fn panicking_handler_fails_only_its_call() {
    let server = test_server(Config::default());
    let (client, task) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, ()>("Test.panic", "boom in handler"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("boom in handler"), "{err}");
    // Same conn, same server: still serving.
    let () = guard(client.call("Test.panic", "")).await.unwrap();
    let echoed: String = guard(client.call("Test.echo", "alive")).await.unwrap();
    assert_eq!(echoed, "alive");
    assert!(!task.is_finished());
}

#[tokio::test]
async fn a_panic_before_the_handler_future_exists_is_also_contained() {
    let mut server = Server::new();
    server.add(ServiceDef::new("P").unary(
        "sync",
        |_ctx, (): ()| -> std::future::Ready<Result<(), Status>> {
            panic!("synchronous part of the handler")
        },
    ));
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, ()>("P.sync", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let err = guard(client.call::<_, ()>("P.sync", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
}

#[tokio::test]
async fn a_slow_call_does_not_block_a_fast_one_on_the_same_conn() {
    let release = Arc::new(Notify::new());
    let mut server = Server::new();
    let r = Arc::clone(&release);
    server.add(
        ServiceDef::new("S")
            .unary("slow", move |_ctx, ()| {
                let r = Arc::clone(&r);
                async move {
                    r.notified().await;
                    Ok("slow")
                }
            })
            .unary("fast", |_ctx, ()| async { Ok("fast") }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    let slow_client = client.clone();
    let slow = tokio::spawn(async move { slow_client.call::<_, String>("S.slow", &()).await });
    // The fast call completes while the slow one is parked.
    let fast: String = guard(client.call("S.fast", &())).await.unwrap();
    assert_eq!(fast, "fast");
    assert!(!slow.is_finished());
    release.notify_one();
    assert_eq!(guard(slow).await.unwrap().unwrap(), "slow");
}

#[tokio::test]
async fn many_concurrent_calls_each_get_their_own_answer() {
    let server = test_server(Config::default());
    let (client, _t) = tcp_pair(&server, Config::default()).await;
    let calls = (0..500u64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let got: u64 = client.call("Test.add", &(i, 1000u64)).await.unwrap();
            assert_eq!(got, i + 1000);
        })
    });
    guard(futures::future::try_join_all(calls)).await.unwrap();
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_are_resource_exhausted() {
    const LIMIT: usize = 4;
    let barrier = Arc::new(Barrier::new(LIMIT + 1));
    let release = Arc::new(Notify::new());
    let mut server = Server::with_config(Config::default().max_in_flight(LIMIT));
    let (b, r) = (Arc::clone(&barrier), Arc::clone(&release));
    server.add(
        ServiceDef::new("L")
            .unary("park", move |_ctx, ()| {
                let (b, r) = (Arc::clone(&b), Arc::clone(&r));
                async move {
                    let parked = r.notified();
                    b.wait().await;
                    parked.await;
                    Ok(())
                }
            })
            .unary("quick", |_ctx, ()| async { Ok(()) }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    let parked = spawn_calls(&client, "L.park", LIMIT);
    // All LIMIT handlers are running.
    guard(barrier.wait()).await;
    let err = guard(client.call::<_, ()>("L.quick", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    release.notify_waiters();
    for p in parked {
        guard(p).await.unwrap().unwrap();
    }
    // Room again.
    guard(client.call::<_, ()>("L.quick", &())).await.unwrap();
}

#[tokio::test]
async fn requests_beyond_the_in_flight_byte_budget_are_resource_exhausted() {
    // A peer must not pin max_in_flight × max_message_size bytes with slow calls.
    let release = Arc::new(Notify::new());
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(4);
    let mut server = Server::with_config(Config::default().max_in_flight_bytes(100_000));
    let r = Arc::clone(&release);
    server.add(
        ServiceDef::new("B").unary("park", move |_ctx, blob: netchan_rpc::ByteBuf| {
            let (r, started) = (Arc::clone(&r), started_tx.clone());
            async move {
                let parked = r.notified();
                let _ = started.send(()).await;
                parked.await;
                Ok(blob.len())
            }
        }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    let blob = |n: usize| netchan_rpc::ByteBuf::from(vec![7u8; n]);

    // 60 KB is held by a parked call...
    let first = {
        let c = client.clone();
        let b = blob(60_000);
        tokio::spawn(async move { c.call::<_, usize>("B.park", &b).await })
    };
    guard(started_rx.recv()).await.unwrap();
    // ...so another 60 KB would exceed the 100 KB budget and is refused...
    let err = guard(client.call::<_, usize>("B.park", &blob(60_000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("request bytes"), "{err}");
    // ...while a small request still fits.
    let second = {
        let c = client.clone();
        let b = blob(10_000);
        tokio::spawn(async move { c.call::<_, usize>("B.park", &b).await })
    };
    guard(started_rx.recv()).await.unwrap();
    release.notify_waiters();
    assert_eq!(guard(first).await.unwrap().unwrap(), 60_000);
    assert_eq!(guard(second).await.unwrap().unwrap(), 10_000);

    // The budget is released when calls end: a large request runs again.
    let third = {
        let c = client.clone();
        let b = blob(90_000);
        tokio::spawn(async move { c.call::<_, usize>("B.park", &b).await })
    };
    guard(started_rx.recv()).await.unwrap();
    release.notify_waiters();
    assert_eq!(guard(third).await.unwrap().unwrap(), 90_000);
}

#[tokio::test]
async fn metadata_and_peer_label_reach_the_handler() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let opts = CallOptions::default()
        .metadata("token", "s3cret")
        .metadata("trace", "abc123");
    let got: Option<String> = guard(client.call_with("Test.metadata", "token", opts.clone()))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("s3cret"));
    let got: Option<String> = guard(client.call_with("Test.metadata", "trace", opts))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("abc123"));
    let got: Option<String> = guard(client.call("Test.metadata", "token")).await.unwrap();
    assert_eq!(got, None);
    let peer: Option<String> = guard(client.call("Test.peer", &())).await.unwrap();
    assert_eq!(peer.as_deref(), Some("duplex-peer"));
}

#[tokio::test]
async fn one_server_serves_many_conns_with_shared_state() {
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut server = Server::new();
    let h = Arc::clone(&hits);
    server.add(ServiceDef::new("C").unary("hit", move |_ctx, ()| {
        let h = Arc::clone(&h);
        async move { Ok(h.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1) }
    }));
    let clients: Vec<Client> = (0..5)
        .map(|_| duplex_pair(&server, Config::default()).0)
        .collect();
    for c in &clients {
        let _: u64 = guard(c.call("C.hit", &())).await.unwrap();
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 5);
}

#[tokio::test]
async fn dropping_every_client_handle_ends_serve_cleanly() {
    let server = test_server(Config::default());
    let (client, task) = duplex_pair(&server, Config::default());
    let _: String = guard(client.call("Test.echo", "x")).await.unwrap();
    drop(client);
    guard(task).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_handler_sees_the_callers_deadline() {
    let mut server = Server::new();
    server.add(ServiceDef::new("D").unary("left", |ctx, ()| async move {
        Ok(ctx.remaining().map(|d| d.as_millis() as u64))
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let left: Option<u64> = guard(client.call_with(
        "D.left",
        &(),
        CallOptions::default().timeout(Duration::from_secs(30)),
    ))
    .await
    .unwrap();
    let left = left.expect("the server sees a deadline");
    assert!(left > 20_000 && left <= 30_000, "{left}");
    let none: Option<u64> = guard(client.call("D.left", &())).await.unwrap();
    assert_eq!(none, None);
}

/// Large responses leave by reference (a `ByteBuf` of 32 KiB or more is not copied into the
/// outbox): sequential 1 MiB answers, each written while the writer task may be idle, arrive
/// whole and in order over TCP and over a mux channel, on a multi-thread runtime as users run
/// it. (A sender writing such a block itself once left a frame's rest unsent: the caller then
/// waited out the frame deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_megabyte_responses_by_reference_arrive_whole() {
    let mut server = Server::with_config(Config::default());
    server.add(
        ServiceDef::new("Big").unary("mib", |_ctx, seed: u8| async move {
            let body: Vec<u8> = (0..1usize << 20)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            Ok(netchan_rpc::ByteBuf::from(bytes::Bytes::from(body)))
        }),
    );
    let (tcp, _t) = tcp_pair(&server, Config::default()).await;
    let (channel, _near, _far) = mux_pair(&server, Config::default()).await;
    for client in [tcp, channel] {
        // Bounded: 40 calls per conn.
        for seed in 0..40u8 {
            let got: netchan_rpc::ByteBuf = guard(client.call("Big.mib", &seed)).await.unwrap();
            assert_eq!(got.len(), 1 << 20, "call {seed}: the whole response");
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i as u8).wrapping_mul(31).wrapping_add(seed)),
                "call {seed}: the bytes in order"
            );
        }
    }
}
