//! Hub-to-hub routing with real processes: two `share hub --etcd … --fleet-token` on a real
//! etcd (netchan_testkit::etcd), a client of one hub reading a peer of the other. Skipped when
//! etcd is not installed, except under `CI=true`, where it fails instead.

mod common;
#[path = "common/pki.rs"]
mod pki;

use common::*;
use netchan_testkit::etcd::Cluster;
use pki::write_pki;

/// A hub of the fleet on `etcd` with id `id`, serving the other hubs on an ephemeral port.
fn routing_hub(etcd: &Cluster, id: &str) -> Hub {
    let endpoints = etcd.endpoints().join(",");
    start_hub(&[
        "--etcd",
        &endpoints,
        "--hub-id",
        id,
        "--fleet-token",
        "fleet secret",
        "--fleet-listen",
        "127.0.0.1:0",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_one_hub_reads_lists_and_gets_a_peer_of_another_exactly() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = routing_hub(&etcd, "hub-a");
    let mut b = routing_hub(&etcd, "hub-b");
    let (rb, ra) = (demo_root(), tempdir());
    write_pattern(&rb.path().join("data.bin"), 3 << 20, 11);
    let _bob = start_server(&a.addr, "bob", rb.path(), &[]);
    a.log.wait_for("joined", WAIT);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);
    let local = ra.path().join("copy.bin");
    let script = format!(
        "read bob hello.txt\nls bob sub\nget bob data.bin {}\n",
        s(&local)
    );
    let out = run_script(&b.addr, "alice", ra.path(), &script);
    assert!(out.status.success(), "{out:?}");
    let want = format!(
        "hello world\n\
         \x20      6  inner.txt\n\
         saved 3145728 bytes to {} (verified)\n",
        s(&local)
    );
    assert_eq!(out.out(), want);
    assert!(same_bytes(&local, &rb.path().join("data.bin")));
    // Hub b routed the reads; hub a served them for alice of hub b.
    b.log.wait_for("read routed to another hub", WAIT);
    a.log.wait_for("read reader=alice@hub-b peer=bob", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_with_a_fleet_ca_route_reads_over_mutual_tls() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let pki = tempdir();
    write_pki(pki.path(), "ca", &["hub-a", "hub-b"]);
    let p = |f: &str| s(&pki.path().join(f)).to_owned();
    let endpoints = etcd.endpoints().join(",");
    let tls_hub = |id: &str| {
        let (cert, key, ca) = (
            p(&format!("{id}.pem")),
            p(&format!("{id}.key")),
            p("ca.pem"),
        );
        start_hub(&[
            "--etcd",
            &endpoints,
            "--hub-id",
            id,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--fleet-ca",
            &ca,
            "--fleet-listen",
            "127.0.0.1:0",
        ])
    };
    let mut a = tls_hub("hub-a");
    let mut b = tls_hub("hub-b");
    a.log.wait_for("mutual_tls=true", WAIT);
    let (rb, ra) = (demo_root(), tempdir());
    let ca = p("ca.pem");
    let tls_client = ["--tls-ca", ca.as_str()];
    let _bob = start_server(&a.addr, "bob", rb.path(), &tls_client);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);
    let out = run_script_with(
        &b.addr,
        "alice",
        ra.path(),
        "read bob hello.txt\nls bob sub\n",
        &tls_client,
        &[],
        WAIT,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "hello world\n\x20      6  inner.txt\n");
    b.log.wait_for("hub-to-hub link up", WAIT);
    a.log.wait_for("read reader=alice@hub-b peer=bob", WAIT);
}
