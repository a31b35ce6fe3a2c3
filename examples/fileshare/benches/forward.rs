//! A `get` through the hub against a raw TCP copy of the same file over the same link:
//! `cargo bench -p fileshare --bench forward -- [--mib 64] [--runs 5]`.
//!
//! A real `share hub` and a real `share --serve` exporter; the reader is in-process (the
//! hand-written client of tests/common/raw.rs) and checks every byte. Two links between the
//! exporter and the hub: loopback, and a 50 ms round trip built with the delay-line proxy of
//! `netchan_testkit::proxy` (25 ms each way, no rate limit, 4 MiB in flight per direction).
//! The raw copy sends the file over one TCP connection: direct on loopback, through an
//! identical proxy for the 50 ms link. Prints the
//! median of `--runs` runs of each, and the ratio raw time / hub time.

#[path = "../src/auth.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod auth;
#[path = "../src/export.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod export;
#[path = "../src/proto.rs"]
#[allow(dead_code, unused_imports, unreachable_pub, missing_docs)]
mod proto;
#[path = "../tests/common/raw.rs"]
mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use netchan_testkit::proxy::{Link, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::{HubClient, PeerRead};

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn share() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_share"));
    cmd.env_remove("SHARE_TOKEN")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn");
    cmd
}

fn start_hub() -> (Proc, SocketAddr) {
    let mut child = share()
        .args(["hub", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start share hub");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the hub's first line");
    let addr = line
        .trim()
        .strip_prefix("hub listening on ")
        .unwrap_or_else(|| panic!("unexpected hub output {line:?}"))
        .parse()
        .expect("hub address");
    (Proc(child), addr)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads `big.bin` of `peer` through the hub and checks it against `data`; returns the time.
async fn get(hub: &HubClient, peer: &str, data: &[u8]) -> Duration {
    let start = Instant::now();
    let req = PeerRead {
        peer: peer.into(),
        path: "big.bin".into(),
        offset: 0,
    };
    let mut stream = hub.read(req).await.expect("read");
    let mut pos = 0usize;
    // Bounded by the file's size: the last chunk says eof.
    while let Some(item) = stream.next().await {
        let chunk = item.expect("a chunk");
        assert_eq!(chunk.offset as usize, pos);
        assert!(
            chunk.data[..] == data[pos..pos + chunk.data.len()],
            "bytes differ"
        );
        pos += chunk.data.len();
        if chunk.eof {
            break;
        }
    }
    assert_eq!(pos, data.len(), "the whole file");
    start.elapsed()
}

/// Copies `data` over one TCP connection, direct or through a proxy with `link`; returns the
/// time from
/// the first byte written to the last byte read.
async fn raw_copy(data: &'static [u8], link: Option<Link>) -> Duration {
    let (mut client, mut server, _proxy) = match link {
        Some(link) => {
            let (c, s, p) = Proxy::pair(link).await.expect("proxy pair");
            (c, s, Some(p))
        }
        None => {
            let (c, s) = netchan_testkit::tcp_pair().await;
            (c, s, None)
        }
    };
    let start = Instant::now();
    let send = tokio::spawn(async move {
        client.write_all(data).await.expect("send");
        client.shutdown().await.expect("shutdown");
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    // Bounded by the data's length (the sender shuts down after it).
    loop {
        let n = server.read(&mut buf).await.expect("receive");
        if n == 0 {
            break;
        }
        got += n;
    }
    send.await.expect("sender");
    assert_eq!(got, data.len());
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib = arg("--mib", 64) as usize;
    let runs = arg("--runs", 5) as usize;
    let data: &'static [u8] = Box::leak(
        (0..mib << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    let dir = std::env::temp_dir().join(format!("share-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("big.bin"), data).expect("write the file");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_hub, hub_addr) = start_hub();
    rt.block_on(async {
        let far_link = Link::delayed(Duration::from_millis(25));
        let proxy = Proxy::start(hub_addr, far_link).await.expect("proxy");
        let exporter = |name: &str, addr: SocketAddr| {
            Proc(
                share()
                    .args(["--serve", "--name", name, "--root"])
                    .arg(&dir)
                    .arg(addr.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start an exporter"),
            )
        };
        let _near = exporter("near", hub_addr);
        let _far = exporter("far", proxy.addr());
        let (_session, hub) = raw::join(hub_addr, raw::source(1), "reader".into()).await;
        let t0 = Instant::now();
        // Bounded by 60 s.
        loop {
            let names = hub.list(proto::ListReq {}).await.expect("list");
            if names.iter().any(|n| n == "near") && names.iter().any(|n| n == "far") {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "exporters missing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (label, peer, link) in [
            ("loopback", "near", None),
            ("50 ms RTT", "far", Some(far_link)),
        ] {
            let mut hub_times = Vec::new();
            let mut raw_times = Vec::new();
            for _ in 0..runs {
                hub_times.push(get(&hub, peer, data).await);
                raw_times.push(raw_copy(data, link).await);
            }
            let (h, r) = (median(hub_times), median(raw_times));
            let rate = |d: Duration| mib as f64 / d.as_secs_f64();
            println!(
                "{label}: get of {mib} MiB through the hub {:.3} s ({:.1} MiB/s); raw TCP {:.3} s \
                 ({:.1} MiB/s); hub/raw throughput {:.2} (median of {runs})",
                h.as_secs_f64(),
                rate(h),
                r.as_secs_f64(),
                rate(r),
                r.as_secs_f64() / h.as_secs_f64()
            );
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
