//! Load generator for the hub: `cargo bench -p fileshare --bench load -- [OPTIONS]`.
//!
//! Starts a real `share hub` process and real `share --serve` exporters (each exporting a
//! directory of generated files of mixed sizes), then:
//!
//! 1. **Load**: `--clients N` in-process readers, each keeping `--calls M` reads in flight for
//!    `--seconds S`, every payload checked byte for byte against the generated file. Prints
//!    calls/s, MiB/s, latency p50/p99, errors (must be 0) and the hub's peak RSS (VmHWM).
//! 2. **Idle soak**: `--idle K` more clients connect and publish, then sit idle for
//!    `--soak S` seconds. Prints how long joining (connect, hello, publish) took each of them
//!    (p50/p99/max), the hub's RSS growth per idle client and its CPU use while they sit there.
//!
//! Options: `--clients 4 --calls 4 --seconds 10 --exporters 4 --idle 1000 --soak 10`, and
//! `--hub-arg ARG` (repeatable) passed on to `share hub`: `--hub-arg --etcd --hub-arg
//! http://127.0.0.1:2379` measures a hub of a fleet, whose publishes are etcd transactions.
//! Exits non-zero if any call failed or any payload differed.

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
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use netchan_mux::Session;

use crate::proto::{HubClient, PeerRead};
use support::{cpu_time, share, status_kib, Proc};

/// Sizes of the generated files, served round-robin (mixed small and large reads).
const SIZES: [usize; 5] = [1024, 64 << 10, 300 << 10, 1 << 20, 4 << 20];

/// Bound on any single step (a connect, one read).
const STEP: Duration = Duration::from_secs(60);

struct Opts {
    clients: usize,
    calls: usize,
    seconds: u64,
    exporters: usize,
    idle: usize,
    soak: u64,
    hub_args: Vec<String>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        clients: 4,
        calls: 4,
        seconds: 10,
        exporters: 4,
        idle: 1000,
        soak: 10,
        hub_args: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    // Bounded: one step per argument.
    while i < args.len() {
        let value = || -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--clients" => o.clients = value() as usize,
            "--calls" => o.calls = value() as usize,
            "--seconds" => o.seconds = value(),
            "--exporters" => o.exporters = value() as usize,
            "--idle" => o.idle = value() as usize,
            "--soak" => o.soak = value(),
            "--hub-arg" => o.hub_args.push(
                args.get(i + 1)
                    .unwrap_or_else(|| panic!("--hub-arg needs a value"))
                    .clone(),
            ),
            // cargo bench passes --bench; anything else unknown is ignored the same way.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// The byte at `pos` of generated file number `file` (cheap to check, differs per file).
fn pattern(file: usize, pos: u64) -> u8 {
    (pos.wrapping_mul(31).wrapping_add(file as u64 * 7) % 251) as u8
}

fn file_name(i: usize) -> String {
    format!("f{i}.bin")
}

/// Writes the generated files into `dir`; returns their contents.
fn write_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        let data: Vec<u8> = (0..size as u64).map(|p| pattern(i, p)).collect();
        std::fs::write(dir.join(file_name(i)), &data).expect("write a generated file");
        all.push(data);
    }
    all
}

/// Starts `share hub` on a free loopback port; returns it and its address.
fn start_hub(max_reads: usize, extra: &[String]) -> (Proc, String) {
    let mut child = share()
        .args(["hub", "--listen", "127.0.0.1:0", "--max-reads-per-peer"])
        .arg(max_reads.to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start share hub");
    let stdout = child.stdout.take().expect("hub stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the hub's first line");
    let addr = line
        .trim()
        .strip_prefix("hub listening on ")
        .unwrap_or_else(|| panic!("unexpected hub output {line:?}"))
        .to_owned();
    (Proc(child), addr)
}

/// Connects from `source` and publishes `name` (see tests/common/raw.rs).
async fn connect(addr: &str, source: std::net::IpAddr, name: String) -> (Session, HubClient) {
    raw::join(addr.parse().expect("hub address"), source, name).await
}

/// One verified read: Ok(bytes) if every byte matched, else why not.
async fn read_once(
    hub: &HubClient,
    peer: String,
    file: usize,
    expected: &[u8],
) -> Result<u64, String> {
    let req = PeerRead {
        peer,
        path: file_name(file),
        offset: 0,
    };
    let mut stream = hub.read(req).await.map_err(|s| s.to_string())?;
    let mut pos = 0u64;
    // Bounded by the file's size: the last chunk says eof.
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|s| s.to_string())?;
        if chunk.offset != pos {
            return Err(format!("chunk at {} where {pos} was due", chunk.offset));
        }
        let end = pos as usize + chunk.data.len();
        if end > expected.len() || chunk.data[..] != expected[pos as usize..end] {
            return Err(format!("bytes {pos}..{end} of {} differ", file_name(file)));
        }
        pos += chunk.data.len() as u64;
        if chunk.eof {
            return if pos == SIZES[file] as u64 {
                Ok(pos)
            } else {
                Err(format!("{} ended at {pos}", file_name(file)))
            };
        }
    }
    Err("the stream ended without eof".into())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn source(i: usize) -> std::net::IpAddr {
    raw::source(i)
}

fn main() {
    let o = parse_opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (hub, addr) = start_hub(o.clients * o.calls, &o.hub_args);
    let hub_pid = hub.0.id();
    let dir = std::env::temp_dir().join(format!("share-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let contents: Arc<Vec<Vec<u8>>> = Arc::new(write_files(&dir));
    let mut exporters = Vec::new();
    for e in 0..o.exporters {
        let child = share()
            .args(["--serve", "--name", &format!("e{e}"), "--root"])
            .arg(&dir)
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start an exporter");
        exporters.push(Proc(child));
    }
    let ok = rt.block_on(async {
        // Wait for the exporters to be listed (bounded by STEP).
        let (_probe_session, probe) = connect(&addr, source(0), "load-probe".into()).await;
        let t0 = Instant::now();
        // Bounded by STEP.
        loop {
            let names = probe.list(proto::ListReq {}).await.expect("list");
            if names.iter().filter(|n| n.starts_with('e')).count() == o.exporters {
                break;
            }
            assert!(t0.elapsed() < STEP, "exporters did not join: {names:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss_start = status_kib(hub_pid, "VmRSS");
        // ---- load ----
        let bytes = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(o.seconds);
        let mut tasks = tokio::task::JoinSet::new();
        let mut sessions = Vec::new();
        let cpu0 = cpu_time(hub_pid);
        let started = Instant::now();
        for c in 0..o.clients {
            let (session, hub) = connect(&addr, source(1 + c), format!("reader{c}")).await;
            sessions.push(session);
            for k in 0..o.calls {
                let (hub, bytes, contents) = (hub.clone(), bytes.clone(), contents.clone());
                let exporters = o.exporters;
                tasks.spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = Vec::new();
                    let mut n = c * 7 + k * 3;
                    // Bounded by `end`.
                    while Instant::now() < end {
                        let (peer, file) = (format!("e{}", (n + k) % exporters), n % SIZES.len());
                        n += 1;
                        let t = Instant::now();
                        match tokio::time::timeout(STEP, read_once(&hub, peer, file, &contents[file])).await {
                            Ok(Ok(b)) => {
                                bytes.fetch_add(b, Ordering::Relaxed);
                                lat.push(t.elapsed());
                            }
                            Ok(Err(e)) => errors.push(e),
                            Err(_) => errors.push(format!("no answer within {STEP:?}")),
                        }
                    }
                    (lat, errors)
                });
            }
        }
        let mut lat = Vec::new();
        let mut errors = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (l, e) = done.expect("a load task");
            lat.extend(l);
            errors.extend(e);
        }
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_time(hub_pid).saturating_sub(cpu0).as_secs_f64();
        lat.sort();
        let mib = bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        println!(
            "load: {} clients x {} calls, {} exporters, {:.1} s",
            o.clients, o.calls, o.exporters, took
        );
        println!(
            "  calls/s {:.1}   MiB/s {:.1}   p50 {:.1} ms   p99 {:.1} ms   errors {}",
            lat.len() as f64 / took,
            mib / took,
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            errors.len()
        );
        println!(
            "  hub: RSS at start {} KiB, peak RSS (VmHWM) {} KiB, CPU {:.0}% of one core",
            rss_start,
            status_kib(hub_pid, "VmHWM"),
            100.0 * cpu / took
        );
        for e in errors.iter().take(5) {
            println!("  error: {e}");
        }
        drop(sessions);
        // ---- idle soak ----
        if o.idle == 0 {
            return errors.is_empty();
        }
        let rss_before = status_kib(hub_pid, "VmRSS");
        let mut idle = Vec::with_capacity(o.idle);
        let mut joins = Vec::with_capacity(o.idle);
        let connect_start = Instant::now();
        for chunk in (0..o.idle).collect::<Vec<_>>().chunks(8) {
            let mut wave = tokio::task::JoinSet::new();
            for &i in chunk {
                let addr = addr.clone();
                wave.spawn(async move {
                    let t = Instant::now();
                    let c = tokio::time::timeout(
                        STEP,
                        connect(&addr, source(100 + i), format!("idle{i}")),
                    )
                    .await
                    .expect("an idle client connects in time");
                    (c, t.elapsed())
                });
            }
            while let Some(c) = wave.join_next().await {
                let (c, took) = c.expect("connect task");
                idle.push(c);
                joins.push(took);
            }
        }
        let connect_took = connect_start.elapsed();
        joins.sort();
        let at = |q: f64| joins[((joins.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!(
            "joins (connect, hello, publish; 8 at a time): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.5),
            at(0.99),
            at(1.0)
        );
        let names = probe.list(proto::ListReq {}).await.expect("list");
        assert!(names.len() > o.idle, "only {} peers listed", names.len());
        let cpu0 = cpu_time(hub_pid);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(o.soak)).await;
        let cpu = cpu_time(hub_pid).saturating_sub(cpu0).as_secs_f64();
        let rss_after = status_kib(hub_pid, "VmRSS");
        let per = (rss_after.saturating_sub(rss_before)) as f64 / o.idle as f64;
        println!(
            "idle soak: {} clients connected in {:.1} s; hub RSS {} -> {} KiB: {:.1} KiB per idle client; \
             CPU over {:.0} s idle: {:.1}% of one core",
            o.idle,
            connect_took.as_secs_f64(),
            rss_before,
            rss_after,
            per,
            t.elapsed().as_secs_f64(),
            100.0 * cpu / t.elapsed().as_secs_f64()
        );
        drop(idle);
        errors.is_empty()
    });
    drop(exporters);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
    if !ok {
        eprintln!("load: some calls failed");
        std::process::exit(1);
    }
}
