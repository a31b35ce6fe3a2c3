//! No descriptor sent with a call outlives it, on either side: after handler errors,
//! cancellation, a response nobody waits for, and a session torn down mid-call, the process's
//! open descriptors (`/proc/self/fd`) return to what they were. One test in a binary of its
//! own, so nothing else opens descriptors while it counts.
#![cfg(target_os = "linux")]

use netchan_mux::{Config as MuxConfig, Mode, Session};
use netchan_rpc::{CallOptions, Client, Context, Server, ServiceDef, Status};
use netchan_testkit::{
    fds::{back_to, open_fds, unlinked_file},
    within,
};
use std::{os::fd::OwnedFd, sync::Arc, time::Duration};
use tokio::sync::Notify;

fn dups(file: &std::fs::File, n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| OwnedFd::from(file.try_clone().unwrap()))
        .collect()
}

/// A served session and a client on one of its channels.
async fn setup(server: Server) -> (Client, Session, Session) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let builder = Session::builder_with_fds(b, Mode::Server, MuxConfig::default());
    let mut listener = builder.listen("rpc").unwrap();
    let server_session = builder.start();
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let _ = server.serve(conn).await;
            });
        }
    });
    let client_session = Session::with_fds(a, Mode::Client, MuxConfig::default());
    let client = Client::new(client_session.dial("rpc").await.unwrap());
    (client, client_session, server_session)
}

#[tokio::test(flavor = "current_thread")]
async fn no_descriptor_outlives_its_call() {
    within(60, "rpc fd leak scenarios", async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let file = unlinked_file("x");
        let baseline = open_fds();
        let started = Arc::new(Notify::new());
        let reply_file = Arc::new(unlinked_file("x"));
        let mut server = Server::new();
        server.add(
            ServiceDef::new("T").unary("fail", |_ctx: Context, (): ()| async move {
                // Leaves the request's descriptors untaken and fails.
                Err::<(), _>(Status::internal("no"))
            }),
        );
        let s = started.clone();
        server.add(
            ServiceDef::new("T").unary("hang", move |ctx: Context, (): ()| {
                let s = s.clone();
                async move {
                    let _mine = ctx.take_fds();
                    s.notify_one();
                    std::future::pending::<()>().await;
                    Ok(())
                }
            }),
        );
        let (s, r) = (started.clone(), reply_file.clone());
        server.add(
            ServiceDef::new("T").unary("late", move |ctx: Context, (): ()| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.notify_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    ctx.reply_fds(dups(&r, 3))?;
                    Ok(())
                }
            }),
        );
        server.add(ServiceDef::new("T").unary("fail_after_reply_fds", {
            let r = reply_file.clone();
            move |ctx: Context, (): ()| {
                let r = r.clone();
                async move {
                    ctx.reply_fds(dups(&r, 4))?;
                    Err::<(), _>(Status::aborted("changed my mind"))
                }
            }
        }));
        // The server's reply file stays open throughout (one descriptor).
        let baseline = baseline + 1;
        let (client, client_session, server_session) = setup(server).await;
        let baseline_with_sessions = open_fds();

        // 1. Handler error with untaken request descriptors.
        for _ in 0..5 {
            let opts = CallOptions::default().fds(dups(&file, 3));
            let err = client
                .call_with::<_, ()>("T.fail", &(), opts)
                .await
                .unwrap_err();
            assert_eq!(err.message(), "no");
        }
        back_to(baseline_with_sessions, "handler error").await;

        // 2. A handler's own descriptors for a response it then fails: closed.
        for _ in 0..5 {
            let err = client
                .call_with_fds::<_, ()>("T.fail_after_reply_fds", &(), CallOptions::default())
                .await
                .unwrap_err();
            assert_eq!(err.message(), "changed my mind");
        }
        back_to(baseline_with_sessions, "handler error after reply_fds").await;

        // 3. The caller gives up while the handler holds the descriptors.
        {
            let opts = CallOptions::default().fds(dups(&file, 2));
            let call = client.call_with::<_, ()>("T.hang", &(), opts);
            tokio::select! {
                _ = call => panic!("T.hang answered"),
                _ = started.notified() => {}
            }
        }
        back_to(baseline_with_sessions, "cancelled call").await;

        // 4. A response with descriptors nobody waits for any more.
        {
            let call = client.call_with_fds::<_, ()>("T.late", &(), CallOptions::default());
            tokio::select! {
                _ = call => panic!("T.late answered early"),
                _ = started.notified() => {}
            }
            // The handler still answers, with three descriptors, to a call the client
            // dropped; let it (the count then settles).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        back_to(baseline_with_sessions, "response for an abandoned call").await;

        // 5. The session torn down mid-call, descriptors in the handler's hands.
        {
            let opts = CallOptions::default().fds(dups(&file, 2));
            let c = client.clone();
            let call = tokio::spawn(async move { c.call_with::<_, ()>("T.hang", &(), opts).await });
            started.notified().await;
            client_session.close().await;
            server_session.close().await;
            let err = call.await.unwrap().unwrap_err();
            assert!(err.is_conn_lost(), "{err}");
        }
        drop(client);
        back_to(baseline, "session torn down mid-call").await;
        drop(reply_file);
    })
    .await;
}
