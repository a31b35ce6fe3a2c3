//! The hub's memory under clients that ask for big listings and stop reading:
//! `cargo bench -p fileshare --bench listings -- [--clients 4] [--calls 64] [--rounds 3]`.
//!
//! Starts a real `share hub` and an exporter "bob" whose root holds 10,000 files with
//! 200-byte names (an `ls` reply of about 2.2 MB, the largest kind). Each round, `--clients`
//! hostile clients join, stop reading their socket, and send `--calls` `ls bob` calls each;
//! after 5 s they leave. Prints the hub's RSS before, at its peak while they sit there, and
//! once they are gone, per round, with what the documented bound allows: 8 MiB of replies
//! per client (the rpc outbound budget) plus the mux and socket buffers. Run several rounds:
//! RSS after a round that stays flat from round to round is memory the allocator keeps for
//! reuse, not a leak.

#[path = "../src/auth.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod auth;
#[path = "../src/export/mod.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod export;
#[path = "../src/proto.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod proto;
#[path = "../tests/common/raw.rs"]
mod raw;
mod support;

use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proto::{ListReq, PeerPath, PublishReq};
use support::{share, status_kib, Proc};

/// Bound on any single step (a connect, a join, a departure).
const STEP: Duration = Duration::from_secs(60);

/// A TCP connection that can stop reading: once `deaf` is set, reads never complete (the
/// hub's bytes pile up in its buffers), while writes still go out.
struct Deaf<T> {
    io: T,
    deaf: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Deaf<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.deaf.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deaf<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let clients = arg("--clients", 4);
    let calls = arg("--calls", 64);
    let rounds = arg("--rounds", 3);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("bob");
    std::fs::create_dir(&root).expect("bob's root");
    for i in 0..export::MAX_LIST_ENTRIES {
        let name = format!("{i:05}-{}", "n".repeat(194));
        std::fs::File::create(root.join(name)).expect("a file");
    }
    let mut hub = share()
        .args(["hub", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start share hub");
    let mut line = String::new();
    BufReader::new(hub.stdout.take().expect("hub stdout"))
        .read_line(&mut line)
        .expect("the hub's first line");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("hub listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected hub output {line:?}"));
    let hub = Proc(hub);
    let pid = hub.0.id();
    let mut bob = share()
        .args(["--name", "bob", "--root"])
        .arg(&root)
        .args(["--serve", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bob");
    // Read bob's log until it is in, then keep draining it (its access log goes there).
    let (joined_tx, joined) = std::sync::mpsc::channel();
    let log = BufReader::new(bob.stderr.take().expect("bob stderr"));
    std::thread::spawn(move || {
        for line in log.lines().map_while(Result::ok) {
            if line.contains("connected to the hub") {
                let _ = joined_tx.send(());
            }
        }
    });
    let _bob = Proc(bob);
    joined.recv_timeout(STEP).expect("bob joins");
    rt.block_on(async {
        let (_watch_session, watcher) =
            tokio::time::timeout(STEP, raw::join(addr, raw::source(0), "watcher".into()))
                .await
                .expect("the watcher joins");
        let listed = || async {
            tokio::time::timeout(STEP, watcher.list(ListReq {}))
                .await
                .expect("list in time")
                .expect("list")
        };
        // Warm up: one full listing through the hub.
        let full = tokio::time::timeout(
            STEP,
            watcher.ls(PeerPath {
                peer: "bob".into(),
                path: String::new(),
            }),
        )
        .await
        .expect("ls in time")
        .expect("ls");
        println!(
            "bob's listing: {} entries; {clients} clients x {calls} ls calls, not reading",
            full.entries.len()
        );
        println!(
            "bound: 8 MiB of replies per client = {} MiB for {clients}",
            8 * clients
        );
        for round in 1..=rounds {
            let before = status_kib(pid, "VmRSS");
            let mut sessions = Vec::new();
            let mut calls_in_flight = tokio::task::JoinSet::new();
            for c in 0..clients {
                let deaf = Arc::new(AtomicBool::new(false));
                let tcp = raw::tcp_from(raw::source(1 + c), addr).await;
                let session = tokio::time::timeout(
                    STEP,
                    raw::hello(Deaf {
                        io: tcp,
                        deaf: deaf.clone(),
                    }),
                )
                .await
                .expect("hello in time");
                raw::serve_no_files(&session);
                let hub = raw::peer_link(&session, raw::no_files_server()).await;
                hub.publish(PublishReq {
                    name: format!("greedy{c}"),
                })
                .await
                .expect("publish");
                deaf.store(true, Ordering::SeqCst);
                for _ in 0..calls {
                    let hub = hub.clone();
                    calls_in_flight.spawn(async move {
                        let _ = hub
                            .ls(PeerPath {
                                peer: "bob".into(),
                                path: String::new(),
                            })
                            .await;
                    });
                }
                sessions.push(session);
            }
            let mut peak = 0;
            // 5 s of sampling, 50 ms apart.
            for _ in 0..100 {
                peak = peak.max(status_kib(pid, "VmRSS"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            calls_in_flight.abort_all();
            drop(sessions);
            // Bounded: the hub drops each departed client at once (end of stream).
            tokio::time::timeout(STEP, async {
                while listed().await.len() > 2 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("the greedy clients leave");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = status_kib(pid, "VmRSS");
            println!(
                "round {round}: hub RSS before {:.1} MiB, peak {:.1} MiB (+{:.1} MiB, {:.1} per \
                 client), after they left {:.1} MiB (+{:.1} MiB)",
                before as f64 / 1024.0,
                peak as f64 / 1024.0,
                peak.saturating_sub(before) as f64 / 1024.0,
                peak.saturating_sub(before) as f64 / 1024.0 / clients as f64,
                after as f64 / 1024.0,
                after.saturating_sub(before) as f64 / 1024.0,
            );
        }
    });
}
