//! Cancellation: dropping a call future on the client drops the handler on
//! the server.

mod common;

use std::{sync::Mutex, time::Duration};

use common::*;
use futures::StreamExt;
use netchan_rpc::{CallOptions, Code, Config, Context, EndReason, Server, ServiceDef};
use tokio::sync::oneshot;

fn forever_server() -> (Server, oneshot::Receiver<()>, oneshot::Receiver<()>) {
    let mut server = Server::new();
    let (started, dropped) = register_forever(&mut server, "C.forever");
    server.add(ServiceDef::new("C").unary("echo", |_ctx, s: String| async move { Ok(s) }));
    (server, started, dropped)
}

#[tokio::test]
async fn dropping_the_call_future_drops_the_handler_on_the_server() {
    let (server, started, dropped) = forever_server();
    let (client, _t) = tcp_pair(&server, Config::default()).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.call::<_, ()>("C.forever", &()).await });
    guard(started).await.unwrap();
    call.abort();
    guard(dropped)
        .await
        .expect("the server dropped the handler");
    // The conn carries on.
    let s: String = guard(client.call("C.echo", "after cancel")).await.unwrap();
    assert_eq!(s, "after cancel");
}

#[tokio::test]
async fn a_select_timeout_around_a_call_also_cancels_it() {
    let (server, started, dropped) = forever_server();
    let (client, _t) = duplex_pair(&server, Config::default());
    let mut call = Box::pin(client.call::<_, ()>("C.forever", &()));
    tokio::select! {
        _ = &mut call => panic!("the handler never answers"),
        _ = started => {}
    }
    // Dropping the future cancels the call.
    drop(call);
    guard(dropped).await.unwrap();
}

#[tokio::test]
async fn closing_the_conn_drops_in_flight_handlers() {
    let (server, started, dropped) = forever_server();
    let (client, task) = duplex_pair(&server, Config::default());
    let c = client.clone();
    let call = tokio::spawn(async move { c.call::<_, ()>("C.forever", &()).await });
    guard(started).await.unwrap();
    task.abort();
    guard(dropped).await.unwrap();
    let err = guard(call).await.unwrap().unwrap_err();
    assert_eq!(err.code(), netchan_rpc::Code::Unavailable);
}

#[tokio::test]
async fn work_spawned_with_the_context_sees_the_call_end() {
    let (seen_tx, seen_rx) = oneshot::channel();
    let slot = Mutex::new(Some(seen_tx));
    let mut server = Server::new();
    server.add(
        ServiceDef::new("C").unary("spawns", move |ctx: netchan_rpc::Context, ()| {
            let seen = slot.lock().unwrap().take();
            async move {
                tokio::spawn(async move {
                    ctx.cancelled().await;
                    if let Some(seen) = seen {
                        let _ = seen.send(());
                    }
                });
                Ok(())
            }
        }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    guard(client.call::<_, ()>("C.spawns", &())).await.unwrap();
    guard(seen_rx)
        .await
        .expect("the background task saw the call end");
}

/// Registers `method`, whose handler spawns a task that waits for the call
/// to end and reports `ctx.end_reason()`, then runs `answer`.
fn reporting_server<F, Fut>(
    method: &'static str,
    answer: F,
) -> (Server, oneshot::Receiver<EndReason>)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), netchan_rpc::Status>> + Send + 'static,
{
    let (seen_tx, seen_rx) = oneshot::channel();
    let slot = Mutex::new(Some(seen_tx));
    let mut server = Server::new();
    let (service, method) = method.split_once('.').expect("a \"Service.method\" name");
    server.add(
        ServiceDef::new(service).unary(method, move |ctx: Context, ()| {
            let seen = slot.lock().unwrap().take();
            tokio::spawn(async move {
                ctx.cancelled().await;
                if let (Some(seen), Some(reason)) = (seen, ctx.end_reason()) {
                    let _ = seen.send(reason);
                }
            });
            answer()
        }),
    );
    (server, seen_rx)
}

/// Issue 24, item 5: `ctx.cancelled()` resolves however the call ends;
/// `ctx.end_reason()` tells a completed call from a cancelled one.
#[tokio::test]
async fn end_reason_tells_completion_from_cancellation() {
    let (server, seen) = reporting_server("C.done", || async { Ok(()) });
    let (client, _t) = duplex_pair(&server, Config::default());
    guard(client.call::<_, ()>("C.done", &())).await.unwrap();
    assert_eq!(guard(seen).await.unwrap(), EndReason::Completed);

    let (server, seen) = reporting_server("C.park", std::future::pending);
    let (client, _t) = duplex_pair(&server, Config::default());
    let mut call = Box::pin(client.call::<_, ()>("C.park", &()));
    // The park request is queued at its first poll, before the probe: once
    // the probe is answered, the server has started the parked call.
    tokio::select! {
        biased;
        _ = &mut call => panic!("the parked call ended"),
        probe = guard(client.call::<_, ()>("C.unknown", &())) => {
            assert_eq!(probe.unwrap_err().code(), Code::Unimplemented);
        }
    }
    drop(call);
    assert_eq!(guard(seen).await.unwrap(), EndReason::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn end_reason_says_when_the_deadline_ended_the_call() {
    let (server, seen) = reporting_server("C.park", std::future::pending);
    let (client, _t) = duplex_pair(&server, Config::default());
    let opts = CallOptions::default().timeout(Duration::from_millis(100));
    let err = guard(client.call_with::<_, ()>("C.park", &(), opts))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(guard(seen).await.unwrap(), EndReason::DeadlineExceeded);
}

/// The guide's pattern (docs/guide.md, §3): a producer task feeding a
/// streaming call stops when the client drops the stream, and knows why.
#[tokio::test]
async fn a_streaming_producer_stops_when_the_client_drops_the_stream() {
    let (stopped_tx, stopped) = oneshot::channel();
    let slot = Mutex::new(Some(stopped_tx));
    let mut server = Server::new();
    server.add(
        ServiceDef::new("C").stream("ticks", move |ctx: Context, ()| {
            let stopped = slot.lock().unwrap().take();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // Ends when the call does: the client dropped the stream.
                    while let Some(Ok(permit)) = tokio::select! {
                        permit = tx.reserve() => Some(permit),
                        _ = ctx.cancelled() => None,
                    } {
                        permit.send(Ok(n));
                        n += 1;
                    }
                    if let Some(stopped) = stopped {
                        let _ = stopped.send((n, ctx.end_reason()));
                    }
                });
                Ok(tokio_stream_from(rx))
            }
        }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());
    let mut ticks = guard(client.call_stream::<_, u64>("C.ticks", &(), CallOptions::default()))
        .await
        .unwrap();
    for want in 0..3u64 {
        assert_eq!(guard(ticks.next()).await.unwrap().unwrap(), want);
    }
    drop(ticks);
    let (produced, reason) = guard(stopped).await.unwrap();
    assert!(produced >= 3);
    assert_eq!(reason, Some(EndReason::Cancelled));
}

/// An `mpsc::Receiver` as a `Stream`.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
