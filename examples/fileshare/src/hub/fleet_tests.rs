//! Hubs of one fleet in one runtime: real hubs and real clients over loopback TCP, the
//! hubs' directories on a real etcd (netchan_testkit::etcd; skipped without etcd, except
//! under `CI=true`).

use std::sync::Arc;

use netchan_rpc::Code;
use netchan_testkit::etcd::Cluster;
use netchan_testkit::within;
use tokio::net::TcpListener;

use super::tests::{client_opts, TestHub};
use super::{HubOptions, HubState};
use crate::client::{ConnectError, Peer};
use crate::directory::{Directory, Etcd, EtcdConfig, HubId};

async fn fleet_hub(etcd: &Cluster, id: &str) -> TestHub {
    let config = EtcdConfig::new(etcd.endpoints(), HubId::new(id).unwrap());
    let directory = Etcd::start(config).await.unwrap();
    within(15, "the hub's directory comes up", directory.wait_up()).await;
    let directory: Arc<dyn Directory> = Arc::new(directory);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = HubState::new(HubOptions {
        directory: Some(directory),
        // Every client of these tests comes from 127.0.0.1, 50 at once.
        max_pending_per_addr: 128,
        ..HubOptions::default()
    });
    let task = tokio::spawn(state.clone().serve(listener));
    TestHub { state, addr, task }
}

fn quiet() -> crate::client::Notify {
    Arc::new(|_msg: String| {})
}

fn is_taken(r: &Result<Peer, ConnectError>) -> bool {
    matches!(r, Err(ConnectError::Publish { status, .. }) if status.code() == Code::AlreadyExists)
}

#[tokio::test]
async fn fifty_pairs_of_clients_racing_for_a_name_on_two_hubs_have_one_winner_each() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = fleet_hub(&etcd, "hub-a").await;
    let b = fleet_hub(&etcd, "hub-b").await;
    let root = tempfile::tempdir().unwrap();
    let races = (0..50).map(|i| {
        let name = format!("racer-{i}");
        let (oa, ob) = (
            client_opts(&a, &name, root.path()),
            client_opts(&b, &name, root.path()),
        );
        async move {
            let (ra, rb) = tokio::join!(Peer::start(oa, quiet()), Peer::start(ob, quiet()));
            (name, ra, rb)
        }
    });
    let results = within(60, "50 races", futures::future::join_all(races)).await;
    let mut peers = Vec::new();
    for (name, ra, rb) in results {
        match (ra, rb) {
            (Ok(p), ref r) if is_taken(r) => peers.push(p),
            (ref r, Ok(p)) if is_taken(r) => peers.push(p),
            (ra, rb) => panic!(
                "{name}: not exactly one winner: {:?} / {:?}",
                ra.err().map(|e| e.to_string()),
                rb.err().map(|e| e.to_string())
            ),
        }
    }
    assert_eq!(peers.len(), 50);
    // Both hubs list the 50 names once the watch has delivered them.
    for hub in [&a, &b] {
        let mut changes = hub.state.subscribe();
        within(10, "every name listed", async {
            while hub.state.names().len() < 50 {
                changes.changed().await.unwrap();
            }
        })
        .await;
        assert_eq!(hub.state.names().len(), 50);
    }
}
