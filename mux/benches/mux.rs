//! Throughput and latency of netchan channels against raw TCP (see docs/performance.md).
//!
//! In one run, under both tokio runtime flavours (current-thread and a 2-worker multi-thread):
//! - `bulk/1`: one raw TCP loopback connection vs one channel, large writes;
//! - `bulk/8`: eight raw connections vs eight channels on one session, aggregate (the summary
//!   also times one raw connection carrying the same bytes: what one link can carry);
//! - `rtt`: a 64-byte round trip on raw TCP vs on a channel.
//!
//! Both ends run in this process, each side's I/O in its own tasks (for the channel, each
//! session also has its driver task). At the end a summary times raw TCP, netchan and the
//! `yamux` crate (0.14, default config, the engine netchan used before) again in rotating
//! rounds (so all see the same background load) and prints the ratios; then a WAN summary
//! moves one stream through a delay-line proxy (`netchan_testkit::proxy::Link::wan`, 1 Gbit/s
//! at 50 ms and 100 ms round trip) for the same three, and for a netchan channel beside another
//! that exchanges 64-byte messages back to back.
//!
//! `NETCHAN_BENCH_SPLIT_SEND_SIZE=<bytes>`, `NETCHAN_BENCH_MAX_WINDOW=<bytes>` and
//! `NETCHAN_BENCH_WINDOW_BESIDE_INTERACTIVE=<bytes>` override `Config::split_send_size`,
//! `Config::max_stream_window` and `Config::window_beside_interactive` for tuning runs;
//! `NETCHAN_BENCH_SUMMARY_ONLY=1` skips criterion and prints only the paired ratios;
//! `NETCHAN_BENCH_NO_WAN=1` skips the WAN summary; `NETCHAN_BENCH_ONLY=<text>` runs only the
//! summary lines whose name contains it (`rtt/current_thread`, `bulk/8`, `rtt-beside-bulk`,
//! `wan`), and `NETCHAN_BENCH_FAIRNESS_ONLY=1` is the same as `NETCHAN_BENCH_ONLY=rtt-beside-bulk`;
//! `NETCHAN_BENCH_SNDBUF=<bytes>` sets the kernel send buffer of every loopback socket (raw and
//! under the sessions alike).
//!
//! The TCP connections under sessions get what `netchan::connect` and `netchan::bind` give
//! theirs, [`netchan_mux::tune_tcp`]; raw TCP keeps the kernel's defaults (with `TCP_NODELAY`).
//! `NETCHAN_BENCH_UNSENT=<bytes>` sets another `TCP_NOTSENT_LOWAT` under the sessions (`0`:
//! none, the kernel's default) for tuning runs.

use criterion::{Criterion, Throughput};
use netchan_mux::{Config, Session};
use netchan_testkit::yamux::{YamuxPeer, YamuxStream};
use netchan_testkit::{
    proxy::{Link, Proxy},
    tcp_pair,
};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
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

/// A loopback TCP pair; with `NETCHAN_BENCH_SNDBUF=<bytes>`, both sockets get that send
/// buffer (a tuning knob: a smaller kernel send queue means less waiting behind bulk data).
async fn bench_tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let Some(sndbuf) = std::env::var("NETCHAN_BENCH_SNDBUF")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return tcp_pair().await;
    };
    let socket = || {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_send_buffer_size(sndbuf).unwrap();
        s
    };
    let listening = socket();
    listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listening.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(socket().connect(addr), listener.accept());
    let (client, server) = (client.unwrap(), server.unwrap().0);
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Sets up a TCP connection to carry a session as the `net` layer does ([`netchan_mux::tune_tcp`]),
/// or with the `TCP_NOTSENT_LOWAT` of `NETCHAN_BENCH_UNSENT` (0: the kernel's default).
fn tune_for_session(tcp: &tokio::net::TcpStream) {
    match std::env::var("NETCHAN_BENCH_UNSENT")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        None => netchan_mux::tune_tcp(tcp).unwrap(),
        Some(0) => {}
        #[cfg(target_os = "linux")]
        Some(bytes) => socket2::SockRef::from(tcp)
            .set_tcp_notsent_lowat(bytes)
            .unwrap(),
        #[cfg(not(target_os = "linux"))]
        Some(_) => {}
    }
}

async fn session_pair() -> (Session, Session) {
    let (a, b) = bench_tcp_pair().await;
    tune_for_session(&a);
    tune_for_session(&b);
    let config = bench_config();
    (
        Session::client(a, config.clone()),
        Session::server(b, config),
    )
}

/// The default configuration (keepalive on: what users get), with the tuning knobs of the
/// environment applied, so other settings can be tried without editing the benchmark.
fn bench_config() -> Config {
    let knob = |name: &str| -> Option<usize> { std::env::var(name).ok()?.parse().ok() };
    let mut config = Config::default();
    if let Some(size) = knob("NETCHAN_BENCH_SPLIT_SEND_SIZE") {
        config = config.split_send_size(size);
    }
    if let Some(bytes) = knob("NETCHAN_BENCH_MAX_WINDOW") {
        config = config.max_stream_window(bytes);
    }
    if let Some(bytes) = knob("NETCHAN_BENCH_WINDOW_BESIDE_INTERACTIVE") {
        config = config.window_beside_interactive(bytes);
    }
    config
}

/// A client and a server session across a delay-line proxy on `link`; the link lasts as long
/// as the returned proxy.
async fn proxied_sessions(link: Link) -> (Session, Session, Proxy) {
    let (a, b, proxy) = Proxy::pair(link).await.unwrap();
    tune_for_session(&a);
    tune_for_session(&b);
    (
        Session::client(a, bench_config()),
        Session::server(b, bench_config()),
        proxy,
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
        let (a, b) = bench_tcp_pair().await;
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

/// `n` yamux-crate streams over `(a, b)`: opened by `a`, accepted by `b` (made visible to
/// `b` by a first byte, which the pair's reader skips).
async fn yamux_pairs<T>(a: T, b: T, n: usize) -> Vec<(YamuxStream, YamuxStream)>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let client = YamuxPeer::start(a, yamux::Mode::Client);
    let mut server = YamuxPeer::start(b, yamux::Mode::Server);
    let mut pairs = Vec::new();
    for _ in 0..n {
        let mut out = client.open().await;
        out.write_all(&[0]).await.unwrap();
        out.flush().await.unwrap();
        let mut inc = server.accept().await.unwrap();
        let mut first = [0u8; 1];
        inc.read_exact(&mut first).await.unwrap();
        pairs.push((out, inc));
    }
    // Keep the connections' handles alive as long as the streams.
    std::mem::forget(client);
    std::mem::forget(server);
    pairs
}

async fn yamux_lanes(n: usize) -> Lanes {
    let (a, b) = bench_tcp_pair().await;
    Lanes::new(yamux_pairs(a, b, n).await)
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

/// Runs `f` in a task of its own on `rt` and waits for it. Timed loops run in spawned tasks,
/// as application code does: the future `block_on` drives is woken through the runtime's
/// unpark path (an extra `epoll_wait` each time another task wakes it), which I/O readiness
/// waking it directly does not pay, so timing there would penalise every contender that
/// wakes the caller from a task of its own (a channel's driver, the `yamux` crate's) against
/// raw TCP.
fn in_task<F>(rt: &Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    rt.block_on(async { tokio::spawn(f).await.expect("bench task") })
}

/// `iters` round trips on `s` in a task of its own (see [`in_task`]): `s` back, and the time.
fn timed_ping_pong<S>(rt: &Runtime, mut s: S, iters: u64) -> (S, Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    in_task(rt, async move {
        let start = Instant::now();
        ping_pong(&mut s, iters).await;
        (s, start.elapsed())
    })
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

    let mut raw = Some(rt.block_on(async {
        let (a, b) = bench_tcp_pair().await;
        spawn_echo(b);
        a
    }));
    group.bench_function("raw_tcp", |b| {
        b.iter_custom(|iters| {
            let (s, elapsed) = timed_ping_pong(&rt, raw.take().expect("conn"), iters);
            raw = Some(s);
            elapsed
        })
    });
    drop(raw);

    let (mut conn, client, server) = rt.block_on(async {
        let (client, server) = session_pair().await;
        let mut listener = server.listen("rtt").unwrap();
        let (dialed, accepted) = tokio::join!(client.dial("rtt"), listener.accept());
        spawn_echo(accepted.unwrap());
        (Some(dialed.unwrap()), client, server)
    });
    group.bench_function("netchan", |b| {
        b.iter_custom(|iters| {
            let (s, elapsed) = timed_ping_pong(&rt, conn.take().expect("conn"), iters);
            conn = Some(s);
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
        if !wanted(&format!("bulk/{lanes}/{flavour}")) {
            continue;
        }
        let (raw_t, chan_t, yam_t, ratios, yam_ratios, cpu, one_t) = in_task(&rt, async move {
            let mut raw = tcp_lanes(lanes).await;
            let (mut chan, client, server) = channel_lanes(lanes).await;
            let mut yam = yamux_lanes(lanes).await;
            // Beside several raw connections, one raw connection carrying the same bytes: the
            // most that the one connection under a session could carry.
            let mut one = if lanes > 1 {
                Some(tcp_lanes(1).await)
            } else {
                None
            };
            // Warm up (windows grow over the first rounds).
            for _ in 0..WARM_UP_ROUNDS {
                raw.round(BULK_BYTES).await;
                chan.round(BULK_BYTES).await;
                yam.round(BULK_BYTES).await;
                if let Some(one) = &mut one {
                    one.round(BULK_BYTES).await;
                }
            }
            let mut one_t = Vec::new();
            let (mut raw_t, mut chan_t, mut yam_t) = (Vec::new(), Vec::new(), Vec::new());
            let (mut ratios, mut yam_ratios) = (Vec::new(), Vec::new());
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
                let start = Instant::now();
                yam.round(BULK_BYTES).await;
                let y = start.elapsed().as_secs_f64();
                if let Some(one) = &mut one {
                    let start = Instant::now();
                    one.round(BULK_BYTES).await;
                    one_t.push(start.elapsed().as_secs_f64());
                }
                ratios.push(r / c);
                yam_ratios.push(r / y);
                raw_t.push(r);
                chan_t.push(c);
                yam_t.push(y);
            }
            drop(chan);
            client.close().await;
            server.close().await;
            (
                raw_t,
                chan_t,
                yam_t,
                ratios,
                yam_ratios,
                cpu_ratio(raw_cpu, chan_cpu),
                one_t,
            )
        });
        let gbps = |t: f64| BULK_BYTES as f64 / t / 1e9;
        lines.push(format!(
            "{:<24} {:>8.2} GB/s {:>8.2} GB/s {:>7.2}x {:>8.2} GB/s {:>7.2}x {:>9}",
            format!("bulk/{lanes}/{flavour}"),
            gbps(median(&raw_t)),
            gbps(median(&chan_t)),
            median(&ratios),
            gbps(median(&yam_t)),
            median(&yam_ratios),
            cpu
        ));
        if !one_t.is_empty() {
            let one = median(&one_t);
            lines.push(format!(
                "  (one raw connection carrying the same bytes: {:.2} GB/s, {:.2}x of {lanes}; netchan {:.2}x of it)",
                gbps(one),
                median(&raw_t) / one,
                one / median(&chan_t)
            ));
        }
    }
    if !wanted(&format!("rtt/{flavour}")) {
        return lines;
    }
    let (raw_t, chan_t, yam_t, ratios, yam_ratios, cpu) = in_task(&rt, async move {
        let mut raw = {
            let (a, b) = bench_tcp_pair().await;
            spawn_echo(b);
            a
        };
        let (client, server) = session_pair().await;
        let mut listener = server.listen("rtt").unwrap();
        let (dialed, accepted) = tokio::join!(client.dial("rtt"), listener.accept());
        spawn_echo(accepted.unwrap());
        let mut conn = dialed.unwrap();
        let mut yam = {
            let (a, b) = bench_tcp_pair().await;
            let (out, inc) = yamux_pairs(a, b, 1).await.pop().unwrap();
            spawn_echo(inc);
            out
        };
        ping_pong(&mut raw, RTT_ROUND).await;
        ping_pong(&mut conn, RTT_ROUND).await;
        ping_pong(&mut yam, RTT_ROUND).await;
        let (mut raw_t, mut chan_t, mut yam_t) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ratios, mut yam_ratios) = (Vec::new(), Vec::new());
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
            let start = Instant::now();
            ping_pong(&mut yam, RTT_ROUND).await;
            let y = start.elapsed().as_secs_f64() / RTT_ROUND as f64;
            ratios.push(c / r);
            yam_ratios.push(y / r);
            raw_t.push(r);
            chan_t.push(c);
            yam_t.push(y);
        }
        drop(conn);
        client.close().await;
        server.close().await;
        (
            raw_t,
            chan_t,
            yam_t,
            ratios,
            yam_ratios,
            cpu_ratio(chan_cpu, raw_cpu),
        )
    });
    lines.push(format!(
        "{:<24} {:>10.1} µs {:>10.1} µs {:>7.2}x {:>10.1} µs {:>7.2}x {:>9}",
        format!("rtt/{flavour}"),
        median(&raw_t) * 1e6,
        median(&chan_t) * 1e6,
        median(&ratios),
        median(&yam_t) * 1e6,
        median(&yam_ratios),
        cpu
    ));
    lines
}

/// What [`rtt_beside_bulk`] measures, each a median over [`PAIRS`] alternating rounds.
struct Beside {
    /// The round trip with nothing else running, in seconds.
    idle: f64,
    /// The round trip beside the bulk transfer, in seconds.
    loaded: f64,
    /// `loaded / idle`, round by round.
    ratio: f64,
    /// What the bulk transfer carried meanwhile, in bytes per second.
    bulk_rate: f64,
}

/// The round trip on `conn` (an echo answers it) with nothing else running, and beside a
/// flat-out bulk transfer from `bulk_out` to `bulk_in` (paused between the timed rounds), and
/// the bulk transfer's rate while the round trips ran beside it.
async fn rtt_beside_bulk<C, W, R>(mut conn: C, mut bulk_out: W, mut bulk_in: R) -> Beside
where
    C: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let busy = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
    let mut on = busy.subscribe();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; WRITE_SIZE];
        while on.wait_for(|b| *b).await.is_ok() {
            if bulk_out.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let carried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = carried.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; WRITE_SIZE];
        while let Ok(n @ 1..) = bulk_in.read(&mut buf).await {
            count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    ping_pong(&mut conn, RTT_ROUND).await;
    let (mut idle, mut loaded, mut ratios, mut rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        let start = Instant::now();
        ping_pong(&mut conn, RTT_ROUND).await;
        let i = start.elapsed().as_secs_f64() / RTT_ROUND as f64;
        busy.send_replace(true);
        // Let the bulk stream get going before timing beside it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (start, before) = (
            Instant::now(),
            carried.load(std::sync::atomic::Ordering::Relaxed),
        );
        ping_pong(&mut conn, RTT_ROUND).await;
        let took = start.elapsed().as_secs_f64();
        let moved = carried.load(std::sync::atomic::Ordering::Relaxed) - before;
        let b = took / RTT_ROUND as f64;
        busy.send_replace(false);
        idle.push(i);
        loaded.push(b);
        ratios.push(b / i);
        rates.push(moved as f64 / took);
    }
    writer.abort();
    reader.abort();
    Beside {
        idle: median(&idle),
        loaded: median(&loaded),
        ratio: median(&ratios),
        bulk_rate: median(&rates),
    }
}

/// Fairness: the 64-byte round trip on one channel while another channel of the same session
/// streams bulk data flat out, against the same round trip with the session otherwise idle.
/// The target is at most 2× (a bulk transfer must not starve small calls beside it).
fn fairness_summary(flavour: &str) -> Vec<String> {
    let rt = runtime(flavour);
    let mux = rt.block_on(async {
        let (client, server) = session_pair().await;
        let mut rtt_listener = server.listen("rtt").unwrap();
        let mut bulk_listener = server.listen("bulk").unwrap();
        let (dialed, accepted) = tokio::join!(client.dial("rtt"), rtt_listener.accept());
        spawn_echo(accepted.unwrap());
        let (bulk_out, bulk_in) = tokio::join!(client.dial("bulk"), bulk_listener.accept());
        let result = rtt_beside_bulk(dialed.unwrap(), bulk_out.unwrap(), bulk_in.unwrap()).await;
        client.close().await;
        server.close().await;
        result
    });
    // The same on raw TCP: the round trip on one connection beside bulk on another, in the
    // same runtime (what the runtime and the kernel cost anyway).
    let raw = rt.block_on(async {
        let (conn, echo) = bench_tcp_pair().await;
        spawn_echo(echo);
        let (bulk_out, bulk_in) = bench_tcp_pair().await;
        rtt_beside_bulk(conn, bulk_out, bulk_in).await
    });
    vec![format!(
        "{:<24} idle {:.1} / beside bulk {:.1} µs: {:.2}x, bulk {:.0} MB/s (raw TCP, two connections: {:.1} / {:.1} µs: {:.2}x, bulk {:.0} MB/s); target <= 2x",
        format!("rtt-beside-bulk/{flavour}"),
        mux.idle * 1e6,
        mux.loaded * 1e6,
        mux.ratio,
        mux.bulk_rate / 1e6,
        raw.idle * 1e6,
        raw.loaded * 1e6,
        raw.ratio,
        raw.bulk_rate / 1e6,
    )]
}

/// Bytes per timed WAN round, and timed rounds per kind.
const WAN_BYTES: u64 = 96 * 1024 * 1024;
const WAN_ROUNDS: usize = 3;

/// One stream across a delay-line proxy: raw TCP, a netchan channel and a yamux-crate stream,
/// each on its own proxied connection, timed in rotating rounds after one warm-up round.
fn wan_summary() -> Vec<String> {
    let rt = runtime("multi_thread");
    let mut lines = Vec::new();
    for rtt_ms in [50u64, 100] {
        let link = Link::wan(Duration::from_millis(rtt_ms), 1_000_000_000);
        let (raw_t, chan_t, yam_t, beside_t) = rt.block_on(async {
            let (a, b, _p1) = Proxy::pair(link).await.unwrap();
            let mut raw = Lanes::new(vec![(a, b)]);
            let (client, server, _p2) = proxied_sessions(link).await;
            let mut listener = server.listen("wan").unwrap();
            let (dialed, accepted) = tokio::join!(client.dial("wan"), listener.accept());
            let mut chan = Lanes::new(vec![(dialed.unwrap(), accepted.unwrap())]);
            let (a, b, _p3) = Proxy::pair(link).await.unwrap();
            let mut yam = Lanes::new(yamux_pairs(a, b, 1).await);
            // A second session whose bulk channel runs beside a channel exchanging 64-byte
            // messages back to back (one per round trip): the bulk channel must keep its rate.
            let (client2, server2, _p4) = proxied_sessions(link).await;
            let mut bulk_listener = server2.listen("wan").unwrap();
            let mut chat_listener = server2.listen("chat").unwrap();
            let (dialed, accepted) = tokio::join!(client2.dial("wan"), bulk_listener.accept());
            let mut beside = Lanes::new(vec![(dialed.unwrap(), accepted.unwrap())]);
            let (mut chat, echo) = tokio::join!(client2.dial("chat"), chat_listener.accept());
            spawn_echo(echo.unwrap());
            let chatter = tokio::spawn(async move {
                let chat = chat.as_mut().unwrap();
                loop {
                    ping_pong(chat, 1).await;
                }
            });
            raw.round(WAN_BYTES / 2).await;
            chan.round(WAN_BYTES / 2).await;
            yam.round(WAN_BYTES / 2).await;
            beside.round(WAN_BYTES / 2).await;
            let (mut raw_t, mut chan_t, mut yam_t, mut beside_t) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..WAN_ROUNDS {
                let start = Instant::now();
                raw.round(WAN_BYTES).await;
                raw_t.push(start.elapsed().as_secs_f64());
                let start = Instant::now();
                chan.round(WAN_BYTES).await;
                chan_t.push(start.elapsed().as_secs_f64());
                let start = Instant::now();
                yam.round(WAN_BYTES).await;
                yam_t.push(start.elapsed().as_secs_f64());
                let start = Instant::now();
                beside.round(WAN_BYTES).await;
                beside_t.push(start.elapsed().as_secs_f64());
            }
            chatter.abort();
            (
                median(&raw_t),
                median(&chan_t),
                median(&yam_t),
                median(&beside_t),
            )
        });
        let mbps = |t: f64| WAN_BYTES as f64 / t / 1e6;
        lines.push(format!(
            "{:<24} {:>8.1} MB/s {:>8.1} MB/s {:>7.2}x {:>8.1} MB/s {:>7.2}x",
            format!("wan/{rtt_ms}ms/1"),
            mbps(raw_t),
            mbps(chan_t),
            raw_t / chan_t,
            mbps(yam_t),
            raw_t / yam_t,
        ));
        lines.push(format!(
            "  (netchan's channel beside a channel exchanging 64-byte messages: {:.1} MB/s, {:.2}x)",
            mbps(beside_t),
            raw_t / beside_t,
        ));
    }
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
    println!("\nnetchan-mux and the yamux crate vs raw TCP, rotating rounds in this run (medians)");
    println!(
        "{:<24} {:>13} {:>13} {:>8} {:>13} {:>8} {:>9}",
        "benchmark", "raw tcp", "netchan", "ratio", "yamux crate", "ratio", "cpu ratio"
    );
    for line in lines {
        println!("{line}");
    }
    println!("(bulk, wan: throughput / raw; rtt: round trip / raw; cpu ratio: netchan's ratio");
    println!(
        " computed from process CPU time instead of wall time; wan: median of {WAN_ROUNDS} rounds)"
    );
}

/// Whether the summary line `name` should run: all of them, unless `NETCHAN_BENCH_ONLY` names
/// a part of the lines wanted (`rtt/current_thread`, `bulk/8`, `multi_thread`, `wan`, ...);
/// `NETCHAN_BENCH_FAIRNESS_ONLY` names the `rtt-beside-bulk` lines.
fn wanted(name: &str) -> bool {
    let only = std::env::var("NETCHAN_BENCH_ONLY").ok().or_else(|| {
        std::env::var_os("NETCHAN_BENCH_FAIRNESS_ONLY").map(|_| "rtt-beside-bulk".to_owned())
    });
    only.is_none_or(|only| name.contains(only.as_str()))
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
        if wanted(&format!("rtt-beside-bulk/{flavour}")) {
            lines.extend(fairness_summary(flavour));
        }
    }
    if std::env::var_os("NETCHAN_BENCH_NO_WAN").is_none() && wanted("wan") {
        lines.extend(wan_summary());
    }
    print_summary(&lines);
}
