//! Throughput and latency of netchan channels against raw TCP (see docs/performance.md).
//!
//! In one run, under both tokio runtime flavours (current-thread and a 2-worker multi-thread):
//! - `bulk/1`: one raw TCP loopback connection vs one channel, large writes;
//! - `bulk/8`: eight raw connections vs eight channels on one session, aggregate;
//! - `rtt`: a 64-byte round trip on raw TCP vs on a channel.
//!
//! Both ends run in this process, each side's I/O in its own tasks (for the channel, each
//! session also has its driver task). At the end a summary times raw TCP and netchan again in
//! alternating rounds (so both see the same background load) and prints the ratios.
//!
//! `NETCHAN_BENCH_SPLIT_SEND_SIZE=<bytes>` overrides `Config::split_send_size` for tuning runs;
//! `NETCHAN_BENCH_SUMMARY_ONLY=1` skips criterion and prints only the paired ratios.

use criterion::{Criterion, Throughput};
use netchan_mux::{Config, Session};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    sync::mpsc,
};

/// Bytes moved per iteration of a bulk benchmark (split over the lanes).
const BULK_BYTES: u64 = 64 * 1024 * 1024;
/// Size of each application write in the bulk benchmarks.
const WRITE_SIZE: usize = 1024 * 1024;
const RTT_MESSAGE: usize = 64;

fn runtime(flavour: &str) -> Runtime {
    match flavour {
        "current_thread" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    }
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.unwrap(), server.unwrap());
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

async fn session_pair() -> (Session, Session) {
    let (a, b) = tcp_pair().await;
    // The default configuration (keepalive on): what users get.
    let mut config = Config::default();
    // Tuning knob: try other frame sizes without editing the benchmark.
    if let Some(size) = std::env::var("NETCHAN_BENCH_SPLIT_SEND_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config = config.split_send_size(size);
    }
    (
        Session::client(a, config.clone()),
        Session::server(b, config),
    )
}

/// A writer task and a reader task per lane, each moving as many bytes as asked per round.
struct Lanes {
    writers: Vec<mpsc::Sender<u64>>,
    readers: Vec<mpsc::Sender<u64>>,
    done: mpsc::Receiver<()>,
}

impl Lanes {
    fn new<W, R>(pairs: Vec<(W, R)>) -> Lanes
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (done_tx, done) = mpsc::channel(pairs.len() * 2);
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for (mut w, mut r) in pairs {
            let (wtx, mut wrx) = mpsc::channel::<u64>(1);
            let (rtx, mut rrx) = mpsc::channel::<u64>(1);
            let done_w = done_tx.clone();
            tokio::spawn(async move {
                let block = vec![0xa5u8; WRITE_SIZE];
                while let Some(mut n) = wrx.recv().await {
                    while n > 0 {
                        let k = n.min(WRITE_SIZE as u64) as usize;
                        w.write_all(&block[..k]).await.unwrap();
                        n -= k as u64;
                    }
                    w.flush().await.unwrap();
                    let _ = done_w.send(()).await;
                }
            });
            let done_r = done_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; WRITE_SIZE];
                while let Some(mut n) = rrx.recv().await {
                    while n > 0 {
                        let k = n.min(buf.len() as u64) as usize;
                        let got = r.read(&mut buf[..k]).await.unwrap();
                        assert!(got > 0, "unexpected end of stream");
                        n -= got as u64;
                    }
                    let _ = done_r.send(()).await;
                }
            });
            writers.push(wtx);
            readers.push(rtx);
        }
        Lanes {
            writers,
            readers,
            done,
        }
    }

    /// Moves `total` bytes split evenly over the lanes; returns when all have arrived.
    async fn round(&mut self, total: u64) {
        let per_lane = total / self.writers.len() as u64;
        for (w, r) in self.writers.iter().zip(&self.readers) {
            r.send(per_lane).await.unwrap();
            w.send(per_lane).await.unwrap();
        }
        for _ in 0..self.writers.len() * 2 {
            self.done.recv().await.unwrap();
        }
    }
}

async fn tcp_lanes(n: usize) -> Lanes {
    let mut pairs = Vec::new();
    for _ in 0..n {
        let (a, b) = tcp_pair().await;
        pairs.push((a, b));
    }
    Lanes::new(pairs)
}

async fn channel_lanes(n: usize) -> (Lanes, Session, Session) {
    let (client, server) = session_pair().await;
    let mut listener = server.listen("bulk").unwrap();
    let mut pairs = Vec::new();
    for _ in 0..n {
        let (dialed, accepted) = tokio::join!(client.dial("bulk"), listener.accept());
        pairs.push((dialed.unwrap(), accepted.unwrap()));
    }
    (Lanes::new(pairs), client, server)
}

/// Echoes fixed-size messages back; the caller measures one round trip per message.
fn spawn_echo<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut s: S) {
    tokio::spawn(async move {
        let mut buf = [0u8; RTT_MESSAGE];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
}

async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, iters: u64) {
    let mut buf = [7u8; RTT_MESSAGE];
    for _ in 0..iters {
        s.write_all(&buf).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
    }
}

fn bench_flavour(c: &mut Criterion, flavour: &str) {
    let rt = runtime(flavour);

    for lanes in [1usize, 8] {
        let mut group = c.benchmark_group(format!("bulk/{lanes}/{flavour}"));
        group.throughput(Throughput::Bytes(BULK_BYTES));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));

        let mut raw = rt.block_on(tcp_lanes(lanes));
        group.bench_function("raw_tcp", |b| {
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        raw.round(BULK_BYTES).await;
                    }
                    start.elapsed()
                });
                elapsed
            })
        });
        drop(raw);

        let (mut chan, client, server) = rt.block_on(channel_lanes(lanes));
        group.bench_function("netchan", |b| {
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        chan.round(BULK_BYTES).await;
                    }
                    start.elapsed()
                });
                elapsed
            })
        });
        drop(chan);
        rt.block_on(async {
            client.close().await;
            server.close().await;
        });
        group.finish();
    }

    let mut group = c.benchmark_group(format!("rtt/{flavour}"));
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    let mut raw = rt.block_on(async {
        let (a, b) = tcp_pair().await;
        spawn_echo(b);
        a
    });
    group.bench_function("raw_tcp", |b| {
        b.iter_custom(|iters| {
            let elapsed = rt.block_on(async {
                let start = Instant::now();
                ping_pong(&mut raw, iters).await;
                start.elapsed()
            });
            elapsed
        })
    });
    drop(raw);

    let (mut conn, client, server) = rt.block_on(async {
        let (client, server) = session_pair().await;
        let mut listener = server.listen("rtt").unwrap();
        let (dialed, accepted) = tokio::join!(client.dial("rtt"), listener.accept());
        spawn_echo(accepted.unwrap());
        (dialed.unwrap(), client, server)
    });
    group.bench_function("netchan", |b| {
        b.iter_custom(|iters| {
            let elapsed = rt.block_on(async {
                let start = Instant::now();
                ping_pong(&mut conn, iters).await;
                start.elapsed()
            });
            elapsed
        })
    });
    drop(conn);
    rt.block_on(async {
        client.close().await;
        server.close().await;
    });
    group.finish();
}

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU time (user + system) this process has used, from `/proc/self/stat` (Linux; 10 ms
/// ticks). On a shared machine, CPU per byte is far steadier than wall-clock throughput.
fn cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15.
    let field = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Rounds of each pair in the ratio summary.
const PAIRS: usize = 15;
/// Untimed rounds of each before the pairs.
const WARM_UP_ROUNDS: usize = 10;
/// Round trips per timed round in the ratio summary.
const RTT_ROUND: u64 = 2000;

/// The ratio summary: raw TCP and netchan timed in alternating rounds, so both see the same
/// load from whatever else runs on the machine; reports the medians of the per-pair ratios.
fn paired_summary(flavour: &str) -> Vec<String> {
    let rt = runtime(flavour);
    let mut lines = Vec::new();
    for lanes in [1usize, 8] {
        let (ratios, raw_t, chan_t, cpu) = rt.block_on(async {
            let mut raw = tcp_lanes(lanes).await;
            let (mut chan, client, server) = channel_lanes(lanes).await;
            // Warm up (yamux grows a busy stream's window over its first rounds).
            for _ in 0..WARM_UP_ROUNDS {
                raw.round(BULK_BYTES).await;
                chan.round(BULK_BYTES).await;
            }
            let (mut ratios, mut raw_t, mut chan_t) = (Vec::new(), Vec::new(), Vec::new());
            let (mut raw_cpu, mut chan_cpu) = (0, 0);
            for _ in 0..PAIRS {
                let (start, cpu) = (Instant::now(), cpu_ticks());
                raw.round(BULK_BYTES).await;
                let r = start.elapsed().as_secs_f64();
                raw_cpu += cpu_ticks() - cpu;
                let (start, cpu) = (Instant::now(), cpu_ticks());
                chan.round(BULK_BYTES).await;
                let c = start.elapsed().as_secs_f64();
                chan_cpu += cpu_ticks() - cpu;
                ratios.push(r / c);
                raw_t.push(r);
                chan_t.push(c);
            }
            drop(chan);
            client.close().await;
            server.close().await;
            (ratios, raw_t, chan_t, cpu_ratio(raw_cpu, chan_cpu))
        });
        let gbps = |t: f64| BULK_BYTES as f64 / t / 1e9;
        lines.push(format!(
            "{:<28} {:>9.2} GB/s {:>9.2} GB/s {:>7.2}x {:>9}",
            format!("bulk/{lanes}/{flavour}"),
            gbps(median(&raw_t)),
            gbps(median(&chan_t)),
            median(&ratios),
            cpu
        ));
    }
    let (ratios, raw_t, chan_t, cpu) = rt.block_on(async {
        let (mut raw, _) = {
            let (a, b) = tcp_pair().await;
            spawn_echo(b);
            (a, ())
        };
        let (client, server) = session_pair().await;
        let mut listener = server.listen("rtt").unwrap();
        let (dialed, accepted) = tokio::join!(client.dial("rtt"), listener.accept());
        spawn_echo(accepted.unwrap());
        let mut conn = dialed.unwrap();
        ping_pong(&mut raw, RTT_ROUND).await;
        ping_pong(&mut conn, RTT_ROUND).await;
        let (mut ratios, mut raw_t, mut chan_t) = (Vec::new(), Vec::new(), Vec::new());
        let (mut raw_cpu, mut chan_cpu) = (0, 0);
        for _ in 0..PAIRS {
            let (start, cpu) = (Instant::now(), cpu_ticks());
            ping_pong(&mut raw, RTT_ROUND).await;
            let r = start.elapsed().as_secs_f64() / RTT_ROUND as f64;
            raw_cpu += cpu_ticks() - cpu;
            let (start, cpu) = (Instant::now(), cpu_ticks());
            ping_pong(&mut conn, RTT_ROUND).await;
            let c = start.elapsed().as_secs_f64() / RTT_ROUND as f64;
            chan_cpu += cpu_ticks() - cpu;
            ratios.push(c / r);
            raw_t.push(r);
            chan_t.push(c);
        }
        drop(conn);
        client.close().await;
        server.close().await;
        (ratios, raw_t, chan_t, cpu_ratio(chan_cpu, raw_cpu))
    });
    lines.push(format!(
        "{:<28} {:>11.1} µs {:>11.1} µs {:>7.2}x {:>9}",
        format!("rtt/{flavour}"),
        median(&raw_t) * 1e6,
        median(&chan_t) * 1e6,
        median(&ratios),
        cpu
    ));
    lines
}

/// `a / b` of CPU ticks, formatted, or "n/a" without `/proc`.
fn cpu_ratio(a: u64, b: u64) -> String {
    if a == 0 || b == 0 {
        return "n/a".to_owned();
    }
    format!("{:.2}x", a as f64 / b as f64)
}

fn print_summary(lines: &[String]) {
    println!("\nnetchan-mux vs raw TCP, alternating rounds in this run (medians of {PAIRS} pairs)");
    println!(
        "{:<28} {:>14} {:>14} {:>8} {:>9}",
        "benchmark", "raw tcp", "netchan", "ratio", "cpu ratio"
    );
    for line in lines {
        println!("{line}");
    }
    println!("(bulk: netchan throughput / raw; rtt: netchan round trip / raw;");
    println!(" cpu ratio: the same ratio computed from process CPU time instead of wall time)");
}

fn main() {
    // Tuning runs can skip the criterion part and only print the paired ratios.
    if std::env::var_os("NETCHAN_BENCH_SUMMARY_ONLY").is_none() {
        let mut criterion = Criterion::default().configure_from_args();
        for flavour in ["current_thread", "multi_thread"] {
            bench_flavour(&mut criterion, flavour);
        }
        criterion.final_summary();
    }
    // Profiling runs (`--profile-time`) must contain only the benchmark being profiled.
    if std::env::args().any(|a| a == "--profile-time") {
        return;
    }
    let mut lines = Vec::new();
    for flavour in ["current_thread", "multi_thread"] {
        lines.extend(paired_summary(flavour));
    }
    print_summary(&lines);
}
