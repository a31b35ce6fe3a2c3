//! In-process tests of the hub: a real hub and real clients in one runtime, over loopback TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use netchan_mux::Session;
use netchan_rpc::{self as rpc, Code};
use netchan_testkit::{
    proxy::{Direction, Link, Proxy},
    within,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::{HubOptions, HubState};
use crate::auth;
use crate::client::{self, CallError, ClientOptions, ConnectError, Peer};
use crate::export::Root;
use crate::proto::{HubClient, Kind, ListReq, PeerPath, PeerRead, PublishReq};

/// Generous bound for anything that should happen promptly.
/// [`WAIT`] in whole seconds, for [`within`].
const WAIT_S: u64 = 20;
const WAIT: Duration = Duration::from_secs(WAIT_S);

pub(super) struct TestHub {
    pub(super) state: Arc<HubState>,
    pub(super) addr: SocketAddr,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_hub(opts: HubOptions) -> TestHub {
    let listener = super::bind_listener("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = HubState::new(opts);
    let task = tokio::spawn(state.clone().serve(listener));
    TestHub { state, addr, task }
}

pub(super) fn client_opts(hub: &TestHub, name: &str, root: &Path) -> ClientOptions {
    ClientOptions {
        name: name.to_owned(),
        root: Root::open(root).unwrap(),
        hubs: vec![hub.addr.to_string()],
        token: None,
        tls: None,
        verbose: false,
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(100)),
    }
}

/// [`client_opts`] for a client that speaks TLS and trusts the certificate at `ca`.
fn tls_client_opts(hub: &TestHub, name: &str, root: &Path, ca: &Path) -> ClientOptions {
    let mut opts = client_opts(hub, name, root);
    opts.tls = Some((
        crate::tls::client_config(ca, None).unwrap(),
        Some(crate::tls::server_name(&hub.addr.to_string(), None).unwrap()),
    ));
    opts
}

fn quiet() -> client::Notify {
    Arc::new(|_msg: String| {})
}

async fn join(hub: &TestHub, name: &str, root: &Path) -> Peer {
    tokio::time::timeout(WAIT, Peer::start(client_opts(hub, name, root), quiet()))
        .await
        .expect("join in time")
        .expect("join succeeds")
}

/// A root with `hello.txt`, `sub/` and a sparse `big.bin` of `big` bytes.
fn root_with(big: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello world\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    f.set_len(big).unwrap();
    dir
}

/// Waits until the hub's peer set satisfies `pred`.
async fn until_peers(hub: &TestHub, pred: impl Fn(&[String]) -> bool) {
    let mut changes = hub.state.subscribe();
    tokio::time::timeout(WAIT, async {
        // Bounded by the timeout; each iteration waits for a change.
        while !pred(&hub.state.names()) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("peer set reached the expected state in time");
}

/// The rpc peer link after the hello, serving `server` to the hub: the hub's client. The link
/// lives as long as `session`.
async fn peer_link(session: &Session, server: rpc::Server) -> HubClient {
    let link = rpc::Peer::connect(session, server).await.unwrap();
    let hub = HubClient::new(link.client().clone());
    let session = session.clone();
    tokio::spawn(async move {
        session.closed().await;
        drop(link);
    });
    hub
}

/// A client that does the hello and sets up the rpc peer link (serving nothing on it) but
/// publishes nothing by itself.
async fn raw_client(hub: &TestHub, token: Option<&str>) -> (Session, HubClient) {
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let session = Session::client(tcp, netchan_mux::Config::default());
    let mut hello = session.dial(auth::CHANNEL).await.unwrap();
    auth::client_hello(&mut hello, token).await.unwrap();
    let hub_client = peer_link(&session, rpc::Server::new()).await;
    (session, hub_client)
}

pub(super) async fn read_all(peer: &Peer, who: &str, path: &str) -> Result<Vec<u8>, CallError> {
    let mut s = peer.read(who, path).await?;
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

#[tokio::test]
async fn peers_list_each_other_and_read_through_the_hub() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(1 << 20), root_with(0));
    let bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    assert_eq!(alice.list().await.unwrap(), vec!["alice", "bob"]);
    assert_eq!(
        read_all(&alice, "bob", "hello.txt").await.unwrap(),
        b"hello world\n"
    );
    let big = read_all(&alice, "bob", "big.bin").await.unwrap();
    assert_eq!(big.len(), 1 << 20);
    assert!(big.iter().all(|&b| b == 0));
    let listing = alice.ls("bob", "").await.unwrap();
    let names: Vec<_> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["big.bin", "hello.txt", "sub"]);
    let st = alice.stat("bob", "hello.txt").await.unwrap();
    assert_eq!((st.kind, st.size), (Kind::File, 12));
    // And the other way round, over bob's own connection.
    assert_eq!(
        read_all(&bob, "alice", "hello.txt").await.unwrap(),
        b"hello world\n"
    );
}

#[tokio::test]
async fn errors_from_the_exporter_name_the_peer_and_keep_their_code() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let code_of = |r: Result<Vec<u8>, CallError>| match r {
        Err(CallError::Status(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected a status, got {other:?}"),
    };
    let (code, msg) = code_of(read_all(&alice, "bob", "nope.txt").await);
    assert_eq!(code, Code::NotFound);
    assert!(msg.starts_with("bob: no such file"), "{msg}");
    let (code, msg) = code_of(read_all(&alice, "bob", "../x").await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("outside"), "{msg}");
    let (code, _) = code_of(read_all(&alice, "bob", "sub").await);
    assert_eq!(code, Code::FailedPrecondition);
    let (code, msg) = code_of(read_all(&alice, "dave", "x").await);
    assert_eq!(code, Code::NotFound);
    assert!(msg.contains("unknown peer \"dave\""), "{msg}");
}

#[tokio::test]
async fn a_taken_name_is_refused_and_the_first_owner_keeps_it() {
    let hub = start_hub(HubOptions::default()).await;
    let (r1, r2) = (root_with(0), root_with(0));
    let _bob = join(&hub, "bob", r1.path()).await;
    let err = Peer::start(client_opts(&hub, "bob", r2.path()), quiet())
        .await
        .err()
        .expect("second bob refused");
    match &err {
        ConnectError::Publish { status, .. } => {
            assert_eq!(status.code(), Code::AlreadyExists);
            assert!(status.message().contains("already taken"), "{status}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(hub.state.names(), vec!["bob"]);
}

#[tokio::test]
async fn the_hub_refuses_bad_names_even_from_a_client_that_skips_its_own_checks() {
    let hub = start_hub(HubOptions::default()).await;
    let (_s, raw) = raw_client(&hub, None).await;
    for name in [String::new(), "x".repeat(65), "a\nb".into(), "a b".into()] {
        let err = raw
            .publish(PublishReq { name: name.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}: {err}");
    }
    assert!(hub.state.names().is_empty());
}

#[tokio::test]
async fn a_connection_publishes_at_most_once() {
    let hub = start_hub(HubOptions::default()).await;
    let root = root_with(0);
    let (session, raw) = raw_client(&hub, None).await;
    // Serve an export so the hub's dial back succeeds.
    let exports = session.listen(crate::proto::EXPORT_CHANNEL).unwrap();
    let mut server = rpc::Server::new();
    use crate::proto::Export as _;
    server.add(
        crate::export::ExportService {
            root: Root::open(root.path()).unwrap(),
        }
        .into_service(),
    );
    let serve = tokio::spawn(async move {
        let mut exports = exports;
        while let Ok(ch) = exports.accept().await {
            let server = server.clone();
            tokio::spawn(async move { server.serve(ch).await });
        }
    });
    raw.publish(PublishReq {
        name: "first".into(),
    })
    .await
    .unwrap();
    let err = raw
        .publish(PublishReq {
            name: "second".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("already published as \"first\""));
    assert_eq!(hub.state.names(), vec!["first"]);
    serve.abort();
}

#[tokio::test]
async fn nothing_works_before_the_hello_and_only_publish_before_publishing() {
    let hub = start_hub(HubOptions {
        token: Some(auth::Token::new("s3cret").unwrap()),
        ..HubOptions::default()
    })
    .await;
    // Skipping the hello: the hub's end of the peer link does not exist.
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let session = Session::client(tcp, netchan_mux::Config::default());
    let err = session.dial(rpc::PEER_CHANNEL).await.unwrap_err();
    assert!(
        matches!(err, netchan_mux::Error::NoListener { .. }),
        "{err:?}"
    );
    // With the token but not published: every call but publish is refused.
    let root = root_with(0);
    let mut opts = client_opts(&hub, "bob", root.path());
    opts.token = Some("s3cret".into());
    let _bob = Peer::start(opts, quiet()).await.unwrap();
    let (_s, raw) = raw_client(&hub, Some("s3cret")).await;
    let publish_first = |st: rpc::Status| {
        assert_eq!(st.code(), Code::FailedPrecondition, "{st}");
        assert!(st.message().starts_with("publish first"), "{st}");
    };
    publish_first(raw.list(ListReq {}).await.unwrap_err());
    let at = || PeerPath {
        peer: "bob".into(),
        path: "hello.txt".into(),
    };
    publish_first(raw.ls(at()).await.unwrap_err());
    publish_first(raw.stat(at()).await.unwrap_err());
    let read = PeerRead {
        peer: "bob".into(),
        path: "hello.txt".into(),
        offset: 0,
    };
    match raw.read(read).await {
        Err(st) => publish_first(st),
        Ok(mut stream) => {
            use futures::StreamExt as _;
            let first = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
            publish_first(first.expect("an item").unwrap_err());
        }
    }
}

/// A hub session over an in-memory pipe: the hub's side is served by `serve_io`, whose task is
/// returned (it ends when the hub is done with the connection).
fn duplex_conn(
    state: &Arc<HubState>,
    id: u64,
) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(state.clone().serve_io(theirs, id, format!("duplex {id}")));
    (ours, task)
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_does_not_publish_in_time_is_closed_and_frees_its_slot() {
    let state = HubState::new(HubOptions {
        publish_timeout: Duration::from_secs(10),
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(100)),
        ..HubOptions::default()
    });
    // A connection that says hello and then nothing.
    let (io, silent_task) = duplex_conn(&state, 1);
    let silent = Session::client(io, netchan_mux::Config::default());
    let mut hello = silent.dial(auth::CHANNEL).await.unwrap();
    auth::client_hello(&mut hello, None).await.unwrap();
    drop(hello);
    // A real client that publishes.
    let (io, _bob_task) = duplex_conn(&state, 2);
    let root = root_with(0);
    let opts = ClientOptions {
        name: "bob".into(),
        root: Root::open(root.path()).unwrap(),
        hubs: vec!["duplex".into()],
        token: None,
        tls: None,
        verbose: false,
        mux: netchan_mux::Config::default(),
    };
    let _bob = client::establish(io, &opts).await.unwrap();
    let start = tokio::time::Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(60), silent.closed())
        .await
        .expect("the silent connection is closed");
    let took = start.elapsed();
    assert!(
        matches!(reason, netchan_mux::CloseReason::Peer),
        "closed gracefully by the hub: {reason:?}"
    );
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "closed after {took:?}"
    );
    // Its task is over, so its connection slot (held for the task's life) is free again.
    tokio::time::timeout(Duration::from_secs(5), silent_task)
        .await
        .expect("the connection task ends")
        .unwrap();
    // The published peer is still there, long after the deadline.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(state.names(), vec!["bob"]);
}

#[tokio::test]
async fn a_client_beyond_the_connection_cap_is_told_the_hub_is_full_and_gets_in_later() {
    let hub = start_hub(HubOptions {
        max_connections: 1,
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(100)),
        ..HubOptions::default()
    })
    .await;
    // A connection that says hello and publishes nothing takes no seat.
    let (_silent, _raw) = raw_client(&hub, None).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let bob = join(&hub, "bob", rb.path()).await;
    let err = within(
        WAIT_S,
        "alice is refused",
        Peer::start(client_opts(&hub, "alice", ra.path()), quiet()),
    )
    .await
    .err()
    .expect("alice is refused while bob holds the only seat");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains("the hub is full"), "{err}");
    bob.close().await;
    drop(bob);
    until_peers(&hub, |names| names.is_empty()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    assert_eq!(alice.list().await.unwrap(), vec!["alice"]);
}

#[tokio::test]
async fn a_client_refused_at_the_address_cap_is_told_why() {
    let hub = start_hub(HubOptions {
        max_pending_per_addr: 1,
        ..HubOptions::default()
    })
    .await;
    // One connection from 127.0.0.1 is talking (hello done) and has not published.
    let (_talking, _raw) = raw_client(&hub, None).await;
    let root = root_with(0);
    let err = within(
        WAIT_S,
        "bob is refused",
        Peer::start(client_opts(&hub, "bob", root.path()), quiet()),
    )
    .await
    .err()
    .expect("bob is refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("too many connections from your address"),
        "{err}"
    );
    // From another address bob gets in at once.
    let tcp = raw_tcp_from(2, hub.addr).await;
    let opts = client_opts(&hub, "bob", root.path());
    within(WAIT_S, "bob joins", client::establish(tcp, &opts))
        .await
        .unwrap();
}

/// A TCP connection to `hub` from the loopback address 127.0.0.`last` (Linux routes all of
/// 127/8 to the loopback interface).
async fn raw_tcp_from(last: u8, hub: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap();
    sock.connect(hub).await.unwrap()
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let hub = start_hub(HubOptions {
        token: Some(auth::Token::new("s3cret").unwrap()),
        ..HubOptions::default()
    })
    .await;
    let root = root_with(0);
    for (token, want) in [
        (Some("guess"), "refused the token"),
        (None, "requires a token"),
    ] {
        let mut opts = client_opts(&hub, "eve", root.path());
        opts.token = token.map(str::to_owned);
        let err = Peer::start(opts, quiet()).await.err().expect("refused");
        let text = netchan_rpc::chain(&err);
        assert!(text.contains(want), "{text}");
    }
    let mut opts = client_opts(&hub, "alice", root.path());
    opts.token = Some("s3cret".into());
    let alice = Peer::start(opts, quiet()).await.unwrap();
    assert_eq!(alice.list().await.unwrap(), vec!["alice"]);
}

#[tokio::test]
async fn a_peer_that_leaves_disappears_from_list_and_others_carry_on() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    until_peers(&hub, |p| p.len() == 2).await;
    bob.close().await;
    until_peers(&hub, |p| p == ["alice"]).await;
    assert_eq!(alice.list().await.unwrap(), vec!["alice"]);
    // The name is free again.
    let _bob2 = join(&hub, "bob", rb.path()).await;
    assert_eq!(alice.list().await.unwrap(), vec!["alice", "bob"]);
}

#[tokio::test]
async fn a_read_in_flight_fails_with_peer_gone_when_the_exporter_leaves() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(256 << 20), root_with(0));
    let bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let mut stream = alice.read("bob", "big.bin").await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.size, 256 << 20);
    bob.close().await;
    let outcome = tokio::time::timeout(WAIT, async {
        // Bounded: 1024 chunks at most, and the stream fails long before.
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("the read ends in time");
    let err = outcome.expect("the read fails instead of completing");
    assert!(err.to_string().starts_with("peer gone"), "{err}");
    // The hub and alice carry on.
    assert_eq!(alice.list().await.unwrap(), vec!["alice"]);
}

#[tokio::test]
async fn a_flood_of_reads_to_one_peer_gets_a_clear_busy_error() {
    let hub = start_hub(HubOptions {
        max_reads_per_peer: 1,
        busy_wait: Duration::from_millis(200),
        ..HubOptions::default()
    })
    .await;
    let (rb, ra, rc) = (root_with(64 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let carol = join(&hub, "carol", rc.path()).await;
    let mut first = alice.read("bob", "big.bin").await.unwrap();
    first.next().await.unwrap().unwrap();
    // The one slot is taken by the stalled transfer.
    let err = read_all(&carol, "bob", "hello.txt").await.unwrap_err();
    match &err {
        CallError::Status(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("busy"), "{s}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Other calls through the hub are unaffected, and the slot frees when the reader gives up.
    assert_eq!(alice.list().await.unwrap(), vec!["alice", "bob", "carol"]);
    drop(first);
    let got = tokio::time::timeout(WAIT, async {
        // Bounded by the timeout: the slot is released once the hub sees the cancel.
        loop {
            match read_all(&carol, "bob", "hello.txt").await {
                Ok(v) => return v,
                Err(CallError::Status(s)) if s.code() == Code::ResourceExhausted => continue,
                Err(e) => panic!("unexpected {e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, b"hello world\n");
}

#[tokio::test]
async fn a_stalled_reader_does_not_hold_up_other_peers() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra, rc) = (root_with(64 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let carol = join(&hub, "carol", rc.path()).await;
    let mut stalled = alice.read("bob", "big.bin").await.unwrap();
    stalled.next().await.unwrap().unwrap();
    let got = tokio::time::timeout(WAIT, read_all(&carol, "bob", "hello.txt"))
        .await
        .expect("carol is served while alice's transfer is stalled")
        .unwrap();
    assert_eq!(got, b"hello world\n");
}

#[tokio::test]
async fn a_client_reconnects_and_republishes_after_the_hub_restarts() {
    let hub = start_hub(HubOptions::default()).await;
    let addr = hub.addr;
    let root = root_with(0);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let notify: client::Notify = Arc::new(move |msg: String| {
        let _ = tx.try_send(msg);
    });
    let bob = Peer::start(client_opts(&hub, "bob", root.path()), notify)
        .await
        .unwrap();
    // Stop the hub: its task (and with it every connection task and the peer table) goes.
    drop(hub);
    let lost = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    // Dropping the hub's tasks drops its sessions, which close them (the client may see
    // either a graceful close or a lost link).
    assert!(lost.ends_with("; reconnecting"), "{lost}");
    let err = bob.list().await.unwrap_err();
    assert!(
        matches!(err, CallError::NotConnected | CallError::Status(_)),
        "{err:?}"
    );
    // A new hub on the same address: bob comes back under its name.
    let listener = TcpListener::bind(addr).await.unwrap();
    let state = HubState::new(HubOptions::default());
    let task = tokio::spawn(state.clone().serve(listener));
    let hub2 = TestHub { state, addr, task };
    tokio::time::timeout(WAIT, bob.connected()).await.unwrap();
    until_peers(&hub2, |p| p == ["bob"]).await;
    assert_eq!(bob.list().await.unwrap(), vec!["bob"]);
    // Bounded: the channel holds at most 64 messages.
    let mut said_reconnected = false;
    while let Ok(msg) = rx.try_recv() {
        said_reconnected |= msg.starts_with("reconnected to the hub");
    }
    assert!(said_reconnected);
}

/// A loopback address nothing listens on (a listener bound and closed again).
async fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test]
async fn a_client_given_several_hubs_joins_the_first_that_lets_it_in() {
    let hub = start_hub(HubOptions::default()).await;
    let root = root_with(0);
    let mut opts = client_opts(&hub, "bob", root.path());
    opts.hubs = vec![dead_addr().await, hub.addr.to_string()];
    let bob = within(WAIT_S, "bob joins", Peer::start(opts, quiet()))
        .await
        .unwrap();
    assert_eq!(bob.hub_addr(), Some(hub.addr.to_string()));
    until_peers(&hub, |p| p == ["bob"]).await;
    bob.close().await;
}

#[tokio::test]
async fn a_client_given_only_dead_hubs_names_them_all_in_its_error() {
    let root = root_with(0);
    let hub = start_hub(HubOptions::default()).await;
    let mut opts = client_opts(&hub, "bob", root.path());
    let (a, b) = (dead_addr().await, dead_addr().await);
    opts.hubs = vec![a.clone(), b.clone()];
    let err = within(WAIT_S, "bob fails", Peer::start(opts.clone(), quiet()))
        .await
        .err()
        .expect("no hub lets bob in");
    // The last hub tried is the one named; the notice names every hub.
    assert!(
        matches!(&err, ConnectError::Tcp { addr, .. } if *addr == b),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(
        client::hubs_phrase(&opts.hubs),
        format!("any of the hubs {a}, {b}")
    );
}

#[tokio::test]
async fn a_held_name_on_one_hub_outranks_another_hub_being_unreachable() {
    let hub = start_hub(HubOptions::default()).await;
    let root = root_with(0);
    let bob = within(
        WAIT_S,
        "the first bob joins",
        Peer::start(client_opts(&hub, "bob", root.path()), quiet()),
    )
    .await
    .unwrap();
    // A second bob tries the live hub (which holds the name) and then a dead one: what it is
    // told, and how soon it asks again, comes from the hub that answered.
    let mut opts = client_opts(&hub, "bob", root.path());
    opts.hubs = vec![hub.addr.to_string(), dead_addr().await];
    let err = within(WAIT_S, "the second bob fails", Peer::start(opts, quiet()))
        .await
        .err()
        .expect("the name is held");
    assert!(err.name_held(), "{err:?}");
    bob.close().await;
}

#[tokio::test]
async fn a_client_that_loses_its_hub_reconnects_to_the_next_one() {
    let (first, second) = (
        start_hub(HubOptions::default()).await,
        start_hub(HubOptions::default()).await,
    );
    let root = root_with(0);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let notify: client::Notify = Arc::new(move |msg: String| {
        let _ = tx.try_send(msg);
    });
    let mut opts = client_opts(&first, "bob", root.path());
    opts.hubs = vec![first.addr.to_string(), second.addr.to_string()];
    let bob = within(WAIT_S, "bob joins", Peer::start(opts, notify))
        .await
        .unwrap();
    assert_eq!(bob.hub_addr(), Some(first.addr.to_string()));
    // The first hub goes (its tasks and sessions with it): bob is back on the second, under
    // its name, and says where.
    drop(first);
    let said = within(WAIT_S, "bob reconnects", async {
        loop {
            let msg = rx.recv().await.expect("bob's notices");
            if msg.starts_with("reconnected") {
                return msg;
            }
        }
    })
    .await;
    assert_eq!(
        said,
        format!(
            "reconnected to the hub at {}; published as bob",
            second.addr
        )
    );
    until_peers(&second, |p| p == ["bob"]).await;
    assert_eq!(bob.hub_addr(), Some(second.addr.to_string()));
    assert_eq!(bob.list().await.unwrap(), vec!["bob"]);
    bob.close().await;
}

#[tokio::test]
async fn shutdown_closes_every_session_gracefully_and_clients_say_the_hub_closed_it() {
    let mut hub = start_hub(HubOptions {
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(200)),
        ..HubOptions::default()
    })
    .await;
    let (rb, ra) = (root_with(0), root_with(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let notify: client::Notify = Arc::new(move |msg: String| {
        let _ = tx.try_send(msg);
    });
    let bob = Peer::start(client_opts(&hub, "bob", rb.path()), notify)
        .await
        .unwrap();
    let alice = join(&hub, "alice", ra.path()).await;
    until_peers(&hub, |p| p.len() == 2).await;
    hub.state.shutdown();
    tokio::time::timeout(WAIT, &mut hub.task)
        .await
        .expect("serve returns once every session is closed")
        .unwrap();
    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        msg,
        format!(
            "the hub at {} closed the connection (shutting down?); reconnecting",
            hub.addr
        )
    );
    // The accept loop is gone: nobody else gets in, and calls fail cleanly.
    assert!(tokio::net::TcpStream::connect(hub.addr).await.is_err());
    assert!(alice.list().await.is_err());
    bob.close().await;
}

#[tokio::test]
async fn a_name_held_by_a_silent_connection_is_free_only_once_keepalive_ends_its_session() {
    let hub = start_hub(HubOptions {
        // The transport decides: a silent session ends within 1.2 s.
        mux: netchan_mux::Config::default()
            .keepalive_interval(Some(Duration::from_millis(600)))
            .keepalive_timeout(Duration::from_millis(600))
            .close_grace(Duration::from_millis(100)),
        ..HubOptions::default()
    })
    .await;
    let proxy = Proxy::start(hub.addr, Link::ideal()).await.unwrap();
    let (r_old, r_new, ra) = (root_with(0), root_with(0), root_with(0));
    std::fs::write(r_new.path().join("hello.txt"), b"the new bob\n").unwrap();
    let mut opts = client_opts(&hub, "bob", r_old.path());
    opts.hubs = vec![proxy.addr().to_string()];
    let old_bob = Peer::start(opts, quiet()).await.unwrap();
    let alice = join(&hub, "alice", ra.path()).await;
    assert_eq!(
        read_all(&alice, "bob", "hello.txt").await.unwrap(),
        b"hello world\n"
    );
    // Bob's link goes silent: while the hub's session to it lives, the name stays bob's.
    // Forward nothing more either way but keep the sockets open: a peer whose network went
    // silent (the hub sees no error, only silence).
    proxy.stall(Direction::Up);
    proxy.stall(Direction::Down);
    let err = Peer::start(client_opts(&hub, "bob", r_new.path()), quiet())
        .await
        .err()
        .expect("the name is not taken from a live session");
    match &err {
        ConnectError::Publish { status, .. } => assert_eq!(status.code(), Code::AlreadyExists),
        other => panic!("unexpected {other:?}"),
    }
    // Keepalive ends the silent session; then the name is free.
    until_peers(&hub, |p| p == ["alice"]).await;
    let new_bob = join(&hub, "bob", r_new.path()).await;
    assert_eq!(
        read_all(&alice, "bob", "hello.txt").await.unwrap(),
        b"the new bob\n"
    );
    drop(old_bob);
    drop(proxy);
    assert_eq!(
        read_all(&new_bob, "bob", "hello.txt").await.unwrap(),
        b"the new bob\n"
    );
}

#[tokio::test]
async fn a_holder_keeps_its_name_even_when_its_only_slot_is_taken_by_a_stalled_read() {
    let hub = start_hub(HubOptions {
        max_reads_per_peer: 1,
        ..HubOptions::default()
    })
    .await;
    let (rb, r2, ra) = (root_with(64 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    // Bob's only read slot is taken by a stalled transfer.
    let mut stalled = alice.read("bob", "big.bin").await.unwrap();
    stalled.next().await.unwrap().unwrap();
    let err = Peer::start(client_opts(&hub, "bob", r2.path()), quiet())
        .await
        .err()
        .expect("the live bob keeps its name");
    match &err {
        ConnectError::Publish { status, .. } => assert_eq!(status.code(), Code::AlreadyExists),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(alice.list().await.unwrap(), vec!["alice", "bob"]);
}

/// Says hello over `io`, serves `export` on the export channel, publishes `name`; returns the
/// session, a client of the hub, and the export-serving task.
async fn publish_over<T, E>(
    io: T,
    name: &str,
    export: E,
) -> (Session, HubClient, tokio::task::JoinHandle<()>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    E: crate::proto::Export + Send + Sync + 'static,
{
    let session = Session::client(io, netchan_mux::Config::default());
    let mut hello = session.dial(auth::CHANNEL).await.unwrap();
    auth::client_hello(&mut hello, None).await.unwrap();
    drop(hello);
    let mut exports = session.listen(crate::proto::EXPORT_CHANNEL).unwrap();
    let mut server = rpc::Server::new();
    server.add(export.into_service());
    let reads = server.clone();
    let task = tokio::spawn(async move {
        // Ends with the session.
        while let Ok(ch) = exports.accept().await {
            let server = reads.clone();
            tokio::spawn(async move { server.serve(ch).await });
        }
    });
    let hub = peer_link(&session, server).await;
    hub.publish(PublishReq { name: name.into() }).await.unwrap();
    (session, hub, task)
}

/// An exporter whose reads never end: one-byte chunks, counting how many were pulled.
struct CountingExport {
    pulled: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether `stat` never answers (an answer stuck behind data on a slow link).
    stat_hangs: bool,
}

impl crate::proto::Export for CountingExport {
    async fn ls(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Listing, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn stat(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Entry, rpc::Status> {
        if self.stat_hangs {
            std::future::pending::<()>().await;
        }
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn read(
        &self,
        _ctx: rpc::Context,
        _req: crate::proto::ReadReq,
    ) -> Result<rpc::ItemStream<crate::proto::Chunk>, rpc::Status> {
        let pulled = self.pulled.clone();
        let chunks = futures::stream::unfold(0u64, move |offset| {
            pulled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let chunk = crate::proto::Chunk {
                size: u64::MAX,
                offset,
                data: netchan_rpc::ByteBuf::from(vec![b'x']),
                eof: false,
                ..Default::default()
            };
            std::future::ready(Some((Ok(chunk), offset + 1)))
        });
        Ok(Box::pin(chunks))
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_makes_the_hub_pull_at_most_its_forward_window_ahead() {
    use futures::StreamExt as _;
    let state = HubState::new(HubOptions {
        forward_window: 2,
        forward_budget: 0,
        ..HubOptions::default()
    });
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (io, _bob_conn) = duplex_conn(&state, 1);
    let export = CountingExport {
        pulled: pulled.clone(),
        stat_hangs: false,
    };
    let (_bob, _bob_hub, _bob_export) = publish_over(io, "bob", export).await;
    let (io, _alice_conn) = duplex_conn(&state, 2);
    let root = root_with(0);
    let export = crate::export::ExportService {
        root: Root::open(root.path()).unwrap(),
    };
    let (_alice, alice_hub, _alice_export) = publish_over(io, "alice", export).await;
    let read = PeerRead {
        peer: "bob".into(),
        path: "endless".into(),
        offset: 0,
    };
    let mut stream = alice_hub.read(read).await.unwrap();
    stream.next().await.unwrap().unwrap();
    // Alice stops reading. With time paused, this sleep ends only once every task is idle:
    // the hub has pulled all that flow control allows.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = pulled.load(std::sync::atomic::Ordering::SeqCst);
    // Alice's own window (16 chunks, the rpc default) sits in flight to or at alice; the hub
    // holds at most its forward window and the chunk its reader's call sends on beyond that
    // (plus one being handed over per hop).
    let reader_window = rpc::Config::default().stream_window as usize;
    assert!(n > reader_window, "the transfer got going: {n}");
    assert!(
        n <= reader_window + 2 + 2 + 3,
        "the hub pulled {n} chunks ahead"
    );
}

#[tokio::test]
async fn a_holder_busy_streaming_keeps_its_name_even_though_it_answers_nothing_else() {
    let hub = start_hub(HubOptions::default()).await;
    let export = CountingExport {
        pulled: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        stat_hangs: true,
    };
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let (_bob, _bob_hub, _bob_export) = publish_over(tcp, "bob", export).await;
    let ra = root_with(0);
    let alice = join(&hub, "alice", ra.path()).await;
    let mut stream = alice.read("bob", "endless").await.unwrap();
    stream.next().await.unwrap().unwrap();
    // Alice keeps reading bob's endless file while someone else claims bob's name.
    let reading = tokio::spawn(async move {
        // Bounded: aborted below.
        while let Ok(Some(_)) = stream.next().await {}
    });
    let r2 = root_with(0);
    let err = Peer::start(client_opts(&hub, "bob", r2.path()), quiet())
        .await
        .err()
        .expect("the streaming bob keeps its name");
    reading.abort();
    match &err {
        ConnectError::Publish { status, .. } => assert_eq!(status.code(), Code::AlreadyExists),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(alice.list().await.unwrap(), vec!["alice", "bob"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_tls_handshake_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("hub.pem"), dir.path().join("hub.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = crate::tls::server_config(&cert_path, &key_path, None).unwrap();
    let state = HubState::new(HubOptions {
        tls: Some(tokio_rustls::TlsAcceptor::from(config)),
        ..HubOptions::default()
    });
    // A client that connects and never starts its handshake, handed to the hub's accept path.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _silent = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, addr) = listener.accept().await.unwrap();
    // It does send its first byte (a TLS record), so the hub starts the handshake.
    use tokio::io::AsyncWriteExt as _;
    let mut silent = _silent;
    silent.write_all(&[0x16]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    let conn =
        tokio::spawn(
            state
                .clone()
                .accept_tcp(tcp, 1, addr, super::Admit::Pending(None), deadline),
        );
    let start = tokio::time::Instant::now();
    state.shutdown();
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the connection task ends")
        .unwrap();
    // With time paused, waiting out the handshake would show as exactly its timeout.
    assert!(
        start.elapsed() < crate::tls::HANDSHAKE_TIMEOUT,
        "shutdown waited {:?} for the handshake",
        start.elapsed()
    );
}

/// An exporter that sends one chunk of a read and then nothing, forever.
struct StallingExport;

impl crate::proto::Export for StallingExport {
    async fn ls(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Listing, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn stat(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Entry, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn read(
        &self,
        _ctx: rpc::Context,
        _req: crate::proto::ReadReq,
    ) -> Result<rpc::ItemStream<crate::proto::Chunk>, rpc::Status> {
        let first = crate::proto::Chunk {
            size: 10,
            offset: 0,
            data: netchan_rpc::ByteBuf::from(b"hello".to_vec()),
            eof: false,
            ..Default::default()
        };
        let s = futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            futures::stream::pending(),
        );
        Ok(Box::pin(s))
    }
}

#[tokio::test]
async fn a_read_from_an_exporter_that_goes_quiet_fails_after_the_peer_timeout() {
    let hub = start_hub(HubOptions {
        peer_timeout: Duration::from_millis(300),
        ..HubOptions::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let (_session, _raw, serve) = publish_over(tcp, "slowpoke", StallingExport).await;
    let ra = root_with(0);
    let alice = join(&hub, "alice", ra.path()).await;
    let mut s = alice.read("slowpoke", "x").await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(&first.data[..], b"hello");
    let err = tokio::time::timeout(WAIT, s.next())
        .await
        .expect("the hub gives up in time")
        .unwrap_err();
    match err {
        CallError::Status(st) => {
            assert_eq!(st.code(), Code::DeadlineExceeded);
            assert!(st.message().contains("sent nothing"), "{st}");
        }
        other => panic!("unexpected {other:?}"),
    }
    serve.abort();
}

/// Every item of `export`'s read of `n.txt` from `offset`, called directly (no hub).
async fn read_n_txt(
    export: &crate::export::ExportService,
    offset: u64,
) -> Vec<Result<crate::proto::Chunk, rpc::Status>> {
    use crate::proto::Export as _;
    use futures::StreamExt as _;
    let req = crate::proto::ReadReq {
        path: "n.txt".into(),
        offset,
    };
    export
        .read(rpc::Context::detached("Export.read"), req)
        .await
        .unwrap()
        .collect()
        .await
}

#[tokio::test]
async fn the_exporter_streams_from_an_offset_and_marks_the_last_chunk() {
    let root = root_with(0);
    std::fs::write(root.path().join("n.txt"), b"0123456789").unwrap();
    let export = crate::export::ExportService {
        root: Root::open(root.path()).unwrap(),
    };
    let chunks = read_n_txt(&export, 4).await;
    assert_eq!(chunks.len(), 1);
    let c = chunks.into_iter().next().unwrap().unwrap();
    assert_eq!((c.size, c.offset, c.eof), (10, 4, true));
    assert_eq!(&c.data[..], b"456789");
    // Past the end: one empty last chunk. Absurd offsets: an error, not a panic.
    for (offset, ok) in [(100, true), (u64::MAX, false)] {
        let items = read_n_txt(&export, offset).await;
        assert_eq!(items.len(), 1, "offset {offset}");
        match (&items[0], ok) {
            (Ok(c), true) => assert!(c.eof && c.data.is_empty()),
            (Err(s), false) => {
                assert_eq!(s.code(), Code::OutOfRange, "{s}");
                assert!(s.message().contains(&offset.to_string()), "{s}");
            }
            (other, _) => panic!("offset {offset}: unexpected {other:?}"),
        }
    }
}

// ---- Hostile readers and exporters, admission, deadlines (issue 7) ----

/// Reads `stream` until it fails; panics if it ends cleanly first.
async fn until_error(stream: &mut client::FileStream) -> CallError {
    // Bounded by the caller's timeout and by the file's length.
    loop {
        match stream.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the read ended without an error"),
            Err(e) => return e,
        }
    }
}

#[tokio::test]
async fn a_reader_that_takes_nothing_loses_its_read_and_frees_the_slot() {
    let hub = start_hub(HubOptions {
        max_reads_per_peer: 1,
        reader_stall: Duration::from_millis(300),
        busy_wait: WAIT,
        ..HubOptions::default()
    })
    .await;
    let (rb, ra, rc) = (root_with(64 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let carol = join(&hub, "carol", rc.path()).await;
    let mut stalled = alice.read("bob", "big.bin").await.unwrap();
    stalled.next().await.unwrap().unwrap();
    // Alice stops reading. Carol waits for bob's only slot and gets it once the hub gives up
    // alice's read.
    let got = within(WAIT_S, "carol's read", read_all(&carol, "bob", "hello.txt"))
        .await
        .unwrap();
    assert_eq!(got, b"hello world\n");
    // Alice, reading again, gets what was in flight and then hears why the read ended.
    let err = within(WAIT_S, "alice's stream ends", until_error(&mut stalled)).await;
    assert!(err.to_string().contains("took nothing"), "{err}");
}

#[tokio::test]
async fn one_reader_cannot_take_every_slot_of_a_peer() {
    let hub = start_hub(HubOptions {
        max_reads_per_peer: 4,
        max_reads_per_reader: 2,
        busy_wait: Duration::from_millis(200),
        ..HubOptions::default()
    })
    .await;
    let (rb, ra, rc) = (root_with(64 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let carol = join(&hub, "carol", rc.path()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = alice.read("bob", "big.bin").await.unwrap();
        s.next().await.unwrap().unwrap();
        held.push(s);
    }
    match read_all(&alice, "bob", "hello.txt").await {
        Err(CallError::Status(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("already have 2 calls"), "{s}");
        }
        other => panic!("a third read by alice was not refused: {other:?}"),
    }
    // Alice's ls is refused the same way; carol is served.
    assert!(alice.ls("bob", "").await.is_err());
    let got = within(WAIT_S, "carol's read", read_all(&carol, "bob", "hello.txt"))
        .await
        .unwrap();
    assert_eq!(got, b"hello world\n");
    drop(held);
}

/// An exporter with two files: `gated` sends "hello", then waits for `gate` before its last
/// chunk; `ticking` sends a one-byte chunk every 100 ms, forever.
struct TwoSpeedExport {
    gate: Arc<tokio::sync::Notify>,
}

impl crate::proto::Export for TwoSpeedExport {
    async fn ls(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Listing, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn stat(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Entry, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn read(
        &self,
        _ctx: rpc::Context,
        req: crate::proto::ReadReq,
    ) -> Result<rpc::ItemStream<crate::proto::Chunk>, rpc::Status> {
        use crate::proto::Chunk;
        use netchan_rpc::ByteBuf;
        if req.path == "gated" {
            let gate = self.gate.clone();
            let s = futures::stream::unfold(0u8, move |step| {
                let gate = gate.clone();
                async move {
                    let chunk = match step {
                        0 => Chunk {
                            size: 10,
                            offset: 0,
                            data: ByteBuf::from(b"hello".to_vec()),
                            eof: false,
                            ..Default::default()
                        },
                        1 => {
                            gate.notified().await;
                            Chunk {
                                size: 10,
                                offset: 5,
                                data: ByteBuf::from(b"world".to_vec()),
                                eof: true,
                                ..Default::default()
                            }
                        }
                        _ => return None,
                    };
                    Some((Ok(chunk), step + 1))
                }
            });
            return Ok(Box::pin(s));
        }
        let s = futures::stream::unfold(0u64, |offset| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let chunk = Chunk {
                size: u64::MAX,
                offset,
                data: ByteBuf::from(vec![b't']),
                eof: false,
                ..Default::default()
            };
            Some((Ok(chunk), offset + 1))
        });
        Ok(Box::pin(s))
    }
}

#[tokio::test(start_paused = true)]
async fn peer_sent_nothing_measures_the_exporters_silence_not_one_reads_wait() {
    use futures::StreamExt as _;
    let state = HubState::new(HubOptions {
        peer_timeout: Duration::from_secs(1),
        ..HubOptions::default()
    });
    let gate = Arc::new(tokio::sync::Notify::new());
    let (io, _bob_conn) = duplex_conn(&state, 1);
    let export = TwoSpeedExport { gate: gate.clone() };
    let (_bob, _bob_hub, _bob_export) = publish_over(io, "bob", export).await;
    let (io, _alice_conn) = duplex_conn(&state, 2);
    let root = root_with(0);
    let export = crate::export::ExportService {
        root: Root::open(root.path()).unwrap(),
    };
    let (_alice, alice_hub, _alice_export) = publish_over(io, "alice", export).await;
    let read = |path: &str| PeerRead {
        peer: "bob".into(),
        path: path.into(),
        offset: 0,
    };
    let mut gated = alice_hub.read(read("gated")).await.unwrap();
    assert_eq!(&gated.next().await.unwrap().unwrap().data[..], b"hello");
    // For 5 s (five peer timeouts) the gated read gets nothing while bob streams another file.
    let mut ticking = alice_hub.read(read("ticking")).await.unwrap();
    for _ in 0..50 {
        ticking.next().await.unwrap().unwrap();
    }
    drop(ticking);
    gate.notify_one();
    let last = gated.next().await.unwrap().unwrap();
    assert_eq!((&last.data[..], last.eof), (&b"world"[..], true));
    // And a truly silent exporter still times out: nothing ticks now.
    let mut gated = alice_hub.read(read("gated")).await.unwrap();
    gated.next().await.unwrap().unwrap();
    let start = tokio::time::Instant::now();
    let err = gated.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("sent nothing"), "{err}");
    assert!(
        start.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        start.elapsed()
    );
}

/// An exporter that breaks the chunk rules: `big` sends one byte more than a chunk may hold,
/// `skip` starts at the wrong offset, `huge` sends 1 MiB (a frame over the reads channel's
/// limit).
struct RuleBreakingExport;

impl crate::proto::Export for RuleBreakingExport {
    async fn ls(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Listing, rpc::Status> {
        Ok(crate::proto::Listing {
            entries: Vec::new(),
            truncated: false,
        })
    }

    async fn stat(
        &self,
        _ctx: rpc::Context,
        _req: String,
    ) -> Result<crate::proto::Entry, rpc::Status> {
        Err(rpc::Status::unimplemented("not here"))
    }

    async fn read(
        &self,
        _ctx: rpc::Context,
        req: crate::proto::ReadReq,
    ) -> Result<rpc::ItemStream<crate::proto::Chunk>, rpc::Status> {
        let (offset, len) = match req.path.as_str() {
            "big" => (0, crate::export::CHUNK_SIZE + 1),
            "skip" => (7, 10),
            _ => (0, 4 * crate::export::CHUNK_SIZE),
        };
        let chunk = crate::proto::Chunk {
            size: len as u64,
            offset,
            data: netchan_rpc::ByteBuf::from(vec![b'x'; len]),
            eof: true,
            ..Default::default()
        };
        Ok(Box::pin(futures::stream::iter([Ok(chunk)])))
    }
}

#[tokio::test]
async fn an_exporter_that_breaks_the_chunk_rules_fails_only_its_own_reads() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let bob = join(&hub, "bob", rb.path()).await;
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let (_eve, _eve_hub, _eve_export) = publish_over(tcp, "eve", RuleBreakingExport).await;
    let alice = join(&hub, "alice", ra.path()).await;
    let too_big = format!("a chunk of {} bytes", crate::export::CHUNK_SIZE + 1);
    for (path, want) in [
        ("big", too_big.as_str()),
        ("skip", "at offset 7 where 0 was due"),
    ] {
        match within(WAIT_S, path, read_all(&alice, "eve", path)).await {
            Err(CallError::Status(s)) => {
                assert_eq!(s.code(), Code::Internal, "{path}: {s}");
                assert!(s.message().contains("broke the protocol"), "{path}: {s}");
                assert!(s.message().contains(want), "{path}: {s}");
            }
            other => panic!("{path}: unexpected {other:?}"),
        }
    }
    // A frame over the export channel's limit is refused before it is buffered: eve's reads
    // channel is gone, the read fails as her protocol error (not "peer gone"), and nobody
    // else notices. The next read dials a new channel and meets her next error.
    match within(WAIT_S, "huge", read_all(&alice, "eve", "huge")).await {
        Err(CallError::Status(s)) => {
            assert_eq!(s.code(), Code::Internal, "{s}");
            assert!(
                s.message()
                    .starts_with("peer \"eve\" broke the protocol: it sent a message over"),
                "{s}"
            );
        }
        other => panic!("huge: unexpected {other:?}"),
    }
    match within(WAIT_S, "big again", read_all(&alice, "eve", "big")).await {
        Err(CallError::Status(s)) => assert!(s.message().contains(&too_big), "{s}"),
        other => panic!("big again: unexpected {other:?}"),
    }
    // Eve's ls/stat channel is separate and still works.
    let listing = within(WAIT_S, "eve's ls", alice.ls("eve", ""))
        .await
        .unwrap();
    assert!(listing.entries.is_empty());
    assert_eq!(
        within(WAIT_S, "bob's file", read_all(&alice, "bob", "hello.txt"))
            .await
            .unwrap(),
        b"hello world\n"
    );
    assert_eq!(
        within(WAIT_S, "alice's file", read_all(&bob, "alice", "hello.txt"))
            .await
            .unwrap(),
        b"hello world\n"
    );
}

#[tokio::test]
async fn an_absurd_offset_is_refused_naming_the_offset() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let (session, raw) = raw_client(&hub, None).await;
    let _exports = session.listen(crate::proto::EXPORT_CHANNEL).unwrap();
    let _ = ra;
    // Not published: refused for that first.
    let offset = 1u64 << 63;
    let read = PeerRead {
        peer: "bob".into(),
        path: "hello.txt".into(),
        offset,
    };
    async fn refusal(hub: &HubClient, req: PeerRead) -> rpc::Status {
        use futures::StreamExt as _;
        match hub.read(req).await {
            Err(s) => s,
            Ok(mut items) => within(WAIT_S, "the refusal", items.next())
                .await
                .expect("an item")
                .expect_err("a refusal"),
        }
    }
    let err = refusal(&raw, read.clone()).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // A published reader gets the offset named.
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let (_s, alice_hub, _e) = publish_over(tcp, "alice", RuleBreakingExport).await;
    // 2^63 − 1 too: no file holds a byte there (`off_t` is signed).
    for offset in [i64::MAX as u64, 1 << 63, u64::MAX] {
        let read = PeerRead {
            offset,
            ..read.clone()
        };
        let err = refusal(&alice_hub, read).await;
        assert_eq!(err.code(), Code::OutOfRange, "{offset}: {err}");
        assert!(err.message().contains(&offset.to_string()), "{err}");
    }
}

#[test]
fn hard_linked_files_are_refused_unless_the_sharer_allows_them() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, b"outside the root\n").unwrap();
    let root = root_with(0);
    std::fs::hard_link(&secret, root.path().join("alias.txt")).unwrap();
    let strict = Root::open(root.path()).unwrap();
    let err = strict.open_file("alias.txt").unwrap_err();
    assert!(
        matches!(err, crate::export::ExportError::HardLinked { links: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("--allow-hard-links"), "{err}");
    let status: rpc::Status = err.into();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Files with one link are served as before; the opt-in serves the linked one.
    strict.open_file("hello.txt").unwrap();
    let lenient = Root::open(root.path()).unwrap().allow_hard_links(true);
    let f = lenient.open_file("alias.txt").unwrap();
    assert_eq!(f.read_at(0, 100).unwrap(), b"outside the root\n");
}

#[tokio::test]
async fn a_flood_of_silent_connections_from_one_address_does_not_lock_out_another() {
    let hub = start_hub(HubOptions {
        max_pending_per_addr: 4,
        // Long: the admitted ones must still hold their places while we look.
        hello_timeout: Duration::from_secs(120),
        ..HubOptions::default()
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..32 {
        flood.push(tokio::net::TcpStream::connect(hub.addr).await.unwrap());
    }
    // All but the last 4 are shed (the oldest silent ones go first).
    let mut ends = JoinSet::new();
    for mut tcp in flood {
        ends.spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut b = [0u8; 1];
            let _ = tcp.read(&mut b).await;
        });
    }
    within(WAIT_S, "28 refusals", async {
        for _ in 0..28 {
            ends.join_next().await.unwrap().unwrap();
        }
    })
    .await;
    assert_eq!(hub.state.pending(), 4);
    // A client from another loopback address joins at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(hub.addr).await.unwrap();
    let root = root_with(0);
    let opts = client_opts(&hub, "alice", root.path());
    let _alice = within(WAIT_S, "alice joins", client::establish(tcp, &opts))
        .await
        .unwrap();
    assert_eq!(hub.state.names(), vec!["alice"]);
    // Publishing released alice's place; the flood still holds its four.
    assert_eq!(hub.state.pending(), 4);
    ends.abort_all();
}

/// The soft limit on open file descriptors of this process (`/proc/self/limits`).
fn fd_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

/// One attacker's connection from 127.0.0.`last`, held silent; whenever the hub closes it,
/// it comes back after `pause`, until `stop`. Says on `connected` when its first connection
/// is made.
async fn silent_attacker(
    hub: SocketAddr,
    last: u8,
    pause: Duration,
    stop: tokio_util::sync::CancellationToken,
    connected: tokio::sync::mpsc::Sender<()>,
) {
    use tokio::io::AsyncReadExt as _;
    let mut connected = Some(connected);
    // Bounded by `stop`; every round waits for the hub to close the connection.
    while !stop.is_cancelled() {
        let mut tcp = raw_tcp_from(last, hub).await;
        if let Some(tx) = connected.take() {
            let _ = tx.send(()).await;
        }
        let mut b = [0u8; 1];
        tokio::select! {
            _ = tcp.read(&mut b) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Regression (distributed admission lockout): 1,030 silent connections, 8 from each of 129
/// loopback addresses, filled the hub's 256 pending places, and every newcomer was closed at
/// once while the attacker reconnected. Now the oldest silent ones are shed for newcomers, and
/// a client that has spoken is never shed for them: under the flood a silent connection lasts
/// only as long as the next 256 admissions, and a joining client's own task may not have seen
/// its first bytes by then, so the hub also looks for them at accept and when it sheds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_flood_of_silent_connections_locks_out_no_honest_client() {
    const PER_ADDR: usize = 8;
    // The test holds both ends of every connection: 129 addresses if the limit allows.
    let addrs = 129
        .min(fd_limit().saturating_sub(256) / (2 * PER_ADDR))
        .max(40);
    let hub = start_hub(HubOptions {
        // The old cap, well under the flood, so that the flood must be shed.
        max_pending: 256,
        max_pending_per_addr: PER_ADDR,
        hello_timeout: Duration::from_secs(120),
        ..HubOptions::default()
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flood = JoinSet::new();
    let (connected, mut connections) = tokio::sync::mpsc::channel(16);
    for a in 0..addrs {
        for _ in 0..PER_ADDR {
            let last = 1 + a as u8;
            flood.spawn(silent_attacker(
                hub.addr,
                last,
                Duration::from_secs(1),
                stop.clone(),
                connected.clone(),
            ));
        }
    }
    drop(connected);
    // The flood is in: every attacker's connection is in the hub's accept queue, ahead of
    // every honest client's (the queue is first in, first out).
    within(WAIT_S, "the flood connects", async {
        for _ in 0..addrs * PER_ADDR {
            connections.recv().await.expect("an attacker connected");
        }
    })
    .await;
    let root = root_with(0);
    let mut honest = Vec::new();
    let mut slowest = Duration::ZERO;
    // Honest clients that were shed while joining: each is a client the hub closed although
    // it had said something, since silent connections were there to shed all along.
    let mut shed_while_joining = Vec::new();
    for i in 0..20u8 {
        // From the attacker's own addresses: the per-address cap sheds its silent ones too.
        let last = 1 + i * 6 % addrs as u8;
        let opts = client_opts(&hub, &format!("honest{i}"), root.path());
        let start = tokio::time::Instant::now();
        // One attempt, as the hub must let it in at once; a shed attempt is noted and tried
        // again (as a `--serve` client would) so that the run reports every such shed.
        let joined = tokio::time::timeout(Duration::from_secs(2), async {
            let mut attempts = 0;
            loop {
                let tcp = raw_tcp_from(last, hub.addr).await;
                match client::establish(tcp, &opts).await {
                    Err(e) if e.is_transient() && attempts < 20 => {
                        shed_while_joining.push(format!("honest client {i}: {e}"));
                        attempts += 1;
                    }
                    done => break done,
                }
            }
        })
        .await;
        let took = start.elapsed();
        let link = joined
            .unwrap_or_else(|_| {
                panic!("honest client {i} not in after {took:?}; shed: {shed_while_joining:#?}")
            })
            .unwrap_or_else(|e| panic!("honest client {i} refused: {e}"));
        honest.push(link);
        slowest = slowest.max(took);
    }
    eprintln!(
        "20 honest clients in during the flood; the slowest took {slowest:?}; {} attempts \
         shed while joining; {} connections readmitted after speaking",
        shed_while_joining.len(),
        hub.state.admission.readmitted()
    );
    assert!(shed_while_joining.is_empty(), "{shed_while_joining:#?}");
    assert_eq!(hub.state.names().len(), 20);
    assert!(hub.state.pending() <= 256, "{}", hub.state.pending());
    stop.cancel();
    within(WAIT_S, "the attackers stop", async {
        while flood.join_next().await.is_some() {}
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_hello_must_be_done_within_its_timeout_of_connecting_however_it_is_spread() {
    use tokio::io::AsyncWriteExt as _;
    let state = HubState::new(HubOptions {
        hello_timeout: Duration::from_secs(10),
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(100)),
        ..HubOptions::default()
    });
    let start = tokio::time::Instant::now();
    let (io, task) = duplex_conn(&state, 1);
    let session = Session::client(io, netchan_mux::Config::default());
    // The hello channel at 9 s, then only the first byte of the hello.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let mut hello = session.dial(auth::CHANNEL).await.unwrap();
    hello.write_all(&[auth::VERSION]).await.unwrap();
    hello.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the connection ends")
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_millis(10_500),
        "closed after {took:?}"
    );
}

/// A byte stream that can go deaf: once `deaf` is set, reads never complete (the peer's bytes
/// are never seen), while writes still go through.
struct Deafen<T> {
    io: T,
    deaf: Arc<std::sync::atomic::AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Deafen<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.deaf.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Deafen<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[tokio::test(start_paused = true)]
async fn queued_publishes_whose_dial_back_hangs_do_not_stretch_the_publish_deadline() {
    let state = HubState::new(HubOptions {
        publish_timeout: Duration::from_secs(10),
        mux: netchan_mux::Config::default().close_grace(Duration::from_millis(100)),
        ..HubOptions::default()
    });
    let (io, task) = duplex_conn(&state, 1);
    let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Deafen {
        io,
        deaf: deaf.clone(),
    };
    let session = Session::client(io, netchan_mux::Config::default());
    let mut hello = session.dial(auth::CHANNEL).await.unwrap();
    auth::client_hello(&mut hello, None).await.unwrap();
    let start = tokio::time::Instant::now();
    let _exports = session.listen(crate::proto::EXPORT_CHANNEL).unwrap();
    let hub = peer_link(&session, rpc::Server::new()).await;
    // One call gets the rpc conn going, then the client stops hearing the hub: the dial back
    // of every publish hangs.
    assert_eq!(
        hub.list(ListReq {}).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    deaf.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut publishes = JoinSet::new();
    for i in 0..3 {
        let hub = hub.clone();
        publishes.spawn(async move {
            let _ = hub
                .publish(PublishReq {
                    name: format!("p{i}"),
                })
                .await;
        });
    }
    tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the connection ends")
        .unwrap();
    let took = start.elapsed();
    assert!(
        took <= Duration::from_millis(10_500),
        "closed after {took:?}"
    );
    assert!(state.names().is_empty());
    publishes.abort_all();
}

/// A self-signed certificate for 127.0.0.1 in `dir`: (cert path, key path).
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("hub.pem"), dir.join("hub.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn plaintext_and_tls_mismatches_are_named_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let config = crate::tls::server_config(&cert, &key, None).unwrap();
    let tls_hub = start_hub(HubOptions {
        tls: Some(tokio_rustls::TlsAcceptor::from(config)),
        ..HubOptions::default()
    })
    .await;
    let plain_hub = start_hub(HubOptions::default()).await;
    let root = root_with(0);
    // A plaintext client of the TLS hub is told, in its own protocol, that TLS is required.
    let err = within(
        WAIT_S,
        "plaintext client",
        Peer::start(client_opts(&tls_hub, "alice", root.path()), quiet()),
    )
    .await
    .err()
    .expect("refused");
    let text = netchan_rpc::chain(&err);
    assert!(text.contains("requires TLS"), "{text}");
    // A TLS client of the plaintext hub is told the hub may be plaintext.
    let opts = tls_client_opts(&plain_hub, "alice", root.path(), &cert);
    let err = within(WAIT_S, "tls client", Peer::start(opts, quiet()))
        .await
        .err()
        .expect("refused");
    let text = netchan_rpc::chain(&err);
    assert!(text.contains("plaintext hub"), "{text}");
    // Both hubs serve matching clients as before.
    let opts = tls_client_opts(&tls_hub, "bob", root.path(), &cert);
    let bob = within(WAIT_S, "tls bob", Peer::start(opts, quiet()))
        .await
        .unwrap();
    assert_eq!(bob.list().await.unwrap(), vec!["bob"]);
    let carol = join(&plain_hub, "carol", root.path()).await;
    assert_eq!(carol.list().await.unwrap(), vec!["carol"]);
}

#[tokio::test]
async fn tls_failures_are_said_in_plain_words() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cert, key) = self_signed(dir.path());
    let (stranger, _) = self_signed(other.path());
    // Mutual TLS: client certificates must chain to the hub's own (self-signed) one.
    let config = crate::tls::server_config(&cert, &key, Some(&cert)).unwrap();
    let hub = start_hub(HubOptions {
        tls: Some(tokio_rustls::TlsAcceptor::from(config)),
        ..HubOptions::default()
    })
    .await;
    let root = root_with(0);
    let refusal = |opts| async {
        within(WAIT_S, "refused", Peer::start(opts, quiet()))
            .await
            .err()
            .expect("refused")
    };
    // Trusting another CA: one sentence, our side.
    let err = refusal(tls_client_opts(&hub, "alice", root.path(), &stranger)).await;
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("this client does not trust the hub's certificate"),
        "{text}"
    );
    assert!(
        text.contains("the CA that signed the hub's certificate"),
        "{text}"
    );
    assert!(!err.is_transient());
    // No client certificate for a hub that requires one: the hub's side, said as such.
    let err = refusal(tls_client_opts(&hub, "alice", root.path(), &cert)).await;
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("the hub requires a client certificate"),
        "{text}"
    );
    assert!(!err.is_transient());
}

#[test]
fn the_read_window_follows_the_round_trip() {
    let opts = HubOptions::default();
    let window = |ms| super::forward::window_for(&opts, Duration::from_millis(ms));
    // Twice the chunks that hold what is in flight (credit comes back in half-window batches).
    let twice_bdp = |bytes: u64| 2 * bytes.div_ceil(crate::export::CHUNK_SIZE as u64) as u32;
    // A LAN: the floor of 2 MiB.
    assert_eq!(window(0), crate::proto::chunks(2 << 20));
    assert_eq!(window(1), crate::proto::chunks(2 << 20));
    // 50 ms at 1 Gbit/s is 6.25 MB in flight.
    assert_eq!(window(50), twice_bdp(6_250_000));
    assert_eq!(window(200), twice_bdp(25_000_000));
}

#[tokio::test]
async fn reads_share_the_exporters_window_budget_and_give_it_back() {
    let hub = HubState::new(HubOptions {
        forward_budget: 100 * crate::export::CHUNK_SIZE,
        ..HubOptions::default()
    });
    let (io, _conn) = duplex_conn(&hub, 1);
    let export = CountingExport {
        pulled: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        stat_hangs: false,
    };
    let (_bob, _bob_hub, _bob_export) = publish_over(io, "bob", export).await;
    let bob = hub.peer("bob").unwrap();
    // A long link wants the floor + 60 chunks: the first read gets it, the second what is
    // left (the floor + 40), the third only the floor.
    let floor = HubOptions::default().forward_window;
    let (first, a) = hub.reserve_window(&bob, floor + 60);
    assert_eq!(first, floor + 60);
    let (second, b) = hub.reserve_window(&bob, floor + 60);
    assert_eq!(second, floor + 40);
    let (third, c) = hub.reserve_window(&bob, floor + 60);
    assert_eq!((third, c.is_none()), (floor, true));
    // A read that wants no more than the floor takes nothing from the budget.
    drop(a);
    assert_eq!(hub.reserve_window(&bob, floor).0, floor);
    assert_eq!(bob.window_budget.available_permits(), 60);
    drop(b);
    assert_eq!(bob.window_budget.available_permits(), 100);
}

#[tokio::test]
async fn a_reader_whose_socket_is_not_read_loses_its_read_and_frees_the_slot() {
    let hub = start_hub(HubOptions {
        max_reads_per_peer: 1,
        reader_stall: Duration::from_millis(500),
        busy_wait: WAIT,
        ..HubOptions::default()
    })
    .await;
    let proxy = Proxy::start(hub.addr, Link::ideal()).await.unwrap();
    let (rb, ra, rc) = (root_with(256 << 20), root_with(0), root_with(0));
    let _bob = join(&hub, "bob", rb.path()).await;
    let mut opts = client_opts(&hub, "alice", ra.path());
    opts.hubs = vec![proxy.addr().to_string()];
    let alice = within(WAIT_S, "alice joins", Peer::start(opts, quiet()))
        .await
        .unwrap();
    let carol = join(&hub, "carol", rc.path()).await;
    let mut stream = alice.read("bob", "big.bin").await.unwrap();
    stream.next().await.unwrap().unwrap();
    // Alice's link stops delivering what the hub sends her; she has credit, so the hub
    // writes until her link and its buffers are full, then cannot write any more.
    proxy.stall(Direction::Down);
    let got = within(WAIT_S, "carol's read", read_all(&carol, "bob", "hello.txt"))
        .await
        .unwrap();
    assert_eq!(got, b"hello world\n");
    drop(stream);
}

#[tokio::test]
async fn concurrent_reads_over_a_slow_exporter_link_all_finish_without_false_silence() {
    // 16 Mbit/s, 50 ms: 4 reads of 4 MiB share about 8 s of link time. Each read may have its
    // whole file (2 s of link) in flight, as its window over 50 ms is 12 MiB, so a read can
    // queue behind the others' for over 5 s: longer than the 4 s silence bound, while chunks
    // keep passing.
    let hub = start_hub(HubOptions {
        peer_timeout: Duration::from_secs(4),
        ..HubOptions::default()
    })
    .await;
    let proxy = Proxy::start(hub.addr, Link::wan(Duration::from_millis(50), 16_000_000))
        .await
        .unwrap();
    let (rb, ra) = (root_with(4 << 20), root_with(0));
    let mut opts = client_opts(&hub, "bob", rb.path());
    opts.hubs = vec![proxy.addr().to_string()];
    let _bob = within(WAIT_S, "bob joins", Peer::start(opts, quiet()))
        .await
        .unwrap();
    let alice = Arc::new(join(&hub, "alice", ra.path()).await);
    let mut reads = JoinSet::new();
    for _ in 0..4 {
        let alice = alice.clone();
        reads.spawn(async move {
            let mut s = alice.read("bob", "big.bin").await?;
            let (mut first, mut len) = (None, 0);
            // Bounded by the file's size.
            while let Some(chunk) = s.next().await? {
                first.get_or_insert_with(tokio::time::Instant::now);
                len += chunk.data.len();
            }
            Ok::<_, CallError>((first, tokio::time::Instant::now(), len))
        });
    }
    let mut firsts = Vec::new();
    let mut ends = Vec::new();
    // Bounded: 4 reads.
    while let Some(done) = tokio::time::timeout(Duration::from_secs(120), reads.join_next())
        .await
        .expect("the reads finish")
    {
        let (first, end, len) = done
            .unwrap()
            .expect("no read fails on a slow but live link");
        assert_eq!(len, 4 << 20);
        firsts.push(first.expect("a first chunk"));
        ends.push(end);
    }
    // Served evenly: every read had its first chunk before any read was complete (a file is
    // 4 chunks, each half a second of link).
    assert!(
        firsts.iter().max() < ends.iter().min(),
        "a read waited for its first chunk until another had finished"
    );
}

/// The hub calls an exporter's `ls`/`stat` back over the exporter's own peer link (what
/// `Hub.publish` took with `ctx.callback()`), not over its `export` channel: here that
/// channel is listened on but never served, and both still answer.
#[tokio::test]
async fn ls_and_stat_reach_the_exporter_over_its_own_peer_link() {
    let hub = start_hub(HubOptions::default()).await;
    let (rb, ra) = (root_with(0), root_with(0));
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let session = Session::client(tcp, netchan_mux::Config::default());
    let mut hello = session.dial(auth::CHANNEL).await.unwrap();
    auth::client_hello(&mut hello, None).await.unwrap();
    // Publish checks that the channel can be opened; nothing ever serves it.
    let _exports = session.listen(crate::proto::EXPORT_CHANNEL).unwrap();
    let bob = peer_link(
        &session,
        crate::export::export_server(Root::open(rb.path()).unwrap()),
    )
    .await;
    within(
        WAIT_S,
        "bob publishes",
        bob.publish(PublishReq { name: "bob".into() }),
    )
    .await
    .unwrap();
    let alice = join(&hub, "alice", ra.path()).await;
    let listing = within(WAIT_S, "ls over the peer link", alice.ls("bob", ""))
        .await
        .unwrap();
    let names: Vec<&str> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["big.bin", "hello.txt", "sub"]);
    let st = within(
        WAIT_S,
        "stat over the peer link",
        alice.stat("bob", "hello.txt"),
    )
    .await
    .unwrap();
    assert_eq!(st.size, 12);
}

#[tokio::test(start_paused = true)]
async fn readers_that_take_nothing_and_reissue_their_reads_never_lock_others_out() {
    use futures::StreamExt as _;
    let state = HubState::new(HubOptions::default());
    let export = || CountingExport {
        pulled: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        stat_hangs: false,
    };
    let (io, _bob_conn) = duplex_conn(&state, 1);
    let (_bob, _bob_hub, _bob_export) = publish_over(io, "bob", export()).await;
    let mut attackers = Vec::new();
    for i in 0..2u64 {
        let (io, conn) = duplex_conn(&state, 10 + i);
        let (session, hub, task) = publish_over(io, &format!("mallory{i}"), export()).await;
        // One item of credit, never consumed: these reads take nothing.
        let hub = hub.with_options(rpc::CallOptions::default().stream_window(1));
        attackers.push((session, hub, task, conn, Vec::new()));
    }
    let (io, _alice_conn) = duplex_conn(&state, 2);
    let (_alice, alice_hub, _alice_export) = publish_over(io, "alice", export()).await;
    let read = || PeerRead {
        peer: "bob".into(),
        path: "endless".into(),
        offset: 0,
    };
    let start = tokio::time::Instant::now();
    let mut next_reissue = start;
    let mut gets = 0;
    // Bounded: 90 simulated seconds in steps of at least 5 s.
    while start.elapsed() < Duration::from_secs(90) {
        if tokio::time::Instant::now() >= next_reissue {
            // Every 25 s (before the 30 s "took nothing" limit) each attacker cancels its reads
            // and issues 4 new ones, as many as the hub lets it hold.
            for (_, hub, _, _, held) in &mut attackers {
                held.clear();
                for _ in 0..4 {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(3), hub.read(read())).await
                    {
                        held.push(s);
                    }
                }
            }
            next_reissue += Duration::from_secs(25);
        }
        // Alice's read gets a slot and flows within 5 s, whatever the attackers hold.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = alice_hub.read(read()).await?;
            for _ in 0..20 {
                s.next().await.expect("a chunk")?;
            }
            Ok::<_, rpc::Status>(())
        })
        .await;
        match got {
            Ok(Ok(())) => gets += 1,
            Ok(Err(s)) => panic!("alice's read failed at {:?}: {s}", start.elapsed()),
            Err(_) => panic!("alice's read took over 5 s at {:?}", start.elapsed()),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(gets >= 15, "{gets} reads");
    // The attackers did hold slots meanwhile: the hub was full when alice came.
    let held: usize = attackers.iter().map(|a| a.4.len()).sum();
    assert!(held >= 6, "attackers hold {held} reads");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_that_grants_no_credit_is_told_it_took_nothing() {
    use futures::StreamExt as _;
    let state = HubState::new(HubOptions {
        reader_stall: Duration::from_secs(30),
        ..HubOptions::default()
    });
    let export = || CountingExport {
        pulled: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        stat_hangs: false,
    };
    let (io, _bob_conn) = duplex_conn(&state, 1);
    let (_bob, _bob_hub, _bob_export) = publish_over(io, "bob", export()).await;
    let (io, _alice_conn) = duplex_conn(&state, 2);
    let (_alice, alice_hub, _alice_export) = publish_over(io, "alice", export()).await;
    // One item of credit, and none after it: alice never consumes.
    let alice_hub = alice_hub.with_options(rpc::CallOptions::default().stream_window(1));
    let read = PeerRead {
        peer: "bob".into(),
        path: "endless".into(),
        offset: 0,
    };
    let stream = alice_hub.read(read).await.unwrap();
    let start = tokio::time::Instant::now();
    // Only the end matters: collecting would grant credit, so wait for the call to end first
    // (the stream's end arrives without any).
    let items: Vec<_> = tokio::time::timeout(Duration::from_secs(40), async {
        // Let the stall run out with nothing consumed, then read what arrived.
        tokio::time::sleep(Duration::from_secs(31)).await;
        stream.take(2).collect::<Vec<_>>().await
    })
    .await
    .expect("the read ends");
    // The one chunk alice had credit for, then at once the end: it was sent while she
    // granted nothing (consuming that chunk would have let the hub send another first).
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(items[0].is_ok(), "{items:?}");
    let end = items[1].as_ref().expect_err("the end, not another chunk");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end}");
    assert!(end.message().contains("you took nothing"), "{end}");
    assert!(start.elapsed() >= Duration::from_secs(30));
}

/// Issue 22: what marks an exporter's oversized chunk is the code its rpc layer answers
/// (`RESOURCE_EXHAUSTED`) or our own rpc layer's typed verdict on the reads channel (seen end
/// to end in `an_exporter_that_breaks_the_chunk_rules_fails_only_its_own_reads`), never the
/// words of a message: an exporter that sends the rpc layer's wording is not taken at its word.
#[test]
fn an_oversized_chunk_is_told_by_code_and_typed_source_not_by_words() {
    use super::forward::oversized_frame;
    assert!(oversized_frame(&rpc::Status::resource_exhausted(
        "message exceeds the peer's limit"
    )));
    for s in [
        rpc::Status::unavailable("peer announced a 9000000-byte frame, over the 263168-byte limit"),
        rpc::Status::internal("peer announced a 9000000-byte frame, over the 263168-byte limit"),
        rpc::Status::not_found("no such file"),
    ] {
        assert!(!oversized_frame(&s), "{s:?}");
    }
}

/// Issue 22: the reader's own hop is sized from the round trip it measured to the hub: over a
/// link of at least 50 ms it is at least the 50 ms window (the delay line never shortens it).
#[tokio::test]
async fn a_reader_far_from_the_hub_sizes_its_window_from_the_round_trip() {
    let hub = start_hub(HubOptions::default()).await;
    let proxy = Proxy::start(hub.addr, Link::delayed(Duration::from_millis(25)))
        .await
        .unwrap();
    let root = root_with(0);
    let mut opts = client_opts(&hub, "faraway", root.path());
    opts.hubs = vec![proxy.addr().to_string()];
    let far = within(WAIT_S, "the far reader joins", Peer::start(opts, quiet()))
        .await
        .unwrap();
    let window = far.read_window().expect("connected");
    let at_least = crate::client::read_window(Duration::from_millis(50));
    assert!(at_least > crate::proto::READ_WINDOW_MIN, "{at_least}");
    assert!(window >= at_least, "{window} < {at_least}");
    assert!(window <= crate::proto::chunks(32 << 20), "{window}");
}
