//! The hub's bounds, measured on a real `share hub` process with hand-written clients:
//! memory per idle client, and hostile frames at the rpc and yamux layers.

#[path = "../src/auth.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod auth;
mod common;
#[path = "../src/export/mod.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod export;
#[path = "../src/proto.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod proto;
#[path = "common/raw.rs"]
mod raw;

use std::{net::SocketAddr, time::Duration};

use netchan_testkit::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{start_hub, Proc};
use crate::proto::ListReq;

/// Bound in seconds for any step that should be prompt.
const WAIT_S: u64 = 60;

/// VmRSS of a process, in KiB.
fn rss_kib(p: &Proc) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The names the hub lists to `client`: how a test checks that other clients carry on.
async fn listed(client: &proto::HubClient) -> Vec<String> {
    within(WAIT_S, "list", client.list(ListReq {}))
        .await
        .unwrap()
}

/// "alice" joins from the `i`-th loopback source: the client whose calls show that other
/// clients are unaffected by what a test does to the hub.
async fn alice_joins(addr: SocketAddr, i: usize) -> (netchan_mux::Session, proto::HubClient) {
    within(
        WAIT_S,
        "alice joins",
        raw::join(addr, raw::source(i), "alice".into()),
    )
    .await
}

/// Opens stream 1 by hand with a SYN data frame carrying the channel handshake for the hello
/// channel, then the hello itself (no token).
async fn send_hello_on_stream_1(tcp: &mut tokio::net::TcpStream) {
    use raw::yamux::{DATA, SYN};
    let mut hello = vec![1u8, auth::CHANNEL.len() as u8];
    hello.extend_from_slice(auth::CHANNEL.as_bytes());
    hello.extend_from_slice(&raw::hello_bytes(b""));
    tcp.write_all(&raw::yamux_header(DATA, SYN, 1, hello.len() as u32))
        .await
        .unwrap();
    tcp.write_all(&hello).await.unwrap();
}

fn addr_of(hub: &common::Hub) -> SocketAddr {
    hub.addr.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_clients_cost_the_hub_at_most_64_kib_each() {
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    // Warm up: the first clients grow the hub's allocator arenas and runtime once.
    let mut clients = Vec::new();
    for i in 0..16 {
        clients.push(
            within(
                WAIT_S,
                "warm-up join",
                raw::join(addr, raw::source(i), format!("w{i}")),
            )
            .await,
        );
    }
    let before = rss_kib(&hub.proc);
    const N: usize = 1000;
    for wave in 0..N / 8 {
        let mut joins = tokio::task::JoinSet::new();
        for k in 0..8 {
            let i = 16 + wave * 8 + k;
            joins.spawn(raw::join(addr, raw::source(i), format!("idle{i}")));
        }
        while let Some(c) = within(WAIT_S, "a wave of joins", joins.join_next()).await {
            clients.push(c.unwrap());
        }
    }
    let names = within(WAIT_S, "list", clients[0].1.list(ListReq {}))
        .await
        .unwrap();
    assert_eq!(names.len(), N + 16);
    let after = rss_kib(&hub.proc);
    let per = after.saturating_sub(before) / N as u64;
    eprintln!("hub RSS {before} -> {after} KiB: {per} KiB per idle client");
    assert!(per <= 64, "{per} KiB per idle client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_frames_claiming_16_mib_from_unpublished_clients_commit_nothing() {
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let before = rss_kib(&hub.proc);
    // 96 connections (6 from each of 16 addresses), each with its rpc peer channel (the hub
    // serves one per session): the preamble, a length prefix of 16 MiB and one byte. No
    // token, no publish.
    let mut sessions = Vec::new();
    let mut channels = Vec::new();
    for i in 0..16 {
        for _ in 0..6 {
            let session = within(WAIT_S, "hello", async {
                raw::hello(raw::tcp_from(raw::source(i), addr).await).await
            })
            .await;
            let mut ch = within(WAIT_S, "peer channel", raw::raw_hub_channel(&session)).await;
            let mut claim = raw::rpc_prefix(16 << 20).to_vec();
            claim.push(0);
            // The hub may have hung up already: it refuses the prefix on sight.
            let _ = ch.write_all(&claim).await;
            let _ = ch.flush().await;
            channels.push(ch);
            sessions.push(session);
        }
    }
    // The hub refuses each claim at once (its limit is 3 MiB): every channel ends.
    for ch in &mut channels {
        let mut buf = [0u8; 64];
        // Bounded: the hub's preamble, then the end of the channel.
        within(WAIT_S, "the hub ends the channel", async {
            while let Ok(n) = ch.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    let after = rss_kib(&hub.proc);
    assert!(
        after.saturating_sub(before) < 16 << 10,
        "hub RSS grew from {before} to {after} KiB"
    );
    // Other clients are unaffected.
    let (_s, alice) = alice_joins(addr, 100).await;
    assert_eq!(listed(&alice).await, vec!["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yamux_frame_over_the_limit_ends_only_that_session() {
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    // A data frame opening stream 1 that claims 16 MiB, then garbage.
    let mut tcp = raw::tcp_from(raw::source(1), addr).await;
    tcp.write_all(&raw::yamux_header(
        raw::yamux::DATA,
        raw::yamux::SYN,
        1,
        16 << 20,
    ))
    .await
    .unwrap();
    tcp.write_all(&[0xee; 1024]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    within(WAIT_S, "the hub ends the session", async {
        // Bounded: ends at the hub's close (or reset).
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let (_s, alice) = alice_joins(addr, 2).await;
    assert_eq!(listed(&alice).await, vec!["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_fileshare_requests_good_and_bad_get_typed_answers() {
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let session = within(WAIT_S, "hello", async {
        raw::hello(raw::tcp_from(raw::source(1), addr).await).await
    })
    .await;
    raw::serve_no_files(&session);
    let mut ch = within(WAIT_S, "peer channel", raw::raw_hub_channel(&session)).await;
    let mut preamble = [0u8; 6];
    within(WAIT_S, "preamble", ch.read_exact(&mut preamble))
        .await
        .unwrap();
    assert_eq!(preamble, raw::RPC_PREAMBLE);
    // Hub.publish with a name that is not UTF-8: INVALID_ARGUMENT (code 3) for that call.
    let mut bad = Vec::new();
    raw::string(b"\xff\xfe", &mut bad);
    ch.write_all(&raw::request_frame(1, "Hub.publish", &bad))
        .await
        .unwrap();
    let answer = within(WAIT_S, "answer 1", raw::read_frame(&mut ch))
        .await
        .unwrap();
    // Response (01), id 1, Some(status) (01), code 3.
    assert_eq!(&answer[..4], &[1, 1, 1, 3], "{answer:?}");
    // A valid payload with trailing bytes (another type): refused the same way.
    let mut trailing = Vec::new();
    raw::string(b"hand", &mut trailing);
    trailing.push(7);
    ch.write_all(&raw::request_frame(2, "Hub.publish", &trailing))
        .await
        .unwrap();
    let answer = within(WAIT_S, "answer 2", raw::read_frame(&mut ch))
        .await
        .unwrap();
    assert_eq!(&answer[..4], &[1, 2, 1, 3], "{answer:?}");
    // The same conn still serves: a well-formed publish succeeds (no status, then
    // PublishResp { name: "hand", peers: 1 }).
    let mut good = Vec::new();
    raw::string(b"hand", &mut good);
    ch.write_all(&raw::request_frame(3, "Hub.publish", &good))
        .await
        .unwrap();
    let answer = within(WAIT_S, "answer 3", raw::read_frame(&mut ch))
        .await
        .unwrap();
    assert_eq!(answer, [1, 3, 0, 4, b'h', b'a', b'n', b'd', 1]);
    let (_s, alice) = alice_joins(addr, 2).await;
    assert_eq!(listed(&alice).await, vec!["alice", "hand"]);
}

/// Each yamux protocol violation of issue 7 item 9, written by hand on its own connection:
/// the hub answers with GoAway code 1 (protocol error) and ends that session, while a client
/// connected all along keeps working and the hub's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yamux_protocol_violations_get_go_away_1_and_end_only_that_session() {
    use raw::yamux::{DATA, PING, SYN, WINDOW_UPDATE};
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let (_s, alice) = alice_joins(addr, 1).await;
    let before = rss_kib(&hub.proc);
    let over_window = (256 << 10) + 1;
    let mut first_frame_too_big = raw::yamux_header(DATA, SYN, 1, over_window).to_vec();
    first_frame_too_big.resize(12 + over_window as usize, 0xee);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // The hub is the server: client streams are odd, so 2 has the hub's own parity.
        (
            "SYN with the hub's parity",
            raw::yamux_header(WINDOW_UPDATE, SYN, 2, 0).to_vec(),
        ),
        (
            "duplicate SYN",
            [
                raw::yamux_header(WINDOW_UPDATE, SYN, 1, 0),
                raw::yamux_header(WINDOW_UPDATE, SYN, 1, 0),
            ]
            .concat(),
        ),
        (
            "Data|SYN on stream 0",
            [&raw::yamux_header(DATA, SYN, 0, 4)[..], b"abcd"].concat(),
        ),
        ("a first frame over 256 KiB", first_frame_too_big),
        (
            "window overflow",
            [
                raw::yamux_header(WINDOW_UPDATE, SYN, 1, 0),
                raw::yamux_header(WINDOW_UPDATE, 0, 1, u32::MAX),
            ]
            .concat(),
        ),
        (
            "a ping on stream 1",
            raw::yamux_header(PING, SYN, 1, 7).to_vec(),
        ),
        ("frame type 4", raw::yamux_header(4, 0, 0, 0).to_vec()),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let mut tcp = raw::tcp_from(raw::source(10 + i), addr).await;
        // The hub may hang up before it has read everything.
        let _ = tcp.write_all(&bytes).await;
        let code = within(WAIT_S, what, raw::go_away_then_eof(&mut tcp)).await;
        assert_eq!(code, Some(1), "{what}: GoAway code");
        assert_eq!(listed(&alice).await, vec!["alice"], "after {what}");
    }
    let after = rss_kib(&hub.proc);
    assert!(
        after.saturating_sub(before) < 16 << 10,
        "hub RSS grew from {before} to {after} KiB"
    );
}

/// Sends a ping with `opaque` and reads frames until its answer; returns how many stream
/// resets came meanwhile. Panics if the session ends first.
async fn ping_through(tcp: &mut tokio::net::TcpStream, opaque: u32) -> usize {
    use raw::yamux::{ACK, PING, RST, SYN};
    tcp.write_all(&raw::yamux_header(PING, SYN, 0, opaque))
        .await
        .expect("ping");
    let mut resets = 0;
    loop {
        let f = raw::read_yamux_frame(tcp)
            .await
            .expect("the session ended before answering the ping");
        assert_ne!(f.ty, raw::yamux::GO_AWAY, "GoAway: {f:?}");
        if f.flags & RST != 0 {
            resets += 1;
        }
        if f.ty == PING && f.flags & ACK != 0 && f.len == opaque {
            return resets;
        }
    }
}

/// What issue 7 item 9 saw end the session on the old engine but the yamux specification
/// allows: an unsolicited ping answer is ignored, and streams beyond the hub's stream table
/// are refused one by one with RST while the session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_pong_and_the_stream_limit_leave_the_session_serving() {
    use raw::yamux::{ACK, PING, SYN, WINDOW_UPDATE};
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let (_s, alice) = alice_joins(addr, 1).await;
    let before = rss_kib(&hub.proc);
    let mut tcp = raw::tcp_from(raw::source(2), addr).await;
    tcp.write_all(&raw::yamux_header(PING, ACK, 0, 0x1234))
        .await
        .unwrap();
    within(WAIT_S, "ping after a pong", ping_through(&mut tcp, 1)).await;
    // 400 streams opened at once: the hub's stream table (a few dozen with its 8 channels)
    // keeps some, and refuses the rest, each on its own.
    const OPENED: u32 = 400;
    let mut syns = Vec::new();
    for k in 0..OPENED {
        syns.extend_from_slice(&raw::yamux_header(WINDOW_UPDATE, SYN, 2 * k + 1, 0));
    }
    tcp.write_all(&syns).await.unwrap();
    let resets = within(WAIT_S, "ping after the SYNs", ping_through(&mut tcp, 2)).await;
    eprintln!("{resets} of {OPENED} streams reset");
    assert!(resets >= 320, "{resets} of {OPENED} streams reset");
    assert!(resets < OPENED as usize, "every stream reset");
    assert_eq!(listed(&alice).await, vec!["alice"]);
    let after = rss_kib(&hub.proc);
    assert!(
        after.saturating_sub(before) < 16 << 10,
        "hub RSS grew from {before} to {after} KiB"
    );
}

/// One-byte data frames cost the hub about their byte, not a heap block each: 200,000 of them
/// (within the 256 KiB window) carry the body of one rpc frame on the peer channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_byte_frames_costs_the_hub_about_a_byte_each() {
    use raw::yamux::{DATA, SYN};
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let (_s, alice) = alice_joins(addr, 1).await;
    let mut tcp = raw::tcp_from(raw::source(2), addr).await;
    send_hello_on_stream_1(&mut tcp).await;
    // Wait for the hub's answer: the handshake reply `01 00` and the hello answer `00 ..`.
    within(WAIT_S, "the hello answer", async {
        let mut got = Vec::new();
        while got.len() < 5 {
            let f = raw::read_yamux_frame(&mut tcp).await.expect("hello answer");
            if f.ty == DATA && f.stream == 1 {
                got.extend_from_slice(&f.body);
            }
        }
        assert_eq!(&got[..3], &[1, 0, 0], "handshake reply and hello status");
    })
    .await;
    // The hub opens its end of the peer link (it listens on ours by then).
    within(
        WAIT_S,
        "the hub's peer dial",
        raw::accept_hub_peer_dial(&mut tcp),
    )
    .await;
    // Stream 3: the peer channel, the rpc preamble and the length prefix of a 250,000-byte
    // frame.
    const FRAMES: usize = 200_000;
    let mut hub_channel = vec![1u8, netchan_rpc::PEER_CHANNEL.len() as u8];
    hub_channel.extend_from_slice(netchan_rpc::PEER_CHANNEL.as_bytes());
    hub_channel.extend_from_slice(&raw::RPC_PREAMBLE);
    hub_channel.extend_from_slice(&raw::rpc_prefix(250_000));
    tcp.write_all(&raw::yamux_header(DATA, SYN, 3, hub_channel.len() as u32))
        .await
        .unwrap();
    tcp.write_all(&hub_channel).await.unwrap();
    within(WAIT_S, "ping", ping_through(&mut tcp, 1)).await;
    let before = rss_kib(&hub.proc);
    let mut flood = Vec::with_capacity(FRAMES * 13);
    for _ in 0..FRAMES {
        flood.extend_from_slice(&raw::yamux_header(DATA, 0, 3, 1));
        flood.push(0x55);
    }
    tcp.write_all(&flood).await.unwrap();
    // The ping is answered after the hub has taken in every frame before it.
    let resets = within(WAIT_S, "ping after the flood", ping_through(&mut tcp, 2)).await;
    let after = rss_kib(&hub.proc);
    eprintln!("hub RSS {before} -> {after} KiB after {FRAMES} one-byte frames, {resets} resets");
    assert_eq!(resets, 0, "the hub reset the peer channel");
    // About 64 B of heap per frame would be 12.5 MiB; the bytes themselves are 195 KiB.
    assert!(
        after.saturating_sub(before) < 4 << 10,
        "hub RSS grew from {before} to {after} KiB"
    );
    assert_eq!(listed(&alice).await, vec!["alice"]);
}

/// A peer that answers the hub's round-trip probe late makes every drained window look
/// quick, so the hub doubles the channel's window; the growth stops at the mux's per-stream
/// maximum (16 MiB) and the session's growth budget, and the hub's memory stays bounded.
/// The late answer is the behaviour under test, so this test holds the pong for 500 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_pong_grows_a_window_no_further_than_the_mux_bound() {
    use raw::yamux::{ACK, DATA, PING, SYN, WINDOW_UPDATE};
    let hub = start_hub(&[]);
    let addr = addr_of(&hub);
    let (_s, alice) = alice_joins(addr, 1).await;
    let mut tcp = raw::tcp_from(raw::source(2), addr).await;
    send_hello_on_stream_1(&mut tcp).await;
    // The hub opens its end of the peer link once the hello is done.
    within(
        WAIT_S,
        "the hub's peer dial",
        raw::accept_hub_peer_dial(&mut tcp),
    )
    .await;
    // Stream 3: the peer channel; then 12 Hub.publish requests with 3,000,000-byte names
    // (each gets an error answer; the channel carries on): 36 MB, more than the 16 MiB bound.
    let mut bytes = vec![1u8, netchan_rpc::PEER_CHANNEL.len() as u8];
    bytes.extend_from_slice(netchan_rpc::PEER_CHANNEL.as_bytes());
    bytes.extend_from_slice(&raw::RPC_PREAMBLE);
    for id in 1..=12 {
        let mut name = Vec::new();
        raw::string(&vec![b'a'; 3_000_000], &mut name);
        bytes.extend_from_slice(&raw::request_frame(id, "Hub.publish", &name));
    }
    let before = rss_kib(&hub.proc);
    const INITIAL: i64 = 256 << 10;
    let mut credit = INITIAL;
    let mut max_credit = credit;
    let mut sent = 0usize;
    let mut probe_answered = false;
    within(WAIT_S, "the transfer", async {
        while sent < bytes.len() {
            if credit > 0 {
                let n = (credit as usize).min(64 << 10).min(bytes.len() - sent);
                let flags = if sent == 0 { SYN } else { 0 };
                tcp.write_all(&raw::yamux_header(DATA, flags, 3, n as u32))
                    .await
                    .unwrap();
                tcp.write_all(&bytes[sent..sent + n]).await.unwrap();
                sent += n;
                credit -= n as i64;
                continue;
            }
            let f = raw::read_yamux_frame(&mut tcp)
                .await
                .expect("the hub ended");
            assert_ne!(f.ty, raw::yamux::GO_AWAY, "{f:?}");
            if f.ty == WINDOW_UPDATE && f.stream == 3 {
                credit += i64::from(f.len);
                max_credit = max_credit.max(credit);
            }
            if f.ty == PING && f.flags & SYN != 0 && !probe_answered {
                // The hub's round-trip probe: answer it late.
                tokio::time::sleep(Duration::from_millis(500)).await;
                tcp.write_all(&raw::yamux_header(PING, ACK, 0, f.len))
                    .await
                    .unwrap();
                probe_answered = true;
            }
        }
    })
    .await;
    within(WAIT_S, "ping after the transfer", ping_through(&mut tcp, 1)).await;
    let after = rss_kib(&hub.proc);
    eprintln!(
        "largest window granted: {} KiB (probe answered late: {probe_answered}); \
         hub RSS {before} -> {after} KiB",
        max_credit >> 10
    );
    assert!(max_credit <= 16 << 20, "window {max_credit} over 16 MiB");
    assert!(
        after.saturating_sub(before) < 64 << 10,
        "hub RSS grew from {before} to {after} KiB"
    );
    assert_eq!(listed(&alice).await, vec!["alice"]);
}
