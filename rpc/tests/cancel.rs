//! Cancellation: dropping a call future on the client drops the handler on
//! the server.

mod common;

use std::sync::Mutex;

use common::*;
use netchan_rpc::{Config, Server};
use tokio::sync::oneshot;

fn forever_server() -> (Server, oneshot::Receiver<()>, oneshot::Receiver<()>) {
    let mut server = Server::new();
    let (started, dropped) = register_forever(&mut server, "C.forever");
    server.register("C.echo", |_ctx, s: String| async move { Ok(s) });
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
    server.register("C.spawns", move |ctx: netchan_rpc::Context, ()| {
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
    });
    let (client, _t) = duplex_pair(&server, Config::default());
    guard(client.call::<_, ()>("C.spawns", &())).await.unwrap();
    guard(seen_rx)
        .await
        .expect("the background task saw the call end");
}
