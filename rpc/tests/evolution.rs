//! Message evolution, the supported way (docs/guide.md, section 3): the
//! codec writes fields in order without names, so a changed message type is
//! a new method; the old method stays until every peer has moved. These
//! tests put the old and the new types on the wire.

mod common;

use common::*;
use netchan_rpc::{Code, Config, Server, ServiceDef, Status};
use serde::{Deserialize, Serialize};

/// The request as deployed peers know it.
#[derive(Serialize, Deserialize)]
struct HelloV1 {
    name: String,
}

/// The request with a field added.
#[derive(Serialize, Deserialize)]
struct HelloV2 {
    name: String,
    #[serde(default)]
    lang: Option<String>,
}

fn evolved_server() -> Server {
    let mut server = Server::new();
    server.add(
        ServiceDef::new("G")
            .unary("hello", |_ctx, req: HelloV1| async move {
                Ok::<_, Status>(format!("hello, {}", req.name))
            })
            .unary("hello_v2", |_ctx, req: HelloV2| async move {
                let greeting = match req.lang.as_deref() {
                    Some("fr") => "bonjour",
                    _ => "hello",
                };
                Ok::<_, Status>(format!("{greeting}, {}", req.name))
            }),
    );
    server
}

#[tokio::test]
async fn old_and_new_callers_are_served_side_by_side() {
    let (client, _t) = duplex_pair(&evolved_server(), Config::default());
    let old = HelloV1 { name: "ada".into() };
    let reply: String = guard(client.call("G.hello", &old)).await.unwrap();
    assert_eq!(reply, "hello, ada");
    let new = HelloV2 {
        name: "ada".into(),
        lang: Some("fr".into()),
    };
    let reply: String = guard(client.call("G.hello_v2", &new)).await.unwrap();
    assert_eq!(reply, "bonjour, ada");
}

/// Pins why the rule exists: a changed type on an unchanged method does not
/// decode, in either direction, even with `#[serde(default)]`.
#[tokio::test]
async fn a_changed_type_on_the_same_method_is_refused_not_misread() {
    let (client, _t) = duplex_pair(&evolved_server(), Config::default());
    let new = HelloV2 {
        name: "ada".into(),
        lang: None,
    };
    let err = guard(client.call::<_, String>("G.hello", &new))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let old = HelloV1 { name: "ada".into() };
    let err = guard(client.call::<_, String>("G.hello_v2", &old))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}
