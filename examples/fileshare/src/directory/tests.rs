//! The directory on a real etcd (started by `netchan_testkit::etcd`): two or three
//! [`Etcd`] instances play the hubs of a fleet. Skipped when etcd is not installed, except
//! under `CI=true`, where they fail instead.

use std::time::Duration;

use netchan_testkit::etcd::Cluster;
use netchan_testkit::proxy::{Direction, Link, Proxy};
use netchan_testkit::within;
use tokio::sync::broadcast;

use super::*;

/// The lease TTL in these tests: short, so expiry is quick to see.
const TTL: Duration = Duration::from_secs(2);

/// How long etcd stays down in the outage test (as in issue 21).
const OUTAGE: Duration = Duration::from_secs(20);

fn config(endpoints: Vec<String>, id: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new(endpoints, HubId::new(id).unwrap());
    c.hub_addr = format!("{id}.test:7000");
    c.lease_ttl = TTL;
    c.keepalive_every = Duration::from_millis(500);
    // Generous for a loaded machine (etcd syncs every write to disk); the lease is renewed
    // every 500 ms, so a renewal may take this long and the 2 s lease still lives.
    c.call_timeout = Duration::from_millis(1500);
    c.retry_min = Duration::from_millis(50);
    c.retry_max = Duration::from_millis(500);
    c
}

/// A hub's directory on `endpoints`, up (lease held, copy read, watch on).
async fn hub(endpoints: Vec<String>, id: &str) -> Etcd {
    hub_with(config(endpoints, id)).await
}

async fn hub_with(config: EtcdConfig) -> Etcd {
    let d = Etcd::start(config).await.expect("start the directory");
    within(15, "the directory comes up", d.wait_up()).await;
    d
}

fn id(s: &str) -> HubId {
    HubId::new(s).unwrap()
}

/// Waits (bounded) for an event matching `want` on `rx`, skipping others.
async fn expect_event(
    rx: &mut broadcast::Receiver<Event>,
    secs: u64,
    want: impl Fn(&Event) -> bool,
) -> Event {
    within(secs, "a directory event", async {
        loop {
            match rx.recv().await {
                Ok(e) if want(&e) => return e,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("lagged {n} events"),
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await
}

fn is_joined(name: &'static str, hub: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Joined { name: n, hub: h } if n == name && h.to_string() == hub)
}

fn is_left(name: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Left { name: n, .. } if n == name)
}

fn assert_unreachable(result: Result<(), DirectoryError>) {
    match result {
        Err(e @ DirectoryError::Unreachable { .. }) => {
            assert_eq!(e.to_string(), "the fleet's directory is unreachable")
        }
        other => panic!("expected the directory to be unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_publish_without_etcd_is_refused_with_the_clear_message() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Etcd::start(config(vec![format!("http://127.0.0.1:{port}")], "h1"))
        .await
        .unwrap();
    assert_unreachable(d.publish("bob").await);
    assert!(!d.holds("bob"));
    assert_eq!(d.lookup("bob"), None);
    d.close().await;
    assert!(matches!(
        d.publish("bob").await,
        Err(DirectoryError::Closed)
    ));
}

#[tokio::test]
async fn a_bad_configuration_is_refused_at_start() {
    let mut c = config(vec![], "h1");
    assert!(matches!(
        Etcd::start(c.clone()).await,
        Err(DirectoryError::Config { .. })
    ));
    c.endpoints = vec!["http://127.0.0.1:1".into()];
    c.keepalive_every = TTL;
    let err = Etcd::start(c).await.err().expect("refused");
    assert!(err.to_string().contains("cannot keep a lease"), "{err}");
}

#[tokio::test]
async fn a_second_hub_with_the_same_id_stays_out_and_says_why() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "same").await;
    let b = Etcd::start(config(etcd.endpoints(), "same")).await.unwrap();
    within(10, "the second hub finds its id in use", b.wait_id_in_use()).await;
    assert!(b.id_in_use());
    match b.publish("bob").await {
        Err(DirectoryError::Unreachable {
            cause: Unreachable::HubIdInUse(id),
        }) => assert_eq!(id.to_string(), "same"),
        other => panic!("expected the id to be in use, got {other:?}"),
    }
    a.publish("bob").await.unwrap();
    // Once the first hub has left, the id is free.
    a.close().await;
    within(10, "the second hub comes up", b.wait_up()).await;
    b.publish("bob").await.unwrap();
    b.close().await;
}

#[tokio::test]
async fn publish_release_lookup_and_watch_between_two_hubs() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    let mut b_events = b.subscribe();

    a.publish("bob").await.unwrap();
    assert!(a.holds("bob"));
    // Listed by its own hub as soon as the publish returns, before the watch brings it back.
    assert_eq!(a.names(), ["bob"]);
    assert_eq!(
        a.lookup("bob"),
        Some(Holder {
            hub: id("hub-a"),
            addr: "hub-a.test:7000".into(),
            here: true
        })
    );
    // Taken on the same hub and on the other one.
    assert!(matches!(
        a.publish("bob").await,
        Err(DirectoryError::Taken { .. })
    ));
    let err = b.publish("bob").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer name \"bob\" is already taken by another connected peer"
    );
    assert!(!b.holds("bob"));

    expect_event(&mut b_events, 5, is_joined("bob", "hub-a")).await;
    assert_eq!(
        b.lookup("bob"),
        Some(Holder {
            hub: id("hub-a"),
            addr: "hub-a.test:7000".into(),
            here: false
        })
    );
    assert_eq!(b.names(), vec!["bob"]);
    let hubs: Vec<String> = b.hubs().into_iter().map(|h| h.id.to_string()).collect();
    assert_eq!(hubs, vec!["hub-a", "hub-b"]);

    a.release("bob").await.unwrap();
    assert!(!a.holds("bob"));
    expect_event(&mut b_events, 5, is_left("bob")).await;
    assert_eq!(b.lookup("bob"), None);
    b.publish("bob").await.unwrap();
    assert!(b.holds("bob"));

    // A clean close revokes the lease: the hub's record goes at once.
    a.close().await;
    expect_event(
        &mut b_events,
        5,
        |e| matches!(e, Event::HubDown { id } if id.to_string() == "hub-a"),
    )
    .await;
    b.close().await;
}

#[tokio::test]
async fn fifty_racing_pairs_of_publishes_have_exactly_one_winner_each() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    let names: Vec<String> = (0..50).map(|i| format!("racer-{i}")).collect();
    let (a, b) = (&a, &b);
    let races = names.iter().map(|n| async move {
        let (ra, rb) = tokio::join!(a.publish(n), b.publish(n));
        (n, ra, rb)
    });
    let results = within(30, "50 races", futures::future::join_all(races)).await;
    let mut wins = (0, 0);
    for (name, ra, rb) in results {
        match (ra, rb) {
            (Ok(()), Err(DirectoryError::Taken { .. })) => {
                wins.0 += 1;
                assert!(a.holds(name) && !b.holds(name), "{name}");
            }
            (Err(DirectoryError::Taken { .. }), Ok(())) => {
                wins.1 += 1;
                assert!(b.holds(name) && !a.holds(name), "{name}");
            }
            other => panic!("{name}: not exactly one winner: {other:?}"),
        }
    }
    assert_eq!(wins.0 + wins.1, 50);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_hub_that_stops_renewing_frees_its_names_within_the_ttl_plus_2_s() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    let mut b_events = b.subscribe();
    for n in ["x", "y", "z"] {
        a.publish(n).await.unwrap();
    }
    for n in ["x", "y", "z"] {
        expect_event(
            &mut b_events,
            5,
            move |e| matches!(e, Event::Joined { name, .. } if name == n),
        )
        .await;
    }
    // Dropped without close: as if the hub's process died. Its lease is not revoked.
    drop(a);
    assert!(
        matches!(b.publish("x").await, Err(DirectoryError::Taken { .. })),
        "the names stay held until the lease expires"
    );
    let deadline = TTL.as_secs() + 2;
    within(
        deadline,
        "the dead hub's names and record are freed",
        async {
            let mut left = 0;
            let mut down = false;
            while left < 3 || !down {
                match b_events.recv().await.unwrap() {
                    Event::Left { .. } => left += 1,
                    Event::HubDown { id } if id.to_string() == "hub-a" => down = true,
                    _ => {}
                }
            }
        },
    )
    .await;
    for n in ["x", "y", "z"] {
        b.publish(n).await.unwrap();
    }
    b.close().await;
}

#[tokio::test]
async fn etcd_down_for_20_s_refuses_publishes_clearly_then_every_name_is_held_again_once() {
    let Some(mut etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    a.publish("alice").await.unwrap();
    b.publish("bob").await.unwrap();

    etcd.kill(0).await;
    let started = tokio::time::Instant::now();
    let mut refused = 0;
    // One publish a second for the whole outage: every one is refused with the message.
    while started.elapsed() < OUTAGE {
        let (ra, rb) = within(5, "publishes while etcd is down", async {
            tokio::join!(a.publish("carol"), b.publish("dave"))
        })
        .await;
        assert_unreachable(ra);
        assert_unreachable(rb);
        refused += 2;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(refused >= 20);
    // The leases cannot be proven any more: the names are not served.
    assert!(!a.holds("alice") && !b.holds("bob"));
    assert_eq!(a.lookup("alice"), None);

    etcd.restart(0).await;
    within(15, "hub a is back", a.wait_up()).await;
    within(15, "hub b is back", b.wait_up()).await;
    assert!(a.holds("alice") && !a.holds("bob"));
    assert!(b.holds("bob") && !b.holds("alice"));
    // Each hub's copy lists both names, each held by exactly one hub.
    for d in [&a, &b] {
        assert_eq!(d.names(), vec!["alice", "bob"]);
    }
    assert_eq!(b.lookup("alice").map(|h| h.hub), Some(id("hub-a")));
    assert_eq!(a.lookup("bob").map(|h| h.hub), Some(id("hub-b")));
    a.publish("carol").await.unwrap();
    b.publish("dave").await.unwrap();
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_hub_cut_off_past_its_lease_loses_a_name_taken_meanwhile_and_keeps_the_others() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    // Hub a reaches etcd through a proxy that can cut it off; hub b directly.
    let upstream = etcd
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = Proxy::start(upstream, Link::ideal()).await.unwrap();
    let a = hub(vec![format!("http://{}", proxy.addr())], "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    a.publish("alice").await.unwrap();
    a.publish("bob").await.unwrap();
    expect_event(&mut b_events, 5, is_joined("bob", "hub-a")).await;

    // Cut: every byte between a and etcd is lost from now on, on old and new connections.
    proxy.blackhole_both();
    proxy.reset();
    assert_unreachable(a.publish("carol").await);
    // a's lease expires at etcd; b sees the names go and takes bob.
    expect_event(&mut b_events, TTL.as_secs() + 3, is_left("bob")).await;
    b.publish("bob").await.unwrap();
    assert!(!a.holds("bob"), "a cannot prove its claim any more");

    proxy.resume(Direction::Up);
    proxy.resume(Direction::Down);
    expect_event(
        &mut a_events,
        15,
        |e| matches!(e, Event::Lost { name } if name == "bob"),
    )
    .await;
    within(15, "hub a is back", a.wait_up()).await;
    assert!(!a.holds("bob"));
    assert!(a.holds("alice"), "alice was re-claimed under a new lease");
    assert_eq!(a.lookup("bob").map(|h| h.hub), Some(id("hub-b")));
    expect_event(&mut b_events, 5, is_joined("alice", "hub-a")).await;
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn publishes_continue_after_the_etcd_leader_is_killed() {
    let Some(mut etcd) = Cluster::start_or_skip(3).await else {
        return;
    };
    let a = hub(etcd.endpoints(), "hub-a").await;
    let b = hub(etcd.endpoints(), "hub-b").await;
    a.publish("before").await.unwrap();
    let leader = etcd.leader().await;
    etcd.kill(leader).await;
    // Bounded retries while the remaining members elect a leader and the hubs reconnect.
    let published = within(20, "a publish after the election", async {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match a.publish("after").await {
                Ok(()) => return attempts,
                Err(DirectoryError::Unreachable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    })
    .await;
    assert!(published >= 1);
    assert!(a.holds("before") && a.holds("after"));
    // Hub b may have used the dead member too: its first publishes may be refused until it
    // moved to another; then every publish succeeds.
    within(20, "hub b publishes after the election", async {
        while let Err(e) = b.publish("later-0").await {
            assert!(matches!(e, DirectoryError::Unreachable { .. }), "{e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for i in 1..10 {
        b.publish(&format!("later-{i}")).await.unwrap();
    }
    assert!(matches!(
        b.publish("after").await,
        Err(DirectoryError::Taken { .. })
    ));
    a.close().await;
    b.close().await;
}
