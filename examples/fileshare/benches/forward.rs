//! A `get` through the hub against a raw TCP copy of the same file over the same link:
//! `cargo bench -p fileshare --bench forward -- [--mib 1024] [--wan-mib 256] [--runs 3]
//! [--concurrent 8] [--concurrent-mib 256] [--loopback-only]`.
//!
//! A real `share hub` and real `share --serve` exporters; the reader of the first two parts is
//! in-process (the hand-written client of tests/common/raw.rs) and checks every byte.
//! 1. Loopback: a get of `--mib` MiB through the hub against a raw TCP copy of the same bytes,
//!    and the CPU time (user + system, from /proc) per GiB of the hub and of the exporter.
//!    For reference, the same file through a plain TCP relay with blocking threads and no
//!    framing (the floor of a store-and-forward design on this machine): once with the
//!    copies a get makes, once zero-copy (`sendfile` at the source, `splice` at the relay).
//! 2. The exporter 50 ms away at 1 Gbit/s (`Link::wan` of `netchan_testkit::proxy`, the
//!    bandwidth-delay product in flight per direction), a get of `--wan-mib` MiB against a
//!    raw TCP copy through an identical proxy.
//! 3. `--concurrent` readers (one connection each) getting `--concurrent-mib` MiB at once
//!    from the loopback exporter: the hub's and the exporter's CPU time per GiB forwarded and
//!    the hub's largest resident set size during the run.
//! 4. The real `share` client in scripted mode (commands on stdin): `get -f near big.bin
//!    FILE` (into a file) against `get near big.bin -` (to stdout, into /dev/null), whole
//!    process wall time, and the client's CPU time per GiB.
//!
//! Prints the median of `--runs` runs of each, and the ratio raw time / hub time. The
//! exporter's CPU is also printed run by run: it hashes a file on its first read and keeps the
//! digest for later reads of the same version (if the file was not changed in the two seconds
//! before that read), so the first run shows the cost with hashing and the others without.

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

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use netchan_testkit::proxy::{Link, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::{HubClient, PeerRead};
use support::{cpu_time, share, status_kib, Proc};

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
async fn get(hub: &HubClient, peer: &str, path: &str, data: &[u8]) -> Duration {
    let start = Instant::now();
    let req = PeerRead {
        peer: peer.into(),
        path: path.into(),
        offset: 0,
    };
    // The window `share` gives a read on a LAN.
    let mut stream = hub
        .with_options(netchan_rpc::CallOptions::default().stream_window(proto::READ_WINDOW_MIN))
        .read(req)
        .await
        .expect("read");
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

/// How the plain relay of [`relay_copy`] moves the bytes.
#[derive(Clone, Copy, Debug)]
enum Relay {
    /// The source reads the file with positioned reads and writes them; the relay reads and
    /// writes: the copies a forwarded get makes, with no framing and no runtime.
    Copy,
    /// The source `sendfile`s the file and the relay `splice`s socket to socket through a
    /// pipe: no copy through user memory at either, the floor of a zero-copy design.
    Splice,
}

/// The same bytes as a get, through a plain TCP relay: a source thread sends the file `path`
/// to a relay thread, which passes it on to a reader on this runtime that checks every byte
/// against `data` as [`get`] does. Blocking sockets and 256 KiB pieces: the kernel's share of
/// a forwarded get, measured in the same run. Returns the time from the first byte sent to
/// the last one checked.
async fn relay_copy(path: &Path, data: &'static [u8], how: Relay) -> Duration {
    const PIECE: usize = 256 << 10;
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the reader");
    let sink_addr = sink.local_addr().expect("reader address");
    let relay = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let relay_addr = relay.local_addr().expect("relay address");
    let file = std::fs::File::open(path).expect("open the file");
    let start = Instant::now();
    let relay = std::thread::spawn(move || {
        let (mut from, _) = relay.accept().expect("the source");
        let mut to = std::net::TcpStream::connect(sink_addr).expect("the reader");
        match how {
            Relay::Copy => {
                use std::io::Read as _;
                let mut buf = vec![0u8; PIECE];
                // Bounded by the stream: ends when the source shuts down.
                loop {
                    let n = from.read(&mut buf).expect("relay in");
                    if n == 0 {
                        break;
                    }
                    to.write_all(&buf[..n]).expect("relay out");
                }
            }
            Relay::Splice => {
                use rustix::pipe::{fcntl_setpipe_size, pipe, splice, SpliceFlags};
                let (pr, pw) = pipe().expect("pipe");
                let _ = fcntl_setpipe_size(&pw, PIECE);
                // Bounded by the stream: ends when the source shuts down.
                loop {
                    let n = splice(&from, None, &pw, None, PIECE, SpliceFlags::MOVE)
                        .expect("splice in");
                    if n == 0 {
                        break;
                    }
                    let mut left = n;
                    // Bounded by `n`: each call moves some bytes or fails.
                    while left > 0 {
                        left -= splice(&pr, None, &to, None, left, SpliceFlags::MOVE)
                            .expect("splice out");
                    }
                }
            }
        }
        to.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let source = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt as _;
        let mut to = std::net::TcpStream::connect(relay_addr).expect("the relay");
        let len = file.metadata().expect("size").len();
        let mut at = 0u64;
        let mut buf = vec![0u8; PIECE];
        // Bounded by the file's length: each round sends at least one byte or fails.
        while at < len {
            let n = match how {
                Relay::Copy => {
                    let n = file.read_at(&mut buf, at).expect("read");
                    to.write_all(&buf[..n]).expect("send");
                    n
                }
                Relay::Splice => {
                    let mut off = at;
                    let want = (len - at).min(PIECE as u64) as usize;
                    rustix::fs::sendfile(&to, &file, Some(&mut off), want).expect("sendfile")
                }
            };
            assert!(n > 0, "the file shrank");
            at += n as u64;
        }
        to.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    // Bounded in time: a thread that failed leaves the reader waiting.
    let pos = tokio::time::timeout(Duration::from_secs(120), async {
        let (mut reader, _) = sink.accept().await.expect("the relay");
        let mut buf = vec![0u8; PIECE];
        let mut pos = 0usize;
        // Bounded by the data's length (the relay shuts down after it).
        loop {
            let n = reader.read(&mut buf).await.expect("receive");
            if n == 0 {
                break;
            }
            assert!(buf[..n] == data[pos..pos + n], "bytes differ");
            pos += n;
        }
        pos
    })
    .await
    .expect("the relay's copy ended within 120 s");
    let took = start.elapsed();
    source.join().expect("source");
    relay.join().expect("relay");
    assert_eq!(pos, data.len(), "the whole file");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `share` as a client of `hub` in scripted mode with `script` on stdin, its stdout into
/// /dev/null; returns the wall time of the whole process and its CPU time. Panics unless it
/// exits 0.
fn scripted(hub: SocketAddr, root: &Path, name: &str, script: &str) -> (Duration, Duration) {
    let start = Instant::now();
    let mut child = share()
        .args(["--name", name, "--root"])
        .arg(root)
        .arg(hub.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a scripted client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write the script");
    // The CPU time is read from /proc once the process has exited but before it is reaped
    // (a zombie keeps its times). Bounded by the client's own time limits.
    let pid = child.id();
    let mut cpu = Duration::ZERO;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if matches!(state, Some("Z" | "X") | None) {
            cpu = cpu.max(cpu_time(pid));
            break;
        }
        cpu = cpu_time(pid);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("scripted client");
    assert!(
        out.status.success(),
        "scripted client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (start.elapsed(), cpu)
}

/// CPU seconds per GiB of `bytes`.
fn per_gib(cpu: Duration, bytes: usize) -> f64 {
    cpu.as_secs_f64() / (bytes as f64 / f64::from(1u32 << 30))
}

/// Values with two decimals, separated by spaces.
fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let mib = arg("--mib", 1024) as usize;
    let wan_mib = arg("--wan-mib", 256) as usize;
    let runs = arg("--runs", 3) as usize;
    let concurrent = arg("--concurrent", 8) as usize;
    let concurrent_mib = arg("--concurrent-mib", 256) as usize;
    let loopback_only = std::env::args().any(|a| a == "--loopback-only");
    let pattern = |len: usize| -> &'static [u8] {
        Box::leak(
            (0..len)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>()
                .into_boxed_slice(),
        )
    };
    // One pattern, prefixes of it for the smaller files.
    let data = pattern(mib.max(wan_mib).max(concurrent_mib) << 20);
    let dir = std::env::temp_dir().join(format!("share-forward-{}", std::process::id()));
    let downloads = dir.join("downloads");
    std::fs::create_dir_all(&downloads).expect("temp dir");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("temp dir");
    for (name, len) in [
        ("big.bin", mib),
        ("wan.bin", wan_mib),
        ("each.bin", concurrent_mib),
    ] {
        std::fs::write(root.join(name), &data[..len << 20]).expect("write a file");
    }
    // The exporter keeps a file's digest only for a version changed at least two seconds
    // before the read (see export/digests.rs): the gets start after that, so the first get of
    // each file hashes it and the later ones show forwarding alone.
    let settled = Instant::now() + Duration::from_millis(2500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (hub_proc, hub_addr) = start_hub();
    let hub_pid = hub_proc.0.id();
    let far_link = Link::wan(Duration::from_millis(50), 1_000_000_000);
    rt.block_on(async {
        let proxy = Proxy::start(hub_addr, far_link).await.expect("proxy");
        let exporter = |name: &str, addr: SocketAddr| {
            Proc(
                share()
                    .args(["--serve", "--name", name, "--root"])
                    .arg(&root)
                    .arg(addr.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start an exporter"),
            )
        };
        let near = exporter("near", hub_addr);
        let far = exporter("far", proxy.addr());
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
        tokio::time::sleep_until(settled.into()).await;
        for (label, peer, path, size, link, exporter_pid) in [
            ("loopback", "near", "big.bin", mib, None, near.0.id()),
            (
                "50 ms RTT, 1 Gbit/s",
                "far",
                "wan.bin",
                wan_mib,
                Some(far_link),
                far.0.id(),
            ),
        ]
        .into_iter()
        .take(if loopback_only { 1 } else { 2 })
        {
            let bytes = &data[..size << 20];
            let mut hub_times = Vec::new();
            let mut raw_times = Vec::new();
            let mut ratios = Vec::new();
            let mut hub_cpu = Vec::new();
            let mut exporter_cpu = Vec::new();
            let mut reader_cpu = Vec::new();
            let me = std::process::id();
            // Per plain relay (copy, splice): its time over the hub's, raw TCP's over its.
            let mut relay_ratios = [Vec::new(), Vec::new()];
            let mut relay_raw = [Vec::new(), Vec::new()];
            for _ in 0..runs {
                let (hub0, exp0, me0) = (cpu_time(hub_pid), cpu_time(exporter_pid), cpu_time(me));
                let h = get(&hub, peer, path, bytes).await;
                hub_cpu.push(per_gib(cpu_time(hub_pid) - hub0, bytes.len()));
                exporter_cpu.push(per_gib(cpu_time(exporter_pid) - exp0, bytes.len()));
                reader_cpu.push(per_gib(cpu_time(me) - me0, bytes.len()));
                let r = raw_copy(bytes, link).await;
                ratios.push(r.as_secs_f64() / h.as_secs_f64());
                hub_times.push(h);
                raw_times.push(r);
                if link.is_none() {
                    for (i, how) in [Relay::Copy, Relay::Splice].into_iter().enumerate() {
                        let t = relay_copy(&root.join(path), bytes, how).await;
                        relay_ratios[i].push(t.as_secs_f64() / h.as_secs_f64());
                        relay_raw[i].push(r.as_secs_f64() / t.as_secs_f64());
                    }
                }
            }
            let (h, r) = (median(hub_times), median(raw_times));
            let rate = |d: Duration| size as f64 / d.as_secs_f64();
            println!(
                "{label}: get of {size} MiB through the hub {:.3} s ({:.1} MiB/s); raw TCP {:.3} s \
                 ({:.1} MiB/s); hub/raw throughput {:.2} (median of {runs} per-run ratios)",
                h.as_secs_f64(),
                rate(h),
                r.as_secs_f64(),
                rate(r),
                median_f(ratios)
            );
            println!(
                "{label}: CPU per GiB: hub {:.2} core-s; exporter {:.2} core-s (runs in order: {}); \
                 reader (this process) {:.2} core-s",
                median_f(hub_cpu),
                median_f(exporter_cpu.clone()),
                list(&exporter_cpu),
                median_f(reader_cpu)
            );
            if link.is_none() {
                let [copy, splice] = relay_ratios.map(median_f);
                let [copy_raw, splice_raw] = relay_raw.map(median_f);
                println!(
                    "{label}: the same file through a plain TCP relay (no framing, blocking \
                     threads): with copies {copy_raw:.2}x raw TCP, the hub {copy:.2}x of it; \
                     zero-copy (sendfile, splice) {splice_raw:.2}x raw TCP, the hub {splice:.2}x \
                     of it (medians of {runs} per-run ratios)"
                );
            }
        }
        if loopback_only {
            return;
        }
        let mut readers = Vec::new();
        for i in 0..concurrent {
            readers.push(raw::join(hub_addr, raw::source(2 + i), format!("reader{i}")).await);
        }
        let bytes = &data[..concurrent_mib << 20];
        let mut cpu = Vec::new();
        let mut exporter_cpu = Vec::new();
        let mut peak = Vec::new();
        let mut took = Vec::new();
        for _ in 0..runs {
            let done = Arc::new(AtomicBool::new(false));
            let sampler = {
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut max = 0;
                    // Bounded by the run: `done` is set when every get has finished.
                    while !done.load(Ordering::Relaxed) {
                        max = max.max(status_kib(hub_pid, "VmRSS") * 1024);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    max
                })
            };
            let before = cpu_time(hub_pid);
            let exporter_before = cpu_time(near.0.id());
            let start = Instant::now();
            futures::future::join_all(
                readers
                    .iter()
                    .map(|(_, reader)| get(reader, "near", "each.bin", bytes)),
            )
            .await;
            took.push(start.elapsed());
            let spent = cpu_time(hub_pid) - before;
            let exporter_spent = cpu_time(near.0.id()) - exporter_before;
            done.store(true, Ordering::Relaxed);
            peak.push(sampler.join().expect("rss sampler"));
            let gib = (concurrent * concurrent_mib) as f64 / 1024.0;
            cpu.push(spent.as_secs_f64() / gib);
            exporter_cpu.push(exporter_spent.as_secs_f64() / gib);
        }
        println!(
            "{concurrent} concurrent gets of {concurrent_mib} MiB: {:.3} s; hub CPU {:.3} core-s per \
             GiB forwarded; hub RSS at most {:.1} MiB (median of {runs}); exporter CPU {:.2} \
             core-s per GiB (runs in order: {})",
            median(took).as_secs_f64(),
            median_f(cpu),
            median_f(peak.into_iter().map(|b| b as f64).collect()) / f64::from(1 << 20),
            median_f(exporter_cpu.clone()),
            list(&exporter_cpu)
        );
        // The real client, scripted: into a file against to stdout (blocking this thread only;
        // the proxy runs on the runtime's workers).
        let target = downloads.join("big.bin");
        let mut to_file = Vec::new();
        let mut to_stdout = Vec::new();
        let mut file_cpu = Vec::new();
        let mut stdout_cpu = Vec::new();
        let size = mib << 20;
        for run in 0..runs {
            let name = format!("stdout{run}");
            let (t, c) = scripted(hub_addr, &downloads, &name, "get near big.bin -\n");
            to_stdout.push(t);
            stdout_cpu.push(per_gib(c, size));
            let script = format!("get -f near big.bin {}\n", target.display());
            let name = format!("file{run}");
            let (t, c) = scripted(hub_addr, &downloads, &name, &script);
            to_file.push(t);
            file_cpu.push(per_gib(c, size));
            assert_eq!(
                std::fs::metadata(&target).expect("the copy").len(),
                (mib << 20) as u64
            );
            std::fs::remove_file(&target).expect("remove the copy");
        }
        // What the kernel alone takes to put the same bytes in a new file (256 KiB writes),
        // the floor under the difference between the two.
        let mut plain_write = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let mut f = std::fs::File::create(&target).expect("create");
            for piece in data[..mib << 20].chunks(256 << 10) {
                f.write_all(piece).expect("write");
            }
            drop(f);
            plain_write.push(start.elapsed());
            std::fs::remove_file(&target).expect("remove the copy");
        }
        let (f, o) = (median(to_file), median(to_stdout));
        println!(
            "share scripted, {mib} MiB: get into a file {:.3} s; get - {:.3} s; file/stdout time {:.2}; \
             writing the bytes into a file alone {:.3} s (median of {runs})",
            f.as_secs_f64(),
            o.as_secs_f64(),
            f.as_secs_f64() / o.as_secs_f64(),
            median(plain_write).as_secs_f64()
        );
        println!(
            "share scripted, {mib} MiB: the client's CPU per GiB: get into a file {:.2} core-s; \
             get - {:.2} core-s (median of {runs})",
            median_f(file_cpu),
            median_f(stdout_cpu)
        );
    });
    drop(hub_proc);
    let _ = std::fs::remove_dir_all(&dir);
}
