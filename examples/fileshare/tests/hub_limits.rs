//! The hub's bounds, measured on a real `share hub` process with hand-written clients:
//! memory per idle client, and hostile frames at the rpc and yamux layers.

#[path = "../src/auth.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod auth;
mod common;
#[path = "../src/export.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod export;
#[path = "../src/proto.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod proto;
#[path = "common/raw.rs"]
mod raw;

use std::net::SocketAddr;

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
    // 16 connections (from 16 addresses), 6 hub channels each, each channel: the preamble, a
    // length prefix of 16 MiB and one byte. No token, no publish.
    let mut sessions = Vec::new();
    let mut channels = Vec::new();
    for i in 0..16 {
        let session = within(WAIT_S, "hello", async {
            raw::hello(raw::tcp_from(raw::source(i), addr).await).await
        })
        .await;
        for _ in 0..6 {
            let mut ch = within(WAIT_S, "hub channel", raw::raw_hub_channel(&session)).await;
            let mut claim = raw::rpc_prefix(16 << 20).to_vec();
            claim.push(0);
            // The hub may have hung up already: it refuses the prefix on sight.
            let _ = ch.write_all(&claim).await;
            let _ = ch.flush().await;
            channels.push(ch);
        }
        sessions.push(session);
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
    let (_s, alice) = within(
        WAIT_S,
        "alice joins",
        raw::join(addr, raw::source(100), "alice".into()),
    )
    .await;
    assert_eq!(
        within(WAIT_S, "list", alice.list(ListReq {}))
            .await
            .unwrap(),
        vec!["alice"]
    );
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
    let (_s, alice) = within(
        WAIT_S,
        "alice joins",
        raw::join(addr, raw::source(2), "alice".into()),
    )
    .await;
    assert_eq!(
        within(WAIT_S, "list", alice.list(ListReq {}))
            .await
            .unwrap(),
        vec!["alice"]
    );
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
    let mut ch = within(WAIT_S, "hub channel", raw::raw_hub_channel(&session)).await;
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
    let (_s, alice) = within(
        WAIT_S,
        "alice joins",
        raw::join(addr, raw::source(2), "alice".into()),
    )
    .await;
    assert_eq!(
        within(WAIT_S, "list", alice.list(ListReq {}))
            .await
            .unwrap(),
        vec!["alice", "hand"]
    );
}
