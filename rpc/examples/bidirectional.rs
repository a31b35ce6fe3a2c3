//! Two peers on one TCP connection, each serving a service and calling the
//! other's — including a hub handler that, while serving a call from the
//! peer, calls back into that peer (the fileshare read-through-the-hub
//! pattern).
//!
//! Run with `cargo run -p netchan-rpc --example bidirectional`.

use std::error::Error;

use netchan_mux::{Config as MuxConfig, Session};
use netchan_rpc::{service, CallOptions, Client, Context, Server, Status};
use tokio::net::{TcpListener, TcpStream};

service! {
    /// Runs on the hub.
    pub trait Hub {
        /// Fetches `path` from the calling peer, via the hub.
        async fn read_through(&self, ctx: Context, path: String) -> Result<String, Status>;
    }
    /// Typed client for [`Hub`].
    pub struct HubClient;
}

service! {
    /// Runs on every peer.
    pub trait Peer {
        /// The contents of `path`.
        async fn fetch(&self, ctx: Context, path: String) -> Result<String, Status>;
    }
    /// Typed client for [`Peer`].
    pub struct PeerClient;
}

struct HubImpl {
    peer: PeerClient,
}

impl Hub for HubImpl {
    async fn read_through(&self, ctx: Context, path: String) -> Result<String, Status> {
        // The nested call inherits the outer caller's deadline.
        let peer = self.peer.with_options(CallOptions::propagate(&ctx));
        let body = peer.fetch(path).await?;
        Ok(format!("{body} (relayed by the hub)"))
    }
}

struct PeerImpl;

impl Peer for PeerImpl {
    async fn fetch(&self, _ctx: Context, path: String) -> Result<String, Status> {
        Ok(format!("<contents of {path}>"))
    }
}

/// Serves every channel opened to `name` on `session` with `server`.
fn serve_channels(session: &Session, name: &str, server: Server) -> Result<(), Box<dyn Error>> {
    let mut listener = session.listen(name)?;
    tokio::spawn(async move {
        while let Ok(conn) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                // Ends with an error when the session goes away under it;
                // nothing to do about that here.
                let _ = server.serve_named(conn, "peer").await;
            });
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // One TCP connection between the two processes (here: two tasks).
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (dialed, accepted) = tokio::try_join!(TcpStream::connect(addr), async {
        Ok(listener.accept().await?.0)
    })?;
    let peer_side = Session::client(dialed, MuxConfig::default());
    let hub_side = Session::server(accepted, MuxConfig::default());

    // The peer serves `Peer` on channel "peer".
    let mut peer_server = Server::new();
    peer_server.add(PeerImpl.into_service());
    serve_channels(&peer_side, "peer", peer_server)?;

    // The hub dials it, and serves `Hub` on channel "hub".
    let to_peer = PeerClient::new(Client::new(hub_side.dial("peer").await?));
    let mut hub_server = Server::new();
    hub_server.add(HubImpl { peer: to_peer }.into_service());
    serve_channels(&hub_side, "hub", hub_server)?;

    // The peer calls the hub, which calls back into the peer.
    let hub = HubClient::new(Client::new(peer_side.dial("hub").await?));
    let calls = (0..100).map(|i| {
        let hub = hub.clone();
        async move { hub.read_through(format!("file-{i}.txt")).await }
    });
    let answers = futures::future::try_join_all(calls).await?;
    println!(
        "{} nested calls answered; first: {}",
        answers.len(),
        answers[0]
    );

    peer_side.close().await;
    Ok(())
}
