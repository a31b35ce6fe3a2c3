//! netchan-rpc against raw TCP, measured in the same run on loopback.
//!
//! Three workloads, each with its raw-TCP floor:
//! (a) sequential 32-byte calls vs a raw 32-byte write/read round trip
//!     (latency median and p99);
//! (b) 64 concurrent 32-byte calls on one conn vs a naive pipelined raw echo
//!     (64 messages outstanding, one `write`/`read` per message);
//! (c) calls returning 1 MiB vs a raw 1 MiB response (MB/s);
//! (d) the same 1 MiB calls over a netchan-mux channel (one TCP session) vs
//!     rpc straight over TCP.
//!
//! The serving side runs on its own thread with its own current-thread
//! runtime, the calling side on the main thread with another, so each side
//! has a core, as two processes would. Criterion reports the usual
//! statistics; a summary with the ratios used in `docs/performance.md`
//! (median of several alternating rounds) is printed at the end.
//!
//! Run: `cargo bench -p netchan-rpc` (add `-- --quick` for a fast pass;
//! `NETCHAN_BENCH_SUMMARY_ONLY=1` skips criterion and prints only the summary).

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput};
use netchan_rpc::{ByteBuf, Client, Server, ServiceDef};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    sync::Semaphore,
};

const MSG: usize = 32;
const BLOB: usize = 1 << 20;
const IN_FLIGHT: usize = 64;

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

struct Addrs {
    raw_echo: SocketAddr,
    raw_blob: SocketAddr,
    rpc: SocketAddr,
    /// rpc on the channel "rpc" of a mux session per TCP connection.
    rpc_mux: SocketAddr,
}

/// Starts the three servers on a dedicated thread and runtime.
fn start_servers() -> Addrs {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = current_thread();
        rt.block_on(async move {
            let raw_echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let raw_blob = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let rpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let rpc_mux = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(Addrs {
                raw_echo: raw_echo.local_addr().unwrap(),
                raw_blob: raw_blob.local_addr().unwrap(),
                rpc: rpc.local_addr().unwrap(),
                rpc_mux: rpc_mux.local_addr().unwrap(),
            })
            .unwrap();
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = raw_echo.accept().await {
                    conn.set_nodelay(true).unwrap();
                    tokio::spawn(async move {
                        let mut buf = [0u8; MSG];
                        while conn.read_exact(&mut buf).await.is_ok() {
                            if conn.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            tokio::spawn(async move {
                let blob = vec![7u8; BLOB];
                while let Ok((mut conn, _)) = raw_blob.accept().await {
                    conn.set_nodelay(true).unwrap();
                    let blob = blob.clone();
                    tokio::spawn(async move {
                        let mut req = [0u8; 8];
                        while conn.read_exact(&mut req).await.is_ok() {
                            if conn.write_all(&blob).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            let blob = ByteBuf::from(vec![7u8; BLOB]);
            let mut server = Server::new();
            server.add(
                ServiceDef::new("Bench")
                    .unary("echo", |_ctx, b: ByteBuf| async move { Ok(b) })
                    .unary("blob", move |_ctx, ()| {
                        let blob = blob.clone();
                        async move { Ok(blob) }
                    }),
            );
            let mux_server = server.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = rpc_mux.accept().await {
                    conn.set_nodelay(true).unwrap();
                    let builder = netchan_mux::Session::builder(
                        conn,
                        netchan_mux::Mode::Server,
                        netchan_mux::Config::default(),
                    );
                    let mut listener = builder.listen("rpc").unwrap();
                    let _session = builder.start();
                    let server = mux_server.clone();
                    tokio::spawn(async move {
                        while let Ok(channel) = listener.accept().await {
                            let server = server.clone();
                            tokio::spawn(async move { server.serve(channel).await });
                        }
                    });
                }
            });
            while let Ok((conn, _)) = rpc.accept().await {
                conn.set_nodelay(true).unwrap();
                let server = server.clone();
                tokio::spawn(async move { server.serve(conn).await });
            }
        });
    });
    rx.recv().expect("servers started")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let conn = TcpStream::connect(addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    conn
}

// ---- (a) sequential ------------------------------------------------------

async fn raw_seq(conn: &mut TcpStream, n: u64, lat: &mut Vec<Duration>) -> Duration {
    let msg = [1u8; MSG];
    let mut buf = [0u8; MSG];
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        conn.write_all(&msg).await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        lat.push(t.elapsed());
    }
    start.elapsed()
}

/// Runs in a spawned task, as application code would (calls made straight
/// from `block_on` pay an extra scheduler park per call in tokio's
/// current-thread runtime).
async fn rpc_seq(client: &Client, n: u64, lat: &mut Vec<Duration>) -> Duration {
    let client = client.clone();
    let (took, mut l) = tokio::spawn(async move {
        let msg = ByteBuf::from(vec![1u8; MSG]);
        let mut lat = Vec::with_capacity(n as usize);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let r: ByteBuf = client.call("Bench.echo", &msg).await.unwrap();
            black_box(r);
            lat.push(t.elapsed());
        }
        (start.elapsed(), lat)
    })
    .await
    .unwrap();
    lat.append(&mut l);
    took
}

// ---- (b) 64 in flight ------------------------------------------------------

/// Naive pipelined echo: keeps 64 messages outstanding; one write per
/// message, one read per reply. Returns messages completed.
async fn raw_pipelined(addr: SocketAddr, n: u64) -> Duration {
    let (mut rd, mut wr) = connect(addr).await.into_split();
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let w = Arc::clone(&window);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let msg = [2u8; MSG];
        for _ in 0..n {
            w.acquire().await.unwrap().forget();
            wr.write_all(&msg).await.unwrap();
        }
        wr
    });
    let mut buf = [0u8; MSG];
    for _ in 0..n {
        rd.read_exact(&mut buf).await.unwrap();
        window.add_permits(1);
    }
    let took = start.elapsed();
    drop(writer.await.unwrap());
    took
}

/// 64 tasks calling concurrently on one client until `n` calls are done.
async fn rpc_concurrent(client: &Client, n: u64) -> Duration {
    let left = Arc::new(AtomicU64::new(n));
    let start = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, left) = (client.clone(), Arc::clone(&left));
            tokio::spawn(async move {
                let msg = ByteBuf::from(vec![2u8; MSG]);
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let r: ByteBuf = client.call("Bench.echo", &msg).await.unwrap();
                    black_box(r);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

// ---- (c) 1 MiB responses ---------------------------------------------------

async fn raw_blob(conn: &mut TcpStream, buf: &mut [u8], n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        conn.write_all(&[0u8; 8]).await.unwrap();
        conn.read_exact(buf).await.unwrap();
        black_box(&buf[..]);
    }
    start.elapsed()
}

async fn rpc_blob(client: &Client, n: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let r: ByteBuf = client.call("Bench.blob", &()).await.unwrap();
        assert_eq!(r.len(), BLOB);
        black_box(r);
    }
    start.elapsed()
}

// ---- driver ---------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let addrs = start_servers();
    let rt = current_thread();
    // Like the raw side, each workload gets its own connection.
    let (mut raw_echo, mut raw_blob_conn, client, blob_client, mux_client) = rt.block_on(async {
        let session = netchan_mux::Session::client(
            connect(addrs.rpc_mux).await,
            netchan_mux::Config::default(),
        );
        let channel = session.dial("rpc").await.unwrap();
        (
            connect(addrs.raw_echo).await,
            connect(addrs.raw_blob).await,
            Client::new(connect(addrs.rpc).await),
            Client::new(connect(addrs.rpc).await),
            Client::new(channel),
        )
    });
    let mut blob_buf = vec![0u8; BLOB];
    let quick = std::env::args().any(|a| a == "--quick");

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // Tuning runs can skip criterion and print only the summary's ratios.
    if std::env::var_os("NETCHAN_BENCH_SUMMARY_ONLY").is_none() {
        let mut g = c.benchmark_group("a_sequential_32B");
        g.throughput(Throughput::Elements(1));
        g.bench_function("raw_tcp", |b| {
            b.iter_custom(|n| rt.block_on(raw_seq(&mut raw_echo, n, &mut Vec::new())))
        });
        g.bench_function("rpc", |b| {
            b.iter_custom(|n| rt.block_on(rpc_seq(&client, n, &mut Vec::new())))
        });
        g.finish();
        let mut g = c.benchmark_group("b_64_in_flight_32B");
        g.throughput(Throughput::Elements(1));
        g.bench_function("raw_pipelined_echo", |b| {
            b.iter_custom(|n| rt.block_on(raw_pipelined(addrs.raw_echo, n.max(IN_FLIGHT as u64))))
        });
        g.bench_function("rpc", |b| {
            b.iter_custom(|n| rt.block_on(rpc_concurrent(&client, n)))
        });
        g.finish();
        let mut g = c.benchmark_group("c_1MiB_response");
        g.throughput(Throughput::Bytes(BLOB as u64));
        g.bench_function("raw_tcp", |b| {
            b.iter_custom(|n| rt.block_on(raw_blob(&mut raw_blob_conn, &mut blob_buf, n)))
        });
        g.bench_function("rpc", |b| {
            b.iter_custom(|n| rt.block_on(rpc_blob(&blob_client, n)))
        });
        g.bench_function("rpc_over_mux_channel", |b| {
            b.iter_custom(|n| rt.block_on(rpc_blob(&mux_client, n)))
        });
        g.finish();
    }

    if std::env::args().any(|a| a == "--profile-time") {
        return;
    }
    // Summary: alternating rounds, medians, ratios.
    let rounds = if quick { 1 } else { 5 };
    let seq_n = if quick { 2_000 } else { 10_000 };
    let conc_n = if quick { 20_000 } else { 200_000 };
    let blob_n = if quick { 50 } else { 300 };
    let (mut raw_lat, mut rpc_lat) = (Vec::new(), Vec::new());
    let (mut raw_conc, mut rpc_conc, mut raw_mb, mut rpc_mb) = (vec![], vec![], vec![], vec![]);
    let mut mux_ratio = vec![];
    for _ in 0..rounds {
        rt.block_on(raw_seq(&mut raw_echo, seq_n, &mut raw_lat));
        rt.block_on(rpc_seq(&client, seq_n, &mut rpc_lat));
        let t = rt.block_on(raw_pipelined(addrs.raw_echo, conc_n));
        raw_conc.push(conc_n as f64 / t.as_secs_f64());
        let t = rt.block_on(rpc_concurrent(&client, conc_n));
        rpc_conc.push(conc_n as f64 / t.as_secs_f64());
        let t = rt.block_on(raw_blob(&mut raw_blob_conn, &mut blob_buf, blob_n));
        raw_mb.push((blob_n as f64 * BLOB as f64 / 1e6) / t.as_secs_f64());
        let t = rt.block_on(rpc_blob(&blob_client, blob_n));
        rpc_mb.push((blob_n as f64 * BLOB as f64 / 1e6) / t.as_secs_f64());
        let m = rt.block_on(rpc_blob(&mux_client, blob_n));
        mux_ratio.push(t.as_secs_f64() / m.as_secs_f64());
    }
    raw_lat.sort();
    rpc_lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (raw_p50, raw_p99) = (percentile(&raw_lat, 0.5), percentile(&raw_lat, 0.99));
    let (rpc_p50, rpc_p99) = (percentile(&rpc_lat, 0.5), percentile(&rpc_lat, 0.99));
    let (raw_conc, rpc_conc) = (median(raw_conc), median(rpc_conc));
    let (raw_mb, rpc_mb) = (median(raw_mb), median(rpc_mb));
    println!("\n== netchan-rpc vs raw TCP ({rounds} rounds, medians) ==");
    println!(
        "(a) sequential 32 B: raw p50 {:.1} us p99 {:.1} us | rpc p50 {:.1} us p99 {:.1} us | ratio p50 {:.2}x p99 {:.2}x (target <= 1.6x)",
        us(raw_p50), us(raw_p99), us(rpc_p50), us(rpc_p99),
        us(rpc_p50) / us(raw_p50), us(rpc_p99) / us(raw_p99)
    );
    println!(
        "(b) 64 in flight: raw pipelined echo {:.0}/s | rpc {:.0} calls/s | ratio {:.2}x (target >= 1.0x)",
        raw_conc, rpc_conc, rpc_conc / raw_conc
    );
    println!(
        "(c) 1 MiB responses: raw {:.0} MB/s | rpc {:.0} MB/s | ratio {:.2}x (target >= 0.6x)",
        raw_mb,
        rpc_mb,
        rpc_mb / raw_mb
    );
    println!(
        "(d) 1 MiB responses over a mux channel: {:.2}x rpc straight over TCP (target >= 0.8x)",
        median(mux_ratio)
    );
    c.final_summary();
}
