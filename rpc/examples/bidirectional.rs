//! Two peers on one TCP connection, each serving a service and calling the
//! other's, including a hub handler that, while serving a call from a
//! peer, calls back into that very peer (the NAT case: only the peer could
//! open the connection).
//!
//! Run with `cargo run -p netchan-rpc --example bidirectional`.

use std::error::Error;

use netchan_mux::{Config as MuxConfig, Session};
use netchan_rpc::{rpc_service, CallOptions, Context, Peer, Server, Status};
use tokio::net::{TcpListener, TcpStream};

/// Runs on the hub.
#[rpc_service]
pub trait Hub {
    /// Fetches `path` from the calling peer, via the hub.
    async fn read_through(&self, ctx: Context, path: String) -> Result<String, Status>;
}

/// Runs on every device.
#[rpc_service]
pub trait Files {
    /// The contents of `path`.
    async fn fetch(&self, ctx: Context, path: String) -> Result<String, Status>;
}

struct HubImpl;

impl Hub for HubImpl {
    async fn read_through(&self, ctx: Context, path: String) -> Result<String, Status> {
        // Call back the peer whose call this is; the nested call inherits
        // the outer caller's deadline.
        let caller = FilesClient::new(ctx.callback()?).with_options(CallOptions::propagate(&ctx));
        let body = caller.fetch(path).await?;
        Ok(format!("{body} (relayed by the hub)"))
    }
}

struct FilesImpl;

impl Files for FilesImpl {
    async fn fetch(&self, _ctx: Context, path: String) -> Result<String, Status> {
        Ok(format!("<contents of {path}>"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // One TCP connection between the two processes (here: two tasks). The
    // device dials out; the hub only accepts.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hub = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let session = Session::server(tcp, MuxConfig::default());
        let mut server = Server::new();
        server.add(HubImpl.into_service());
        let peer = Peer::connect(&session, server).await?;
        peer.closed().await;
        Ok::<_, Box<dyn Error + Send + Sync>>(())
    });

    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let session = Session::client(tcp, MuxConfig::default());
    let mut server = Server::new();
    server.add(FilesImpl.into_service());
    let device = Peer::connect(&session, server).await?;

    // The device calls the hub, which calls back into the device.
    let hub_client = HubClient::new(device.client().clone());
    let calls = (0..100).map(|i| {
        let hub_client = hub_client.clone();
        async move { hub_client.read_through(format!("file-{i}.txt")).await }
    });
    let answers = futures::future::try_join_all(calls).await?;
    println!(
        "{} nested calls answered; first: {}",
        answers.len(),
        answers[0]
    );

    session.close().await;
    hub.await?.map_err(|e| e.to_string())?;
    Ok(())
}
