//! A fleet of real `share hub --etcd` processes on a real etcd (netchan_testkit::etcd):
//! one name space and one list across hubs, a killed hub's names freed within its lease,
//! and etcd going away and coming back. Skipped when etcd is not installed, except under
//! `CI=true`, where they fail instead.
//!
//! The tests block on processes (the `common` helpers), so they run on a multi-threaded
//! runtime whose workers keep reading etcd's logs meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use netchan_testkit::etcd::Cluster;

/// The lease TTL of the hubs in these tests, in seconds.
const TTL_S: u64 = 2;

/// `share hub --etcd … --hub-id ID --lease-ttl 2` on an ephemeral port.
fn fleet_hub(etcd: &Cluster, id: &str) -> Hub {
    let endpoints = etcd.endpoints().join(",");
    start_hub(&[
        "--etcd",
        &endpoints,
        "--hub-id",
        id,
        "--lease-ttl",
        &TTL_S.to_string(),
    ])
}

/// A scripted client's output, retried (bounded) while the hub refuses its name because the
/// directory is still coming back.
fn run_script_until_in(addr: &str, name: &str, root: &std::path::Path, input: &str) -> Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = run_script(addr, name, root, input);
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        assert!(
            out.stderr.contains("the fleet's directory is unreachable"),
            "{}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_one_name_space_and_one_list() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let (rb, ra, rx) = (demo_root(), tempdir(), tempdir());
    let _bob = start_server(&a.addr, "bob", rb.path(), &[]);
    a.log.wait_for("joined", WAIT);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);

    // The name is taken on the other hub too, with today's answer.
    let out = run_script(&b.addr, "bob", rx.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("peer name \"bob\" is already taken by another connected peer"),
        "{}",
        out.stderr
    );

    // A client of hub b lists the whole fleet.
    let out = run_script(&b.addr, "alice", ra.path(), "list\n");
    assert!(out.status.success(), "{out:?}");
    let stdout = out.out();
    let listed: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert!(
        listed.contains(&"bob") && listed.contains(&"alice"),
        "{listed:?}"
    );
    // alice left when her script ended: hub a hears of it.
    a.log
        .wait_for("left on another hub peer=alice hub=hub-b", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_frees_its_names_within_the_lease_ttl_plus_2_s() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let (rb, rb2) = (demo_root(), demo_root());
    let mut bob = start_server(&a.addr, "bob", rb.path(), &[]);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);

    a.proc.kill();
    let killed = Instant::now();
    b.log.wait_for(
        "left on another hub peer=bob hub=hub-a",
        Duration::from_secs(TTL_S + 2),
    );
    let freed = killed.elapsed();
    assert!(freed <= Duration::from_secs(TTL_S + 2), "{freed:?}");
    // The old bob cannot reach its hub; a new bob gets the name on hub b.
    bob.proc.kill();
    let _new_bob = start_server(&b.addr, "bob", rb2.path(), &[]);
    b.log.wait_for("joined", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_of_a_killed_hub_are_back_on_another_hub_within_15_s() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let rb = demo_root();
    // bob knows both hubs and joins the first.
    let hubs = format!("{},{}", a.addr, b.addr);
    let _bob = start_server(&hubs, "bob", rb.path(), &[]);
    a.log.wait_for("joined peer=bob", WAIT);

    a.proc.kill();
    let killed = Instant::now();
    // bob reconnects to hub b; his name is taken there until hub a's lease expires, then his
    // publish (retried with his backoff) gets it.
    b.log.wait_for("joined peer=bob", Duration::from_secs(15));
    eprintln!(
        "bob published on hub b {:?} after hub a was killed (lease TTL {TTL_S} s)",
        killed.elapsed()
    );
    let out = run_script(&b.addr, "alice", tempdir().path(), "list\n");
    assert_eq!(out.out(), "alice\nbob\n", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_new_names_are_refused_clearly_and_taken_again_once_it_is_back() {
    let Some(mut etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let (rb, rc, ra) = (demo_root(), tempdir(), tempdir());
    let _bob = start_server(&a.addr, "bob", rb.path(), &[]);
    a.log.wait_for("joined", WAIT);

    etcd.kill(0).await;
    let out = run_script(&a.addr, "carol", rc.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the fleet's directory is unreachable"),
        "{}",
        out.stderr
    );
    a.log
        .wait_for("the fleet's directory is unreachable; retrying", WAIT);

    etcd.restart(0).await;
    a.log.wait_for("the fleet's directory is reachable", WAIT);
    // bob kept his name through the outage; newcomers get theirs again.
    let out = run_script_until_in(&a.addr, "alice", ra.path(), "list\n");
    assert!(out.status.success(), "{out:?}");
    let stdout = out.out();
    let listed: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(listed, ["alice", "bob"], "{listed:?}");
}
