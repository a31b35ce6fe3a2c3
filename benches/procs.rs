//! netchan against raw TCP with client and server in separate processes, as users run them.
//!
//! Every sample starts a fresh server process (this same binary, re-executed with
//! `NETCHAN_PROCS_SERVE` naming what to serve), connects to it over loopback and times one
//! workload from this process. Raw TCP samples and netchan samples alternate within each
//! round. Both processes run tokio's multi-thread runtime with its default workers; netchan
//! uses the default `Config` and links made by `netchan::connect`/`netchan::bind`, and raw
//! TCP sockets get the same options (`netchan::mux::tune_tcp`: `TCP_NODELAY` and the unsent
//! cap).
//!
//! The rows:
//! - one channel carrying 1 GiB in 64 KiB writes, vs one TCP connection;
//! - eight channels of one session (1 GiB between them), vs eight TCP connections;
//! - 64-byte ping-pong on a channel, vs on TCP;
//! - sequential 32-byte unary calls over a channel and straight on TCP, vs one raw round trip;
//! - 32-byte unary calls with 64 in flight on one conn (over a channel and on TCP), vs a
//!   pipelined raw echo keeping 64 messages outstanding;
//! - sequential calls answered with 1 MiB (over a channel and on TCP), vs a raw 1 MiB reply;
//! - a call whose handler calls back into the caller before answering (two round trips
//!   over one session, `Peer`), vs one raw 32-byte round trip.
//!
//! Each row prints raw TCP, netchan and the ratio (throughput rows: netchan / raw, higher is
//! better; latency rows: netchan / raw, lower is better), each the median over the rounds.
//!
//! Run: `cargo bench -p netchan --bench procs` (a few minutes at most); add `-- --quick` for a
//! short pass, `-- --rounds N` to change the number of rounds, and `NETCHAN_PROCS_ONLY=word`
//! to run only the rows whose name contains `word`. For profiling, `-- --variant LABEL` runs only
//! that variant of each row (`raw`, `channel`, `tcp`...), with no raw samples in between.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use netchan::{
    mux::{tune_tcp, Session},
    rpc::{ByteBuf, Client, Context, Peer, Server, ServiceDef, Status},
    BindOptions,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// Set in a server process: what it serves (a [`Serve`] name).
const SERVE_VAR: &str = "NETCHAN_PROCS_SERVE";
const WRITE: usize = 64 << 10;
const BLOB: usize = 1 << 20;
const IN_FLIGHT: usize = 64;
const CHANNELS: usize = 8;
/// The longest one sample may take before the bench gives up on it.
const SAMPLE_BOUND: Duration = Duration::from_secs(120);

/// What a server process serves.
#[derive(Clone, Copy, Debug)]
enum Serve {
    /// TCP: reads each connection to its end, then answers with the byte count (u64).
    RawSink,
    /// TCP: echoes each message of `n` bytes, one read and one write per message.
    RawEcho(usize),
    /// TCP: answers each 8-byte request with 1 MiB.
    RawBlob,
    /// netchan: `RawSink` on every channel dialled to "sink".
    MuxSink,
    /// netchan: `RawEcho` on every channel dialled to "echo".
    MuxEcho(usize),
    /// netchan-rpc (`Bench.echo`, `Bench.blob`) on every channel dialled to "rpc".
    RpcMux,
    /// netchan-rpc straight on each TCP connection.
    RpcTcp,
    /// A `Peer` on each session whose `Hub.ask` calls `Dev.ping` back on the caller.
    Peer,
}

impl Serve {
    fn to_arg(self) -> String {
        match self {
            Serve::RawEcho(n) => format!("raw-echo:{n}"),
            Serve::MuxEcho(n) => format!("mux-echo:{n}"),
            other => format!("{other:?}"),
        }
    }

    fn from_arg(arg: &str) -> Option<Serve> {
        let size = |s: &str| s.parse().ok();
        Some(match arg {
            "RawSink" => Serve::RawSink,
            "RawBlob" => Serve::RawBlob,
            "MuxSink" => Serve::MuxSink,
            "RpcMux" => Serve::RpcMux,
            "RpcTcp" => Serve::RpcTcp,
            "Peer" => Serve::Peer,
            _ => match arg.split_once(':')? {
                ("raw-echo", n) => Serve::RawEcho(size(n)?),
                ("mux-echo", n) => Serve::MuxEcho(size(n)?),
                _ => return None,
            },
        })
    }
}

// ---- the server process ------------------------------------------------------------------

fn bench_server() -> Server {
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
    server
}

async fn sink<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) -> std::io::Result<()> {
    let mut buf = vec![0u8; WRITE];
    let mut total = 0u64;
    loop {
        match io.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    io.write_all(&total.to_be_bytes()).await?;
    io.shutdown().await
}

async fn echo<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, size: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; size];
    while io.read_exact(&mut buf).await.is_ok() {
        io.write_all(&buf).await?;
    }
    Ok(())
}

async fn blob(mut io: TcpStream) -> std::io::Result<()> {
    let blob = vec![7u8; BLOB];
    let mut req = [0u8; 8];
    while io.read_exact(&mut req).await.is_ok() {
        io.write_all(&blob).await?;
    }
    Ok(())
}

/// Serves each channel dialled to `name` on every session with `serve`.
fn on_channels<F, Fut>(name: &'static str, serve: F) -> BindOptions
where
    F: Fn(netchan::mux::Conn) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    BindOptions::default().on_session(move |session| {
        let Ok(mut listener) = session.listen(name) else {
            return;
        };
        let serve = serve.clone();
        tokio::spawn(async move {
            while let Ok(channel) = listener.accept().await {
                tokio::spawn(serve(channel));
            }
        });
    })
}

/// The server process: binds a loopback port, prints it on stdout and serves until stdin
/// closes (the bench process ending the sample, or dying).
fn run_server(serve: Serve) {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Runtime::new().expect("server runtime");
    rt.block_on(async move {
        let tcp = || async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            println!("{}", listener.local_addr().expect("local addr"));
            listener
        };
        let mux = |options: BindOptions| async move {
            let listener = netchan::bind("127.0.0.1:0", options).await.expect("bind");
            let addr = listener.local_addr().to_string();
            println!("{}", addr.trim_start_matches("tcp://"));
            listener
        };
        match serve {
            Serve::RawSink | Serve::RawEcho(_) | Serve::RawBlob | Serve::RpcTcp => {
                let listener = tcp().await;
                let server = bench_server();
                while let Ok((conn, _)) = listener.accept().await {
                    tune_tcp(&conn).expect("tune");
                    let server = server.clone();
                    tokio::spawn(async move {
                        let _ = match serve {
                            Serve::RawSink => sink(conn).await,
                            Serve::RawEcho(n) => echo(conn, n).await,
                            Serve::RawBlob => blob(conn).await,
                            _ => server.serve(conn).await.map_err(std::io::Error::other),
                        };
                    });
                }
            }
            Serve::MuxSink => {
                let mut listener = mux(on_channels("sink", |c| async move {
                    let _ = sink(c).await;
                }))
                .await;
                let mut sessions = Vec::new();
                while let Ok(session) = listener.accept().await {
                    sessions.push(session);
                }
            }
            Serve::MuxEcho(n) => {
                let mut listener = mux(on_channels("echo", move |c| async move {
                    let _ = echo(c, n).await;
                }))
                .await;
                let mut sessions = Vec::new();
                while let Ok(session) = listener.accept().await {
                    sessions.push(session);
                }
            }
            Serve::RpcMux => {
                let server = bench_server();
                let mut listener = mux(on_channels("rpc", move |c| {
                    let server = server.clone();
                    async move {
                        let _ = server.serve(c).await;
                    }
                }))
                .await;
                let mut sessions = Vec::new();
                while let Ok(session) = listener.accept().await {
                    sessions.push(session);
                }
            }
            Serve::Peer => {
                let mut listener = mux(BindOptions::default()).await;
                let mut peers = Vec::new();
                while let Ok(session) = listener.accept().await {
                    let mut hub = Server::new();
                    hub.add(ServiceDef::new("Hub").unary(
                        "ask",
                        |ctx: Context, b: ByteBuf| async move {
                            let back: ByteBuf = ctx.callback()?.call("Dev.ping", &b).await?;
                            Ok::<_, Status>(back)
                        },
                    ));
                    if let Ok(peer) = Peer::connect(&session, hub).await {
                        peers.push(peer);
                    }
                }
            }
        }
    });
}

// ---- the bench process: starting servers -----------------------------------------------

/// A server process for one sample; killed (if still running) when dropped.
struct ServerProc {
    child: Child,
    addr: String,
}

impl ServerProc {
    fn start(serve: Serve) -> ServerProc {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .env(SERVE_VAR, serve.to_arg())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's address");
        assert!(
            !line.trim().is_empty(),
            "the server process printed no address"
        );
        ServerProc {
            child,
            addr: line.trim().to_string(),
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // Closing stdin tells the server to exit; a server that does not is killed.
        drop(self.child.stdin.take());
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn raw(addr: &str) -> TcpStream {
    let conn = TcpStream::connect(addr).await.expect("connect");
    tune_tcp(&conn).expect("tune");
    conn
}

async fn session(addr: &str) -> Session {
    netchan::connect(addr, Default::default())
        .await
        .expect("connect")
}

// ---- the workloads ------------------------------------------------------------------------

/// Sizes of one run.
#[derive(Clone, Copy)]
struct Sizes {
    bulk: u64,
    round_trips: u64,
    pipelined: u64,
    blobs: u64,
}

/// Writes `total` bytes in 64 KiB writes, half-closes and waits for the byte count.
async fn send_bulk<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, total: u64) {
    let chunk = vec![1u8; WRITE];
    let mut left = total;
    while left > 0 {
        let n = left.min(WRITE as u64) as usize;
        io.write_all(&chunk[..n]).await.expect("write");
        left -= n as u64;
    }
    io.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    io.read_exact(&mut count).await.expect("read the count");
    assert_eq!(
        u64::from_be_bytes(count),
        total,
        "the server counted every byte"
    );
}

/// Bytes per second over `conns` links, `total` bytes between them.
async fn bulk<T>(conns: Vec<T>, total: u64) -> f64
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let links = conns.len() as u64;
    let each = total / links;
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|io| tokio::spawn(send_bulk(io, each)))
        .collect();
    for t in tasks {
        t.await.expect("sender");
    }
    (each * links) as f64 / start.elapsed().as_secs_f64()
}

/// Seconds per round trip of `size`-byte messages.
async fn ping_pong<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, size: usize, n: u64) -> f64 {
    let msg = vec![3u8; size];
    let mut buf = vec![0u8; size];
    for _ in 0..n / 10 {
        io.write_all(&msg).await.expect("write");
        io.read_exact(&mut buf).await.expect("read");
    }
    let start = Instant::now();
    for _ in 0..n {
        io.write_all(&msg).await.expect("write");
        io.read_exact(&mut buf).await.expect("read");
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Messages per second through a naive pipelined echo with 64 outstanding: one write per
/// message, one read per reply.
async fn raw_pipelined(io: TcpStream, n: u64) -> f64 {
    let (mut rd, mut wr) = io.into_split();
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let w = Arc::clone(&window);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let msg = [2u8; 32];
        for _ in 0..n {
            w.acquire().await.expect("permit").forget();
            wr.write_all(&msg).await.expect("write");
        }
        wr
    });
    let mut buf = [0u8; 32];
    for _ in 0..n {
        rd.read_exact(&mut buf).await.expect("read");
        window.add_permits(1);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(writer.await.expect("writer"));
    rate
}

/// Seconds per sequential 32-byte call.
async fn calls_sequential(client: Client, n: u64) -> f64 {
    tokio::spawn(async move {
        let msg = ByteBuf::from(vec![1u8; 32]);
        for _ in 0..n / 10 {
            let _: ByteBuf = client.call("Bench.echo", &msg).await.expect("call");
        }
        let start = Instant::now();
        for _ in 0..n {
            let r: ByteBuf = client.call("Bench.echo", &msg).await.expect("call");
            assert_eq!(r.len(), 32);
        }
        start.elapsed().as_secs_f64() / n as f64
    })
    .await
    .expect("caller")
}

/// Calls per second, 64 tasks calling on one client until `n` calls are done.
async fn calls_in_flight(client: Client, n: u64) -> f64 {
    let left = Arc::new(AtomicU64::new(n));
    let start = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, left) = (client.clone(), Arc::clone(&left));
            tokio::spawn(async move {
                let msg = ByteBuf::from(vec![2u8; 32]);
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let r: ByteBuf = client.call("Bench.echo", &msg).await.expect("call");
                    assert_eq!(r.len(), 32);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("caller");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Bytes per second of sequential 1 MiB replies, raw.
async fn raw_blobs(mut io: TcpStream, n: u64) -> f64 {
    let mut buf = vec![0u8; BLOB];
    io.write_all(&[0u8; 8]).await.expect("write");
    io.read_exact(&mut buf).await.expect("read");
    let start = Instant::now();
    for _ in 0..n {
        io.write_all(&[0u8; 8]).await.expect("write");
        io.read_exact(&mut buf).await.expect("read");
    }
    (n * BLOB as u64) as f64 / start.elapsed().as_secs_f64()
}

/// Bytes per second of sequential calls answered with 1 MiB.
async fn call_blobs(client: Client, n: u64) -> f64 {
    tokio::spawn(async move {
        let _: ByteBuf = client.call("Bench.blob", &()).await.expect("call");
        let start = Instant::now();
        for _ in 0..n {
            let r: ByteBuf = client.call("Bench.blob", &()).await.expect("call");
            assert_eq!(r.len(), BLOB);
        }
        (n * BLOB as u64) as f64 / start.elapsed().as_secs_f64()
    })
    .await
    .expect("caller")
}

/// Seconds per call that the server answers after calling back into the caller.
async fn calls_with_callback(session: Session, n: u64) -> f64 {
    let mut dev = Server::new();
    dev.add(ServiceDef::new("Dev").unary("ping", |_ctx, b: ByteBuf| async move { Ok(b) }));
    let peer = Peer::connect(&session, dev).await.expect("peer");
    let client = peer.client().clone();
    let secs = tokio::spawn(async move {
        let msg = ByteBuf::from(vec![4u8; 32]);
        for _ in 0..n / 10 {
            let _: ByteBuf = client.call("Hub.ask", &msg).await.expect("call");
        }
        let start = Instant::now();
        for _ in 0..n {
            let r: ByteBuf = client.call("Hub.ask", &msg).await.expect("call");
            assert_eq!(r.len(), 32);
        }
        start.elapsed().as_secs_f64() / n as f64
    })
    .await
    .expect("caller");
    drop(peer);
    secs
}

/// One measurement of one variant: a fresh server process, a connection, the workload.
#[derive(Clone, Copy, Debug)]
enum Workload {
    RawBulk { conns: usize },
    MuxBulk { channels: usize },
    RawPingPong(usize),
    MuxPingPong(usize),
    RpcSequential { over_mux: bool },
    RawPipelined,
    RpcInFlight { over_mux: bool },
    RawBlobs,
    RpcBlobs { over_mux: bool },
    Callback,
}

impl Workload {
    fn serve(self) -> Serve {
        match self {
            Workload::RawBulk { .. } => Serve::RawSink,
            Workload::MuxBulk { .. } => Serve::MuxSink,
            Workload::RawPingPong(n) => Serve::RawEcho(n),
            Workload::MuxPingPong(n) => Serve::MuxEcho(n),
            Workload::RawPipelined => Serve::RawEcho(32),
            Workload::RawBlobs => Serve::RawBlob,
            Workload::RpcSequential { over_mux }
            | Workload::RpcInFlight { over_mux }
            | Workload::RpcBlobs { over_mux } => {
                if over_mux {
                    Serve::RpcMux
                } else {
                    Serve::RpcTcp
                }
            }
            Workload::Callback => Serve::Peer,
        }
    }

    async fn run(self, addr: &str, sizes: Sizes) -> f64 {
        let rpc_client = |over_mux| async move {
            if over_mux {
                let session = session(addr).await;
                let channel = session.dial("rpc").await.expect("dial");
                (Client::new(channel), Some(session))
            } else {
                (Client::new(raw(addr).await), None)
            }
        };
        match self {
            Workload::RawBulk { conns } => {
                let mut links = Vec::new();
                for _ in 0..conns {
                    links.push(raw(addr).await);
                }
                bulk(links, sizes.bulk).await
            }
            Workload::MuxBulk { channels } => {
                let session = session(addr).await;
                let mut links = Vec::new();
                for _ in 0..channels {
                    links.push(session.dial("sink").await.expect("dial"));
                }
                bulk(links, sizes.bulk).await
            }
            Workload::RawPingPong(size) => {
                ping_pong(raw(addr).await, size, sizes.round_trips).await
            }
            Workload::MuxPingPong(size) => {
                let session = session(addr).await;
                let channel = session.dial("echo").await.expect("dial");
                ping_pong(channel, size, sizes.round_trips).await
            }
            Workload::RpcSequential { over_mux } => {
                let (client, _session) = rpc_client(over_mux).await;
                calls_sequential(client, sizes.round_trips).await
            }
            Workload::RawPipelined => raw_pipelined(raw(addr).await, sizes.pipelined).await,
            Workload::RpcInFlight { over_mux } => {
                let (client, _session) = rpc_client(over_mux).await;
                calls_in_flight(client, sizes.pipelined).await
            }
            Workload::RawBlobs => raw_blobs(raw(addr).await, sizes.blobs).await,
            Workload::RpcBlobs { over_mux } => {
                let (client, _session) = rpc_client(over_mux).await;
                call_blobs(client, sizes.blobs).await
            }
            Workload::Callback => calls_with_callback(session(addr).await, sizes.round_trips).await,
        }
    }
}

// ---- the table ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    /// Bytes per second (higher is better).
    Throughput,
    /// Operations per second (higher is better).
    Rate,
    /// Seconds per operation (lower is better).
    Latency,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Throughput => format!("{:.2} GB/s", v / 1e9),
            Unit::Rate => format!("{:.0}k/s", v / 1e3),
            Unit::Latency => format!("{:.1} us", v * 1e6),
        }
    }
}

struct Row {
    name: &'static str,
    unit: Unit,
    raw: Workload,
    /// The netchan variants, each with its label.
    netchan: Vec<(&'static str, Workload)>,
    target: &'static str,
}

fn rows() -> Vec<Row> {
    use Workload::*;
    vec![
        Row {
            name: "one channel, 1 GiB in 64 KiB writes",
            unit: Unit::Throughput,
            raw: RawBulk { conns: 1 },
            netchan: vec![("channel", MuxBulk { channels: 1 })],
            target: ">= 0.9x",
        },
        Row {
            name: "eight channels vs eight TCP conns",
            unit: Unit::Throughput,
            raw: RawBulk { conns: CHANNELS },
            netchan: vec![("channels", MuxBulk { channels: CHANNELS })],
            target: ">= 0.85x",
        },
        Row {
            name: "64 B ping-pong",
            unit: Unit::Latency,
            raw: RawPingPong(64),
            netchan: vec![("channel", MuxPingPong(64))],
            target: "<= 1.1x",
        },
        Row {
            name: "32 B unary, sequential (vs raw RTT)",
            unit: Unit::Latency,
            raw: RawPingPong(32),
            netchan: vec![
                ("channel", RpcSequential { over_mux: true }),
                ("tcp", RpcSequential { over_mux: false }),
            ],
            target: "<= 1.2x",
        },
        Row {
            name: "32 B unary, 64 in flight (vs pipelined echo)",
            unit: Unit::Rate,
            raw: RawPipelined,
            netchan: vec![
                ("channel", RpcInFlight { over_mux: true }),
                ("tcp", RpcInFlight { over_mux: false }),
            ],
            target: ">= 1.4x",
        },
        Row {
            name: "1 MiB responses, sequential",
            unit: Unit::Throughput,
            raw: RawBlobs,
            netchan: vec![
                ("channel", RpcBlobs { over_mux: true }),
                ("tcp", RpcBlobs { over_mux: false }),
            ],
            target: ">= 0.9x",
        },
        Row {
            name: "call + nested callback (vs one raw RTT)",
            unit: Unit::Latency,
            raw: RawPingPong(32),
            netchan: vec![("peer", Callback)],
            target: "<= 2.3x",
        },
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sample(rt: &tokio::runtime::Runtime, workload: Workload, sizes: Sizes) -> f64 {
    let server = ServerProc::start(workload.serve());
    let value = rt.block_on(async {
        tokio::time::timeout(SAMPLE_BOUND, workload.run(&server.addr, sizes))
            .await
            .unwrap_or_else(|_| panic!("{workload:?} took longer than {SAMPLE_BOUND:?}"))
    });
    drop(server);
    value
}

fn main() {
    if let Ok(serve) = std::env::var(SERVE_VAR) {
        let serve = Serve::from_arg(&serve).expect("a known NETCHAN_PROCS_SERVE value");
        run_server(serve);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(if quick { 3 } else { 5 });
    let sizes = if quick {
        Sizes {
            bulk: 256 << 20,
            round_trips: 2_000,
            pipelined: 20_000,
            blobs: 100,
        }
    } else {
        Sizes {
            bulk: 1 << 30,
            round_trips: 10_000,
            pipelined: 100_000,
            blobs: 500,
        }
    };
    let only = std::env::var("NETCHAN_PROCS_ONLY").ok();
    let profile = args
        .iter()
        .position(|a| a == "--variant")
        .and_then(|i| args.get(i + 1).cloned());
    let rt = tokio::runtime::Runtime::new().expect("bench runtime");
    println!(
        "== netchan vs raw TCP, separate processes ({rounds} rounds, medians; {} MiB bulk) ==",
        sizes.bulk >> 20
    );
    for row in rows() {
        if only.as_deref().is_some_and(|w| !row.name.contains(w)) {
            continue;
        }
        if let Some(label) = &profile {
            // One variant alone, for profilers: no raw samples in between.
            let workload = std::iter::once(("raw", row.raw))
                .chain(row.netchan.iter().copied())
                .find(|(l, _)| l == label);
            if let Some((_, workload)) = workload {
                let v: Vec<f64> = (0..rounds).map(|_| sample(&rt, workload, sizes)).collect();
                println!("{:<46} {label} {:>10}", row.name, row.unit.show(median(v)));
            }
            continue;
        }
        let mut raw = Vec::new();
        let mut ours: Vec<Vec<f64>> = vec![Vec::new(); row.netchan.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); row.netchan.len()];
        for _ in 0..rounds {
            for (i, (_, workload)) in row.netchan.iter().enumerate() {
                let r = sample(&rt, row.raw, sizes);
                let n = sample(&rt, *workload, sizes);
                raw.push(r);
                ours[i].push(n);
                ratios[i].push(n / r);
            }
        }
        let raw = median(raw);
        let mut line = format!("{:<46} raw {:>10}", row.name, row.unit.show(raw));
        for (i, (label, _)) in row.netchan.iter().enumerate() {
            let n = median(ours[i].clone());
            let ratio = median(ratios[i].clone());
            line += &format!(" | {label} {:>10} {:.2}x", row.unit.show(n), ratio);
        }
        line += &format!(" (target {})", row.target);
        println!("{line}");
    }
}
