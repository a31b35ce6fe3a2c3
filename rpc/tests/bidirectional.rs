//! Two peers on ONE loopback TCP connection (two mux sessions), each
//! serving a service and calling the other's, including a hub handler that
//! calls back into the peer whose call it is serving.

mod common;

use common::*;
use netchan_rpc::{rpc_service, Client, Code, Context, Server, Status};

/// The hub's service.
#[rpc_service]
pub trait Hub {
    /// Reads `path` from the calling peer, through the hub.
    async fn read_through(&self, ctx: Context, path: String) -> Result<String, Status>;
    /// Doubles `n`.
    async fn double(&self, ctx: Context, n: u64) -> Result<u64, Status>;
}

/// A peer's service.
#[rpc_service]
pub trait Peer {
    /// Returns the contents of `path`.
    async fn fetch(&self, ctx: Context, path: String) -> Result<String, Status>;
}

struct HubImpl {
    /// The hub's client into the peer (a channel the hub dialed).
    peer: PeerClient,
}

impl Hub for HubImpl {
    async fn read_through(&self, _ctx: Context, path: String) -> Result<String, Status> {
        let body = self.peer.fetch(path).await?;
        Ok(format!("{body} (via hub)"))
    }

    async fn double(&self, _ctx: Context, n: u64) -> Result<u64, Status> {
        Ok(n * 2)
    }
}

struct PeerImpl;

impl Peer for PeerImpl {
    async fn fetch(&self, _ctx: Context, path: String) -> Result<String, Status> {
        match path.strip_prefix("file-") {
            Some(n) => Ok(format!("contents of {n}")),
            None => Err(Status::not_found(path)),
        }
    }
}

/// Sets up both peers on one TCP connection; returns A's hub client and
/// the hub's peer client (B calling A directly).
async fn two_peers() -> (
    HubClient,
    PeerClient,
    netchan_mux::Session,
    netchan_mux::Session,
) {
    let (a, b) = mux_sessions().await;
    // A serves Peer on "peer".
    let mut peer_server = Server::new();
    peer_server.add(PeerImpl.into_service());
    let _a_serving = serve_mux(&peer_server, &a, "peer");
    // B dials A's "peer" channel, then serves Hub on "hub".
    let b_to_a = PeerClient::new(Client::new(guard(b.dial("peer")).await.unwrap()));
    let mut hub_server = Server::new();
    hub_server.add(
        HubImpl {
            peer: b_to_a.clone(),
        }
        .into_service(),
    );
    let _b_serving = serve_mux(&hub_server, &b, "hub");
    // A dials B's "hub".
    let a_to_b = HubClient::new(Client::new(guard(a.dial("hub")).await.unwrap()));
    (a_to_b, b_to_a, a, b)
}

#[tokio::test]
async fn both_peers_serve_and_call_on_one_tcp_connection() {
    let (hub, peer, _a, _b) = two_peers().await;
    assert_eq!(guard(hub.double(21)).await.unwrap(), 42);
    assert_eq!(
        guard(peer.fetch("file-1".into())).await.unwrap(),
        "contents of 1"
    );
}

#[tokio::test]
async fn a_hub_handler_calling_back_into_the_caller_does_not_deadlock() {
    let (hub, _peer, _a, _b) = two_peers().await;
    assert_eq!(
        guard(hub.read_through("file-7".into())).await.unwrap(),
        "contents of 7 (via hub)"
    );
    // Errors from the nested call come back through both hops.
    let err = guard(hub.read_through("nope".into())).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn hundred_concurrent_callbacks() {
    let (hub, peer, _a, _b) = two_peers().await;
    let calls = (0..100).map(|i| {
        let (hub, peer) = (hub.clone(), peer.clone());
        tokio::spawn(async move {
            let got = hub.read_through(format!("file-{i}")).await.unwrap();
            assert_eq!(got, format!("contents of {i} (via hub)"));
            // Interleave direct calls in the other direction.
            let direct = peer.fetch(format!("file-{i}")).await.unwrap();
            assert_eq!(direct, format!("contents of {i}"));
        })
    });
    guard(futures::future::try_join_all(calls)).await.unwrap();
}

#[tokio::test]
async fn a_hundred_concurrent_callbacks_complete_on_one_thread() {
    hundred_concurrent_callbacks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_callbacks_complete_on_two_threads() {
    hundred_concurrent_callbacks().await;
}
