//! A typed service end to end: the `#[rpc_service]` trait, client stub and
//! registration, and its wire names, which a hand-built `ServiceDef` shares.

mod common;

use std::time::Duration;

use common::*;
use futures::{stream, StreamExt};
use netchan_rpc::{
    rpc_service, CallOptions, Client, Code, Config, Context, ItemStream, Server, ServiceDef, Status,
};
use serde::{Deserialize, Serialize};

/// A request with a few fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatReq {
    /// Path.
    pub path: String,
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatResp {
    /// Size.
    pub size: u64,
    /// Who asked (from metadata).
    pub who: Option<String>,
}

/// A toy file service.
#[rpc_service]
pub trait Files {
    /// Stats a file.
    async fn stat(&self, ctx: Context, req: StatReq) -> Result<StatResp, Status>;
    /// Reads a file in chunks of `n` bytes.
    async fn read(
        &self,
        ctx: Context,
        path: String,
        n: usize,
    ) -> Result<ItemStream<Vec<u8>>, Status>;
    /// Never answers.
    async fn hang(&self, ctx: Context) -> Result<(), Status>;
}

struct MemFiles;

impl Files for MemFiles {
    async fn stat(&self, ctx: Context, req: StatReq) -> Result<StatResp, Status> {
        match req.path.as_str() {
            "a.txt" => Ok(StatResp {
                size: 11,
                who: ctx.metadata().get("who").map(str::to_owned),
            }),
            other => Err(Status::not_found(format!("no such file: {other}"))),
        }
    }

    async fn read(
        &self,
        _ctx: Context,
        path: String,
        n: usize,
    ) -> Result<ItemStream<Vec<u8>>, Status> {
        chunks_of(&path, n)
    }

    async fn hang(&self, _ctx: Context) -> Result<(), Status> {
        std::future::pending().await
    }
}

/// The file `path` (only `a.txt` exists) in chunks of `n` bytes.
fn chunks_of(path: &str, n: usize) -> Result<ItemStream<Vec<u8>>, Status> {
    if path != "a.txt" {
        return Err(Status::not_found(path.to_owned()));
    }
    let data = b"hello world".to_vec();
    let chunks: Vec<Result<Vec<u8>, Status>> =
        data.chunks(n.max(1)).map(|c| Ok(c.to_vec())).collect();
    Ok(Box::pin(stream::iter(chunks)))
}

fn files_server() -> Server {
    let mut server = Server::new();
    server.add(MemFiles.into_service());
    server
}

#[tokio::test]
async fn typed_client_calls_unary_and_streaming_methods_over_tcp() {
    let (client, _t) = tcp_pair(&files_server(), Config::default()).await;
    let files = FilesClient::new(client);
    let st = guard(files.stat(StatReq {
        path: "a.txt".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        st,
        StatResp {
            size: 11,
            who: None
        }
    );
    let err = guard(files.stat(StatReq { path: "b".into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let chunks: Vec<Vec<u8>> = guard(async {
        files
            .read("a.txt".into(), 4)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await
    })
    .await;
    assert_eq!(chunks.concat(), b"hello world");
    assert_eq!(chunks.len(), 3);
}

#[tokio::test]
async fn typed_methods_are_served_under_trait_dot_method() {
    let (client, _t) = duplex_pair(&files_server(), Config::default());
    let st: StatResp = guard(client.call(
        "Files.stat",
        &StatReq {
            path: "a.txt".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(st.size, 11);
}

#[tokio::test]
async fn with_options_applies_metadata_and_timeouts_to_typed_calls() {
    let (client, _t) = duplex_pair(&files_server(), Config::default());
    let files = FilesClient::new(client.clone());
    let who = files.with_options(CallOptions::default().metadata("who", "ada"));
    let st = guard(who.stat(StatReq {
        path: "a.txt".into(),
    }))
    .await
    .unwrap();
    assert_eq!(st.who.as_deref(), Some("ada"));
    let quick = files.with_options(CallOptions::default().timeout(Duration::from_millis(50)));
    let err = guard(quick.hang()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // The stub exposes the untyped client too.
    assert!(!quick.client().is_closed());
    let _: &Client = files.client();
}

/// `Files` built by hand as a [`ServiceDef`], its streaming method taking its two
/// arguments as one tuple, the way `#[rpc_service]` sends them.
fn hand_built_files() -> ServiceDef {
    ServiceDef::new("Files")
        .unary("stat", |ctx: Context, req: StatReq| async move {
            MemFiles.stat(ctx, req).await
        })
        .stream("read", |_ctx, (path, n): (String, usize)| async move {
            chunks_of(&path, n)
        })
        .unary("hang", |_ctx, ()| async move {
            std::future::pending::<Result<(), Status>>().await
        })
}

/// Moving a service from a hand-built `ServiceDef` to `#[rpc_service]` is no wire change:
/// the generated client calls the hand-built server, method by method.
#[tokio::test]
async fn an_rpc_service_client_calls_a_hand_built_service_def() {
    let (a, b) = tokio::io::duplex(64 << 10);
    let mut server = Server::new();
    server.add(hand_built_files());
    let _serving = tokio::spawn(async move { server.serve(b).await });
    let files = FilesClient::new(Client::new(a));
    let stat = guard(files.stat(StatReq {
        path: "a.txt".into(),
    }))
    .await
    .unwrap();
    assert_eq!(stat.size, 11);
    let chunks: Vec<Vec<u8>> = guard(files.read("a.txt".into(), 4))
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(chunks.concat(), b"hello world");
    let err = guard(
        files
            .with_options(CallOptions::default().timeout(Duration::from_millis(50)))
            .hang(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "found and ran: {err}");
}
