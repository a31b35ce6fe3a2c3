//! Deadlines: enforced by the client, carried to the server as a relative
//! duration, and enforced there by dropping the handler. Paused time.

mod common;

use std::time::Duration;

use common::*;
use netchan_rpc::{CallOptions, Code, Config, Server, ServiceDef, Status};
use tokio::{sync::oneshot, time::Instant};

#[tokio::test(start_paused = true)]
async fn client_returns_deadline_exceeded_when_the_timeout_passes() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let start = Instant::now();
    let err = guard(client.call_with::<_, u64>(
        "Test.sleep_ms",
        &60_000u64,
        CallOptions::default().timeout(Duration::from_millis(250)),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(1),
        "{took:?}"
    );
    // A call that fits in its deadline succeeds.
    let ms: u64 = guard(client.call_with(
        "Test.sleep_ms",
        &100u64,
        CallOptions::default().timeout(Duration::from_secs(1)),
    ))
    .await
    .unwrap();
    assert_eq!(ms, 100);
}

#[tokio::test(start_paused = true)]
async fn server_drops_the_handler_when_the_deadline_passes() {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let slot = std::sync::Mutex::new(Some(dropped_tx));
    let mut server = Server::new();
    server.add(ServiceDef::new("D").unary("forever", move |_ctx, ()| {
        let signal = DropSignal(slot.lock().unwrap().take());
        async move {
            let _signal = signal;
            std::future::pending::<()>().await;
            Ok(())
        }
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call_with::<_, ()>(
        "D.forever",
        &(),
        CallOptions::default().timeout(Duration::from_millis(100)),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    guard(dropped_rx).await.expect("handler was dropped");
}

#[tokio::test(start_paused = true)]
async fn a_handler_watching_its_context_is_dropped_at_the_deadline() {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let slot = std::sync::Mutex::new(Some(dropped_tx));
    let mut server = Server::new();
    server.add(ServiceDef::new("D").unary("ctx", move |ctx, ()| {
        let signal = DropSignal(slot.lock().unwrap().take());
        async move {
            let _signal = signal;
            // Cooperative handlers can also watch the context.
            ctx.cancelled().await;
            Err::<(), _>(Status::cancelled("saw cancellation"))
        }
    }));
    let (client, _t) = duplex_pair(&server, Config::default());
    let err = guard(client.call_with::<_, ()>(
        "D.ctx",
        &(),
        CallOptions::default().deadline(Instant::now() + Duration::from_millis(50)),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    guard(dropped_rx).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_already_expired_deadline_fails_without_sending() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let past = Instant::now();
    tokio::time::advance(Duration::from_millis(5)).await;
    let err = guard(client.call_with::<_, String>(
        "Test.echo",
        "x",
        CallOptions::default().deadline(past),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let err = guard(client.call_with::<_, String>(
        "Test.echo",
        "x",
        CallOptions::default().timeout(Duration::ZERO),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn huge_timeouts_are_clamped_not_panics() {
    let server = test_server(Config::default());
    let (client, _t) = duplex_pair(&server, Config::default());
    let got: String = guard(client.call_with(
        "Test.echo",
        "far future",
        CallOptions::default().timeout(Duration::MAX),
    ))
    .await
    .unwrap();
    assert_eq!(got, "far future");
    let got: String = guard(client.call_with(
        "Test.echo",
        "u64 secs",
        CallOptions::default().timeout(Duration::from_secs(u64::MAX)),
    ))
    .await
    .unwrap();
    assert_eq!(got, "u64 secs");
}
