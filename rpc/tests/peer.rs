//! `Peer`: both directions of RPC over one mux session, calling the caller
//! back from inside a handler; `Server::serve_incoming` and its graceful
//! shutdown.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures::{stream, StreamExt};
use netchan_rpc::{
    CallOptions, Client, Code, Config, FromStream, Peer, PeerError, Server, ServiceDef, Status,
};
use tokio::sync::oneshot;

/// The NAT case: only the "device" side can open the connection, yet the
/// hub calls back into the device while serving the device's call.
#[tokio::test]
async fn a_hub_handler_calls_back_the_peer_whose_call_it_serves() {
    let (device_session, hub_session) = mux_sessions().await;

    let mut hub = Server::new();
    hub.add(
        ServiceDef::new("Hub").unary("report", |ctx, ()| async move {
            let back = ctx.callback()?;
            let temp: i32 = back.call("Device.temperature", &()).await?;
            Ok(format!("device says {temp} C"))
        }),
    );
    let mut device = Server::new();
    device.add(
        ServiceDef::new("Device")
            .unary("temperature", |_ctx, ()| async move { Ok::<_, Status>(21) }),
    );

    let (device_peer, hub_peer) = guard(async {
        tokio::try_join!(
            Peer::connect(&device_session, device),
            Peer::connect(&hub_session, hub),
        )
    })
    .await
    .unwrap();

    let report: String = guard(device_peer.client().call("Hub.report", &()))
        .await
        .unwrap();
    assert_eq!(report, "device says 21 C");
    // And the hub can call the device on its own initiative.
    let temp: i32 = guard(hub_peer.client().call("Device.temperature", &()))
        .await
        .unwrap();
    assert_eq!(temp, 21);
}

#[tokio::test]
async fn a_peer_that_connects_before_the_other_side_listens_still_connects() {
    let (a, b) = mux_sessions().await;
    let mut server_b = Server::new();
    server_b.add(ServiceDef::new("B").unary("ping", |_ctx, ()| async move {
        Ok::<_, Status>("pong".to_string())
    }));
    // A starts alone: nobody listens on B yet, so its dial is refused and
    // retried; B joins once A is known to be waiting.
    let early = tokio::spawn(async move { Peer::connect(&a, Server::new()).await });
    tokio::task::yield_now().await;
    let late = guard(Peer::connect(&b, server_b)).await.unwrap();
    let early = guard(early).await.unwrap().unwrap();
    let pong: String = guard(early.client().call("B.ping", &())).await.unwrap();
    assert_eq!(pong, "pong");
    drop(late);
}

#[tokio::test(start_paused = true)]
async fn connecting_a_peer_alone_times_out_with_a_typed_error() {
    let (a, _b) = tokio::io::duplex(64 << 10);
    let session = netchan_mux::Session::client(a, mux_config());
    let _other = netchan_mux::Session::server(_b, mux_config());
    let config = Config::default().handshake_timeout(Duration::from_secs(3));
    let err = guard(Peer::connect(&session, Server::with_config(config)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PeerError::Timeout { after } if after == Duration::from_secs(3)),
        "{err:?}"
    );
}

#[tokio::test]
async fn callback_outside_a_peer_is_a_failed_precondition() {
    let mut server = Server::new();
    server.add(ServiceDef::new("T").unary("back", |ctx, ()| async move {
        let _caller = ctx.callback()?;
        Ok(())
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call::<_, ()>("T.back", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

/// A server with `T.park`, which reports that it started and then waits
/// for its release (or forever when there is none), and `T.echo`.
fn parking_server() -> (Server, oneshot::Receiver<()>, oneshot::Sender<()>) {
    let (started_tx, started) = oneshot::channel::<()>();
    let (release, release_rx) = oneshot::channel::<()>();
    let hooks = Arc::new(Mutex::new(Some((started_tx, release_rx))));
    let mut server = Server::new();
    server.add(
        ServiceDef::new("T")
            .unary("park", move |_ctx, ()| {
                let hooks = hooks.lock().unwrap().take();
                async move {
                    let (started, release) = hooks.expect("parked once");
                    let _ = started.send(());
                    let _ = release.await;
                    Ok::<_, Status>("finished".to_string())
                }
            })
            .unary("echo", |_ctx, s: String| async move { Ok(s) }),
    );
    (server, started, release)
}

#[tokio::test]
async fn shutdown_refuses_new_calls_and_lets_running_ones_finish() {
    let (server, started, release) = parking_server();
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let incoming = FromStream::new(stream::iter([Ok(server_io)]).chain(stream::pending()));
        let shutdown = async {
            let _ = stopped.await;
        };
        server
            .serve_incoming(incoming, shutdown, Duration::from_secs(60))
            .await
    });
    let client = Client::new(client_io);
    let c = client.clone();
    let parked = tokio::spawn(async move { c.call::<_, String>("T.park", &()).await });
    guard(started).await.unwrap();
    stop.send(()).unwrap();

    // Calls admitted before the server saw the shutdown still succeed;
    // bounded: the shutdown is seen within a few round trips.
    let mut refused = None;
    for i in 0..10_000 {
        match guard(client.call::<_, String>("T.echo", &format!("{i}"))).await {
            Ok(_) => tokio::task::yield_now().await,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("new calls are refused once shutdown began");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert!(refused.message().contains("shutting down"), "{refused}");
    assert!(!serving.is_finished(), "a call is still running");

    release.send(()).unwrap();
    assert_eq!(guard(parked).await.unwrap().unwrap(), "finished");
    guard(serving).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_calls_still_running_after_the_grace() {
    let (server, started, _release) = parking_server();
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let incoming = FromStream::new(stream::iter([Ok(server_io)]).chain(stream::pending()));
        let shutdown = async {
            let _ = stopped.await;
        };
        server
            .serve_incoming(incoming, shutdown, Duration::from_secs(5))
            .await
    });
    let client = Client::new(client_io);
    let c = client.clone();
    let parked = tokio::spawn(async move {
        c.call_with::<_, String>("T.park", &(), CallOptions::default())
            .await
    });
    guard(started).await.unwrap();
    let stopped_at = tokio::time::Instant::now();
    stop.send(()).unwrap();
    guard(serving).await.unwrap();
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(5),
        "waited the grace"
    );
    let err = guard(parked).await.unwrap().unwrap_err();
    assert!(err.is_conn_lost(), "{err}");
}

/// Issue 24, item 2: `Peer::connect` gave its client the server's
/// `Config`; `connect_with` gives the client half its own, and the server
/// half keeps the server's.
#[tokio::test]
async fn connect_with_gives_the_client_half_its_own_config() {
    let (near_session, far_session) = mux_sessions().await;
    let mut far = Server::new();
    far.add(
        ServiceDef::new("Far").unary("text", |_ctx, n: usize| async move {
            Ok::<_, Status>("x".repeat(n))
        }),
    );
    let mut near = Server::new();
    near.add(
        ServiceDef::new("Near").unary("text", |_ctx, n: usize| async move {
            Ok::<_, Status>("y".repeat(n))
        }),
    );
    let small = Config::default().max_message_size(4096);
    let (near_peer, far_peer) = guard(async {
        tokio::try_join!(
            Peer::connect_with(&near_session, near, small),
            Peer::connect(&far_session, far),
        )
    })
    .await
    .unwrap();
    // Near's client accepts 4 KiB: far refuses a larger answer, naming it.
    let err = guard(
        near_peer
            .client()
            .call::<_, String>("Far.text", &10_000usize),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains("the client's max_message_size of 4096 bytes"),
        "{err}"
    );
    let ok: String = guard(near_peer.client().call("Far.text", &100usize))
        .await
        .unwrap();
    assert_eq!(ok.len(), 100);
    // Near's server half kept the default limit: far may send it 10 000 bytes.
    let n = guard(
        far_peer
            .client()
            .call::<_, String>("Near.text", &10_000usize),
    )
    .await
    .unwrap();
    assert_eq!(n.len(), 10_000);
}

/// Issue 24, item 12: serving until the source of conns ends is one call.
#[tokio::test]
async fn serve_all_serves_until_the_source_ends_and_its_conns_close() {
    let server = test_server(Config::default());
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let serving = tokio::spawn(async move {
        server
            .serve_all(FromStream::new(stream::iter([Ok(server_io)])))
            .await
    });
    let client = Client::new(client_io);
    let echoed: String = guard(client.call("Test.echo", "hi")).await.unwrap();
    assert_eq!(echoed, "hi");
    drop(client);
    guard(serving).await.unwrap();
}
