//! Server streaming: ordering, credit-based flow control with a slow
//! consumer, end-of-stream statuses, cancellation by drop, deadlines.

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
use netchan_rpc::{CallOptions, Code, Config, ResponseStream, Server, ServiceDef, Status};
use tokio::sync::{oneshot, Notify};

fn counting_server(produced: Arc<AtomicUsize>, progress: Arc<Notify>) -> Server {
    let mut server = test_server(Config::default());
    server.add(ServiceDef::new("S").stream("count", move |_ctx, n: u64| {
        let (produced, progress) = (Arc::clone(&produced), Arc::clone(&progress));
        async move {
            Ok(stream::iter(0..n).map(move |i| {
                produced.fetch_add(1, Ordering::SeqCst);
                progress.notify_one();
                Ok::<_, Status>(i)
            }))
        }
    }));
    server
}

#[tokio::test]
async fn items_arrive_in_order_across_many_credit_grants() {
    let server = counting_server(Arc::default(), Arc::default());
    let (client, _t) = tcp_pair(&server, Config::default().stream_window(8)).await;
    let items: Vec<u64> = guard(async {
        client
            .call_stream::<_, u64>("S.count", &1000u64, CallOptions::default())
            .await
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
            .await
    })
    .await;
    assert_eq!(items, (0..1000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_slow_consumer_bounds_the_sender_and_stalls_no_other_call() {
    const WINDOW: u32 = 4;
    let produced = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let server = counting_server(Arc::clone(&produced), Arc::clone(&progress));
    let (client, _t) = duplex_pair(&server, Config::default().stream_window(WINDOW));
    let mut items: ResponseStream<u64> =
        guard(client.call_stream("S.count", &1_000_000u64, CallOptions::default()))
            .await
            .unwrap();
    // Not consuming: the server produces exactly the initial credit.
    until_count(&produced, &progress, WINDOW as usize).await;
    // Other calls on the same conn still flow.
    for i in 0..20 {
        let s: String = guard(client.call("Test.echo", &format!("call {i}")))
            .await
            .unwrap();
        assert_eq!(s, format!("call {i}"));
    }
    assert_eq!(produced.load(Ordering::SeqCst), WINDOW as usize);
    // Consuming grants credit in half-window steps; production stays
    // within one window of consumption.
    for want in 0..100u64 {
        assert_eq!(guard(items.next()).await.unwrap().unwrap(), want);
        let ahead = produced.load(Ordering::SeqCst) - (want as usize + 1);
        assert!(ahead <= WINDOW as usize, "server ran {ahead} items ahead");
    }
}

#[tokio::test]
async fn a_call_with_its_own_stream_window_gets_that_much_credit() {
    let produced = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let server = counting_server(Arc::clone(&produced), Arc::clone(&progress));
    let (client, _t) = duplex_pair(&server, Config::default().stream_window(16));
    for window in [3u32, 40] {
        produced.store(0, Ordering::SeqCst);
        let opts = CallOptions::default().stream_window(window);
        let mut items: ResponseStream<u64> =
            guard(client.call_stream("S.count", &1_000_000u64, opts))
                .await
                .unwrap();
        // Not consuming: the server produces exactly this call's window, not the client's.
        until_count(&produced, &progress, window as usize).await;
        guard(client.call::<_, String>("Test.echo", &"sync".to_owned()))
            .await
            .unwrap();
        assert_eq!(produced.load(Ordering::SeqCst), window as usize);
        for want in 0..100u64 {
            assert_eq!(guard(items.next()).await.unwrap().unwrap(), want);
            let ahead = produced.load(Ordering::SeqCst) - (want as usize + 1);
            assert!(ahead <= window as usize, "server ran {ahead} items ahead");
        }
    }
}

#[tokio::test]
async fn a_handler_can_end_its_stream_with_a_status_while_the_caller_grants_no_credit() {
    let aborted = Arc::new(Notify::new());
    let mut server = test_server(Config::default());
    let signal = Arc::clone(&aborted);
    server.add(ServiceDef::new("S").stream("endless", move |ctx, ()| {
        let signal = Arc::clone(&signal);
        async move {
            // Work the handler spawned decides the call must end, whatever the credit.
            tokio::spawn(async move {
                ctx.abort(Status::deadline_exceeded("you took nothing"));
                ctx.abort(Status::internal("the first status wins"));
                signal.notify_one();
            });
            Ok(stream::iter(0u64..).map(Ok::<_, Status>))
        }
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let opts = CallOptions::default().stream_window(1);
    let items: ResponseStream<u64> = guard(client.call_stream("S.endless", &(), opts))
        .await
        .unwrap();
    // Nothing consumed (so no credit beyond the first item) until the call was aborted.
    guard(aborted.notified()).await;
    let got: Vec<Result<u64, Status>> = guard(items.collect()).await;
    let (end, before) = got.split_last().unwrap();
    assert!(before.len() <= 1, "{got:?}");
    let end = end.as_ref().unwrap_err();
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end}");
    assert_eq!(end.message(), "you took nothing");
    // A detached context has no call to end.
    netchan_rpc::Context::detached("x").abort(Status::internal("nothing"));
}

#[tokio::test]
async fn an_err_item_ends_the_stream_with_that_status() {
    let mut server = Server::new();
    server.add(
        ServiceDef::new("S").stream("fail_after_two", |_ctx, ()| async {
            Ok(stream::iter(vec![
                Ok(1u32),
                Ok(2),
                Err(Status::data_loss("disk ate it")),
                Ok(3),
            ]))
        }),
    );
    server.add(ServiceDef::new("S").stream("refuse", |_ctx, ()| async {
        Err::<stream::Empty<Result<u32, Status>>, _>(Status::permission_denied("no"))
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let got: Vec<Result<u32, Status>> = guard(async {
        client
            .call_stream("S.fail_after_two", &(), CallOptions::default())
            .await
            .unwrap()
            .collect()
            .await
    })
    .await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0], Ok(1));
    assert_eq!(got[1], Ok(2));
    assert_eq!(got[2].as_ref().unwrap_err().code(), Code::DataLoss);

    // A handler's early error is the call's error, as with tonic: the
    // caller's `?` on the call stops there, before any item.
    let err = guard(client.call_stream::<_, u32>("S.refuse", &(), CallOptions::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn a_stream_call_resolves_only_once_its_handler_accepted_it() {
    let (started_tx, started) = oneshot::channel::<()>();
    let (release_tx, release) = oneshot::channel::<()>();
    let hooks = Arc::new(Mutex::new(Some((started_tx, release))));
    let mut server = Server::new();
    server.add(ServiceDef::new("S").stream("slow_accept", move |_ctx, ()| {
        let hooks = hooks.lock().unwrap().take();
        async move {
            let (started_tx, release) = hooks.expect("called once");
            let _ = started_tx.send(());
            let _ = release.await;
            Ok(stream::iter([Ok::<_, Status>(7u32)]))
        }
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let call = client.call_stream::<_, u32>("S.slow_accept", &(), CallOptions::default());
    let mut call = Box::pin(call);
    // Drive the call until the handler runs; it has not accepted yet, so
    // the call must still be pending.
    tokio::select! {
        res = &mut call => panic!("resolved before the handler accepted: {res:?}"),
        res = guard(started) => res.unwrap(),
    }
    assert!(futures::poll!(&mut call).is_pending());
    release_tx.send(()).unwrap();
    let items: Vec<_> = guard(guard(call).await.unwrap().collect::<Vec<_>>()).await;
    assert_eq!(items, [Ok(7)]);
}

#[tokio::test]
async fn unknown_or_mismatched_stream_methods_are_unimplemented() {
    let server = counting_server(Arc::default(), Arc::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    for method in ["S.nope", "Test.echo"] {
        let res: Result<ResponseStream<u64>, Status> =
            guard(client.call_stream(method, "x", CallOptions::default())).await;
        let err = res.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{method}: {err}");
    }
    let err = guard(client.call::<_, u64>("S.count", &1u64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_call_on_the_server() {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let slot = Mutex::new(Some(dropped_tx));
    let mut server = Server::new();
    server.add(ServiceDef::new("S").stream("endless", move |_ctx, ()| {
        let signal = DropSignal(slot.lock().unwrap().take());
        async move {
            Ok(stream::unfold((0u64, signal), |(i, signal)| async move {
                Some((Ok::<_, Status>(i), (i + 1, signal)))
            }))
        }
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let mut s: ResponseStream<u64> =
        guard(client.call_stream("S.endless", &(), CallOptions::default()))
            .await
            .unwrap();
    for want in 0..50 {
        assert_eq!(guard(s.next()).await.unwrap().unwrap(), want);
    }
    drop(s);
    guard(dropped_rx).await.expect("server dropped the stream");
}

#[tokio::test(start_paused = true)]
async fn a_stream_deadline_covers_the_whole_stream() {
    let mut server = Server::new();
    server.add(ServiceDef::new("S").stream("tick", |_ctx, ()| async {
        Ok(stream::unfold(0u64, |i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok::<_, Status>(i), i + 1))
        }))
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let got: Vec<Result<u64, Status>> = guard(async {
        client
            .call_stream(
                "S.tick",
                &(),
                CallOptions::default().timeout(Duration::from_millis(550)),
            )
            .await
            .unwrap()
            .collect()
            .await
    })
    .await;
    let (last, items) = got.split_last().unwrap();
    assert_eq!(items.len(), 5, "{got:?}");
    assert_eq!(last.as_ref().unwrap_err().code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn losing_the_conn_mid_stream_yields_unavailable() {
    let server = counting_server(Arc::default(), Arc::default());
    let (client, task) = duplex_pair(&server, Config::default().stream_window(2));
    let mut s: ResponseStream<u64> =
        guard(client.call_stream("S.count", &1_000_000u64, CallOptions::default()))
            .await
            .unwrap();
    assert_eq!(guard(s.next()).await.unwrap().unwrap(), 0);
    task.abort();
    let mut saw_unavailable = false;
    for _ in 0..10 {
        match guard(s.next()).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                assert_eq!(e.code(), Code::Unavailable);
                saw_unavailable = true;
            }
            None => break,
        }
    }
    assert!(saw_unavailable);
}
