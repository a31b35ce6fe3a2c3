//! Client and server interceptors (reading and changing a call's metadata,
//! refusing a call) and response metadata (trailers).

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use common::*;
use futures::StreamExt;
use netchan_rpc::{CallOptions, Code, Config, Server, ServiceDef, Status};

/// `T.whoami` answers the metadata its handler sees under "user".
fn server_with_auth(served: Arc<AtomicUsize>) -> Server {
    let mut server = Server::new();
    server
        .add(ServiceDef::new("T").unary("whoami", move |ctx, ()| {
            served.fetch_add(1, Ordering::SeqCst);
            let user = ctx.metadata().get("user").map(str::to_owned);
            async move { user.ok_or_else(|| Status::internal("no user")) }
        }))
        .intercept(|_method, md| match md.get("token") {
            Some("s3cret") => {
                md.set("user", "ada");
                Ok(())
            }
            _ => Err(Status::unauthenticated("a valid token is required")),
        });
    server
}

#[tokio::test]
async fn a_server_interceptor_refuses_a_call_or_rewrites_its_metadata() {
    let served = Arc::new(AtomicUsize::new(0));
    let server = server_with_auth(Arc::clone(&served));
    let (client, _t) = duplex_pair(&server, Config::default());

    let err = guard(client.call::<_, String>("T.whoami", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert_eq!(served.load(Ordering::SeqCst), 0, "the handler never ran");

    let authed = client.with_interceptor(|_method, md| {
        md.set("token", "s3cret");
        // A caller cannot claim a user: the server's interceptor decides.
        md.set("user", "mallory");
        Ok(())
    });
    let user: String = guard(authed.call("T.whoami", &())).await.unwrap();
    assert_eq!(user, "ada");
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refusing_client_interceptor_sends_nothing_and_others_are_unaffected() {
    let served = Arc::new(AtomicUsize::new(0));
    let server = server_with_auth(Arc::clone(&served));
    let (client, _t) = duplex_pair(&server, Config::default());
    let seen = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen);
    let refusing = client.with_interceptor(move |method, _md| {
        s.fetch_add(1, Ordering::SeqCst);
        Err(Status::permission_denied(format!(
            "{method} is not allowed from here"
        )))
    });
    let err = guard(refusing.call::<_, String>("T.whoami", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "T.whoami is not allowed from here");
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // The plain handle on the same conn is not intercepted; the server
    // refuses it for its own reason, and no call reached the handler.
    let err = guard(client.call::<_, String>("T.whoami", &()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn handlers_send_trailers_with_answers_and_stream_ends() {
    let mut server = Server::new();
    server.add(
        ServiceDef::new("T")
            .unary("unary", |ctx, n: u32| async move {
                ctx.set_trailer("cost", format!("{n} units"));
                ctx.set_trailer("cost", format!("{} units", n * 2)); // replaces
                Ok::<_, Status>(n + 1)
            })
            .unary("plain", |_ctx, n: u32| async move { Ok::<_, Status>(n) })
            .stream("stream", |ctx, n: u32| async move {
                ctx.set_trailer("count", n.to_string());
                Ok(futures::stream::iter((0..n).map(Ok::<_, Status>)))
            }),
    );
    let (client, _t) = duplex_pair(&server, Config::default());

    let (reply, trailers): (u32, _) =
        guard(client.call_with_trailers("T.unary", &3u32, CallOptions::default()))
            .await
            .unwrap();
    assert_eq!(reply, 4);
    assert_eq!(trailers.get("cost"), Some("6 units"));
    assert_eq!(trailers.len(), 1);

    let (_, none): (u32, _) =
        guard(client.call_with_trailers("T.plain", &1u32, CallOptions::default()))
            .await
            .unwrap();
    assert!(none.is_empty());

    let mut stream = guard(client.call_stream::<_, u32>("T.stream", &2u32, CallOptions::default()))
        .await
        .unwrap();
    assert!(stream.trailers().is_none(), "trailers come at the end");
    let mut items = Vec::new();
    while let Some(item) = guard(stream.next()).await {
        items.push(item.unwrap());
    }
    assert_eq!(items, [0, 1]);
    assert_eq!(stream.trailers().and_then(|t| t.get("count")), Some("2"));
}
