//! Helpers shared by the rpc integration tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use netchan_rpc::{Client, Config, Server, ServiceDef, Status};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

/// Generous hang guard for waits that should complete promptly.
pub const GUARD: Duration = Duration::from_secs(10);

/// Runs `fut` under [`GUARD`], failing the test on timeout.
pub async fn guard<F: std::future::Future>(fut: F) -> F::Output {
    netchan_testkit::within(GUARD.as_secs(), "operation hung past the test guard", fut).await
}

/// A server with a handful of test methods.
pub fn test_server(config: Config) -> Server {
    let mut server = Server::with_config(config);
    server.add(
        ServiceDef::new("Test")
            .unary("echo", |_ctx, s: String| async move { Ok(s) })
            .unary("add", |_ctx, (a, b): (u64, u64)| async move {
                a.checked_add(b)
                    .ok_or_else(|| Status::out_of_range("sum overflows"))
            })
            .unary("sleep_ms", |_ctx, ms: u64| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(ms)
            })
            .unary("fail", |_ctx, msg: String| async move {
                Err::<(), _>(Status::not_found(msg))
            })
            .unary("panic", |_ctx, msg: String| async move {
                if !msg.is_empty() {
                    panic!("{msg}");
                }
                Ok(())
            })
            .unary("metadata", |ctx, key: String| async move {
                Ok(ctx.metadata().get(&key).map(str::to_owned))
            })
            .unary("peer", |ctx, ()| async move {
                Ok(ctx.peer().map(str::to_owned))
            })
            .unary("blob", |_ctx, n: usize| async move { Ok(vec![7u8; n]) }),
    );
    server
}

/// A client and a served conn over an in-memory duplex pipe.
pub fn duplex_pair(
    server: &Server,
    config: Config,
) -> (Client, JoinHandle<Result<(), netchan_rpc::Error>>) {
    let (a, b) = tokio::io::duplex(256 << 10);
    let server = server.clone();
    let task = tokio::spawn(async move { server.serve_named(b, "duplex-peer").await });
    (Client::with_config(a, config), task)
}

/// A client and a served conn over loopback TCP.
pub async fn tcp_pair(
    server: &Server,
    config: Config,
) -> (Client, JoinHandle<Result<(), netchan_rpc::Error>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server.clone();
    let task = tokio::spawn(async move {
        let (conn, peer) = listener.accept().await?;
        conn.set_nodelay(true)?;
        server.serve_named(conn, peer.to_string()).await
    });
    let conn = guard(TcpStream::connect(addr)).await.unwrap();
    conn.set_nodelay(true).unwrap();
    (Client::with_config(conn, config), task)
}

/// Fires its sender when dropped: lets a test observe that the server
/// dropped a handler future.
pub struct DropSignal(pub Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits (under [`GUARD`]) until `counter` reaches `n`; `changed` is notified after each
/// increment.
pub async fn until_count(
    counter: &std::sync::atomic::AtomicUsize,
    changed: &tokio::sync::Notify,
    n: usize,
) {
    guard(async {
        while counter.load(std::sync::atomic::Ordering::SeqCst) < n {
            changed.notified().await;
        }
    })
    .await;
}

/// Starts `n` concurrent calls of `method` (taking and returning `()`), each in its own task.
pub fn spawn_calls(
    client: &Client,
    method: &'static str,
    n: usize,
) -> Vec<JoinHandle<Result<(), Status>>> {
    (0..n)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.call::<_, ()>(method, &()).await })
        })
        .collect()
}

/// Serves under `method` (`"Service.method"`) a handler that never finishes. Returns two receivers: the first
/// fires when the first call's handler starts, the second when the server drops it.
pub fn register_forever(
    server: &mut Server,
    method: &str,
) -> (oneshot::Receiver<()>, oneshot::Receiver<()>) {
    let (started_tx, started_rx) = oneshot::channel();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let slots = std::sync::Mutex::new((Some(started_tx), Some(dropped_tx)));
    let (service, method) = method.split_once('.').expect("a \"Service.method\" name");
    server.add(ServiceDef::new(service).unary(method, move |_ctx, ()| {
        let (started, dropped) = {
            let mut s = slots.lock().unwrap();
            (s.0.take(), s.1.take())
        };
        let signal = DropSignal(dropped);
        async move {
            let _signal = signal;
            if let Some(started) = started {
                let _ = started.send(());
            }
            std::future::pending::<()>().await;
            Ok(())
        }
    }));
    (started_rx, dropped_rx)
}

/// Both ends of one loopback TCP connection wrapped in mux sessions.
pub async fn mux_sessions() -> (netchan_mux::Session, netchan_mux::Session) {
    let (dialed, accepted) = guard(netchan_testkit::tcp_pair()).await;
    (
        netchan_mux::Session::client(dialed, mux_config()),
        netchan_mux::Session::server(accepted, mux_config()),
    )
}

/// Mux settings for tests: a short close grace so closing is quick.
pub fn mux_config() -> netchan_mux::Config {
    netchan_mux::Config::default().close_grace(Duration::from_millis(100))
}

/// Serves every channel opened to `name` on `session` with `server`.
pub fn serve_mux(server: &Server, session: &netchan_mux::Session, name: &str) -> JoinHandle<()> {
    let listener = session.listen(name).unwrap();
    let server = server.clone();
    tokio::spawn(async move {
        // Ends with the session; the test's runtime ends it otherwise.
        let never = std::future::pending();
        server.serve_incoming(listener, never, GUARD).await
    })
}

/// A client over a mux channel on loopback TCP, the server on the other
/// session. Returns the sessions too (client side, server side).
pub async fn mux_pair(
    server: &Server,
    config: Config,
) -> (Client, netchan_mux::Session, netchan_mux::Session) {
    let (near, far) = mux_sessions().await;
    let _serving = serve_mux(server, &far, "rpc");
    let conn = guard(near.dial("rpc")).await.unwrap();
    (Client::with_config(conn, config), near, far)
}
