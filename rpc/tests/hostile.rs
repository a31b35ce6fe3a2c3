//! Hostile and stalled peers, written byte by byte: what a conn may cost a
//! server, and how long it may hold it (issue 7, the rpc items).
//!
//! Memory is measured as the growth of this process's `VmRSS`. The tests of
//! this file take one lock so that no other test allocates while one
//! measures.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{test_server, until_count};
use netchan_rpc::{ByteBuf, Client, Code, Config, Error, Server, ServiceDef};
use netchan_testkit::within;
use serde::{Serialize, Serializer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream},
    sync::Notify,
    task::JoinHandle,
    time::Instant,
};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

const PREAMBLE: &[u8] = b"NCRPC\x02";

/// One measuring test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib << 10
}

const MIB: usize = 1 << 20;

/// A request frame for `method` taking `()` (empty payload), id `id`
/// (below 251, so one varint byte), no deadline, no metadata.
fn request(id: u8, method: &str) -> Vec<u8> {
    assert!(id < 251 && method.len() < 251);
    let mut body = vec![0x00, id, method.len() as u8];
    body.extend_from_slice(method.as_bytes());
    body.extend_from_slice(&[0x00, 0x00, 0x00]);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Serves `io` on a spawned task.
fn serve<T>(server: &Server, io: T) -> JoinHandle<Result<(), Error>>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let server = server.clone();
    tokio::spawn(async move { server.serve(io).await })
}

/// A conn type that zero-fills the read buffer it is offered, as netchan-mux
/// channels do (tokio-util's `Compat` around a futures-io stream).
fn zero_filling(io: DuplexStream) -> impl AsyncRead + AsyncWrite + Send + Unpin + 'static {
    io.compat().compat()
}

/// Regression for issue 7, case 1: the preamble, a 16 MiB length prefix and
/// one byte made the server reserve (and, through a zero-filling conn,
/// commit) 16 MiB per conn, and hold it forever.
#[tokio::test(start_paused = true)]
async fn a_16_mib_length_prefix_and_one_byte_commit_no_memory_and_time_out() {
    let _serial = SERIAL.lock().await;
    const CONNS: usize = 32;
    let server = test_server(Config::default());
    let before = rss();
    let mut peers = Vec::new();
    for _ in 0..CONNS {
        let (mut peer, conn) = tokio::io::duplex(64 << 10);
        let serving = serve(&server, zero_filling(conn));
        peer.write_all(PREAMBLE).await.unwrap();
        peer.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
        peer.write_all(&[0]).await.unwrap();
        peers.push((peer, serving));
    }
    // Time is paused: this sleep ends once every task is idle, that is once
    // every conn has read what was sent and waits for more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{CONNS} conns announcing 16 MiB: RSS grew by {} KiB",
        grown >> 10
    );
    assert!(
        grown < 16 * MIB,
        "{CONNS} conns announcing 16 MiB frames grew RSS by {} MiB",
        grown / MIB
    );
    // Each conn ends at the frame deadline (30 s by default), naming it.
    let start = Instant::now();
    for (_peer, serving) in peers {
        let res = within(60, "serve ends at the frame deadline", serving)
            .await
            .unwrap();
        assert!(
            matches!(res, Err(Error::FrameTimeout { after, received: 5 }) if after == Duration::from_secs(30)),
            "{res:?}"
        );
    }
    assert!(start.elapsed() <= Duration::from_secs(30));
}

/// A frame that trickles in one byte a second ends its conn at the frame
/// deadline with a typed error; a conn next to it is unaffected.
#[tokio::test(start_paused = true)]
async fn a_trickled_frame_hits_the_frame_deadline_and_other_conns_carry_on() {
    let _serial = SERIAL.lock().await;
    let server = test_server(Config::default().frame_timeout(Duration::from_secs(10)));
    let (mut peer, conn) = tokio::io::duplex(64 << 10);
    let serving = serve(&server, conn);
    peer.write_all(PREAMBLE).await.unwrap();
    peer.write_all(&[0, 0, 0, 100, 0]).await.unwrap();
    let start = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if peer.write_all(&[0]).await.is_err() {
                break;
            }
        }
    });
    let (good, good_serving) = common::duplex_pair(&server, Config::default());
    let res = within(60, "trickled conn ends", serving).await.unwrap();
    let err = res.unwrap_err();
    assert!(
        matches!(err, Error::FrameTimeout { after, .. } if after == Duration::from_secs(10)),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("did not complete a frame within 10s"));
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let echoed: String = within(
        10,
        "call on the other conn",
        good.call("Test.echo", "still here"),
    )
    .await
    .unwrap();
    assert_eq!(echoed, "still here");
    trickle.abort();
    drop(good);
    within(10, "other conn ends", good_serving)
        .await
        .unwrap()
        .unwrap();
}

/// A length prefix over the conn's `max_message_size` is refused at once,
/// naming the size and the limit, before any of the body is sent.
#[tokio::test]
async fn an_oversized_frame_is_refused_naming_its_size_and_the_limit() {
    let _serial = SERIAL.lock().await;
    let server = test_server(Config::default().max_message_size(4096));
    let (mut peer, conn) = tokio::io::duplex(64 << 10);
    let serving = serve(&server, conn);
    peer.write_all(PREAMBLE).await.unwrap();
    peer.write_all(&5000u32.to_be_bytes()).await.unwrap();
    let err = within(10, "oversized frame refused", serving)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                len: 5000,
                max: 4096
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "peer announced a 5000-byte frame, over the 4096-byte limit"
    );
}

/// A response that is dropped counts itself (and wakes the waiter).
struct Counted {
    body: Vec<u8>,
    dropped: Arc<(AtomicUsize, Notify)>,
}

impl Serialize for Counted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.body)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.dropped.0.fetch_add(1, Ordering::SeqCst);
        self.dropped.1.notify_one();
    }
}

/// A server whose `Big.make` answers 1 MiB of fresh memory.
fn big_server(config: Config) -> (Server, Arc<(AtomicUsize, Notify)>) {
    let dropped = Arc::new((AtomicUsize::new(0), Notify::new()));
    let mut server = Server::with_config(config);
    let d = Arc::clone(&dropped);
    server.add(ServiceDef::new("Big").unary("make", move |_ctx, ()| {
        let dropped = Arc::clone(&d);
        async move {
            Ok(Counted {
                body: vec![1; MIB],
                dropped,
            })
        }
    }));
    (server, dropped)
}

/// Regression for issue 7, case 2: replies for a peer that sent requests and
/// stopped reading queued with nothing counting them (the hub grew by
/// 635 MiB). Now they stay within the outbound budget: every reply past it
/// is dropped at once and its call answered `ResourceExhausted`.
#[tokio::test]
async fn replies_for_a_peer_that_never_reads_stay_within_the_outbound_budget() {
    let _serial = SERIAL.lock().await;
    const CALLS: u8 = 96;
    let (server, dropped) = big_server(Config::default().max_outbound_bytes(4 * MIB));
    let before = rss();
    let (mut peer, conn) = tokio::io::duplex(64 << 10);
    let serving = serve(&server, conn);
    let mut wire = PREAMBLE.to_vec();
    for id in 1..=CALLS {
        wire.extend_from_slice(&request(id, "Big.make"));
    }
    peer.write_all(&wire).await.unwrap();
    // Every response was queued, parked or refused: none is held by a
    // waiting call any more.
    until_count(&dropped.0, &dropped.1, CALLS as usize).await;
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{CALLS} unread 1 MiB replies: RSS grew by {} KiB",
        grown >> 10
    );
    assert!(
        grown < 24 * MIB,
        "{CALLS} unread 1 MiB replies grew RSS by {} MiB (budget 4 MiB)",
        grown / MIB
    );
    drop(peer);
    let _ = within(30, "serve ends once the peer is gone", serving).await;
}

/// Regression for issue 7, case 4: a peer that sends requests but never
/// reads was never dropped. Now its conn ends on the write-stall bound with
/// a typed reason, while another conn of the same server keeps working.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_is_closed_on_write_stall_while_others_keep_working() {
    let _serial = SERIAL.lock().await;
    let config = Config::default().write_stall_timeout(Duration::from_secs(5));
    let (mut server, _dropped) = big_server(config.clone());
    server.add(ServiceDef::new("Test").unary("echo", |_ctx, s: String| async move { Ok(s) }));
    let (mut peer, conn) = tokio::io::duplex(16 << 10);
    let serving = serve(&server, conn);
    let mut wire = PREAMBLE.to_vec();
    for id in 1..=4 {
        wire.extend_from_slice(&request(id, "Big.make"));
    }
    peer.write_all(&wire).await.unwrap();
    let start = Instant::now();
    let (good, _good_serving) = common::duplex_pair(&server, Config::default());
    let err = within(60, "stalled conn ends", serving)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, Error::WriteStalled { after, pending } if after == Duration::from_secs(5) && pending > 0),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("peer read nothing for 5s"),
        "{err}"
    );
    assert!(start.elapsed() <= Duration::from_secs(6));
    let echoed: String = within(10, "call on the other conn", good.call("Test.echo", "fine"))
        .await
        .unwrap();
    assert_eq!(echoed, "fine");
    drop(peer);
}

/// A client whose server stops reading fails every pending call with the
/// write-stall reason instead of waiting forever.
#[tokio::test(start_paused = true)]
async fn every_pending_call_of_a_client_gets_the_write_stall_reason() {
    let _serial = SERIAL.lock().await;
    let (conn, mut server_end) = tokio::io::duplex(16 << 10);
    server_end.write_all(PREAMBLE).await.unwrap();
    let client = Client::with_config(
        conn,
        Config::default().write_stall_timeout(Duration::from_secs(5)),
    );
    let mut calls = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.call::<_, ()>("X.y", &ByteBuf::from(vec![0u8; 256 << 10]))
                .await
        }));
    }
    for call in calls {
        let status = within(60, "call fails on write stall", call)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status}");
        assert!(
            status.message().contains("peer read nothing for 5s"),
            "{status}"
        );
    }
    drop(server_end);
}
