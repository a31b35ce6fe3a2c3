//! netchan-rpc over a conn type that zero-fills every read buffer it is
//! offered, as netchan-mux channels do (tokio-util's `Compat` around a
//! futures-io stream): loopback TCP wrapped twice in `Compat`, on the
//! serving side and on the calling side.
//!
//! Two workloads: sequential 32-byte calls (latency) and calls returning
//! 1 MiB (MB/s), with raw TCP numbers from the same run for scale. The
//! frame reader's read spans decide how much each read clears; this bench
//! shows what that costs.
//!
//! Run: `cargo bench -p netchan-rpc --bench zerofill` (`-- --quick` for a
//! fast pass). Prints medians of alternating rounds.

use std::{net::SocketAddr, time::Instant};

use netchan_rpc::{ByteBuf, Client, Server, ServiceDef};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

const BLOB: usize = 1 << 20;

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Loopback TCP behind two `Compat` layers: reads zero-fill what they are
/// offered.
fn zero_filling(tcp: TcpStream) -> impl AsyncRead + AsyncWrite + Send + Unpin + 'static {
    tcp.set_nodelay(true).expect("nodelay");
    tcp.compat().compat()
}

/// Starts a server on its own thread and runtime; returns its address.
fn start_server(wrap: bool) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        current_thread().block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            let mut server = Server::new();
            let blob = ByteBuf::from(vec![7u8; BLOB]);
            server.add(
                ServiceDef::new("B")
                    .unary("echo", |_ctx, s: ByteBuf| async move { Ok(s) })
                    .unary("blob", move |_ctx, ()| {
                        let blob = blob.clone();
                        async move { Ok(blob) }
                    }),
            );
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = if wrap {
                        server.serve(zero_filling(tcp)).await
                    } else {
                        tcp.set_nodelay(true).expect("nodelay");
                        server.serve(tcp).await
                    };
                });
            }
        })
    });
    rx.recv().expect("server address")
}

async fn client(addr: SocketAddr, wrap: bool) -> Client {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    if wrap {
        Client::new(zero_filling(tcp))
    } else {
        tcp.set_nodelay(true).expect("nodelay");
        Client::new(tcp)
    }
}

/// p50 latency of `n` sequential 32-byte calls, in microseconds.
async fn seq(client: &Client, n: usize) -> f64 {
    let msg = ByteBuf::from(vec![1u8; 32]);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let back: ByteBuf = client.call("B.echo", &msg).await.expect("echo");
        lat.push(t.elapsed());
        assert_eq!(back.len(), 32);
    }
    lat.sort();
    lat[n / 2].as_secs_f64() * 1e6
}

/// MB/s of `n` sequential 1 MiB responses.
async fn blob(client: &Client, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let b: ByteBuf = client.call("B.blob", &()).await.expect("blob");
        assert_eq!(b.len(), BLOB);
    }
    (n * BLOB) as f64 / 1e6 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, seq_n, blob_n) = if quick {
        (3, 1_000, 30)
    } else {
        (7, 5_000, 200)
    };
    let rt = current_thread();
    let (plain, wrapped) = (start_server(false), start_server(true));
    let (tcp_client, zf_client) =
        rt.block_on(async { (client(plain, false).await, client(wrapped, true).await) });
    let (mut tcp_lat, mut zf_lat, mut tcp_mb, mut zf_mb) = (vec![], vec![], vec![], vec![]);
    // Warm up both conns (buffers, pools, page faults).
    rt.block_on(async {
        seq(&tcp_client, 200).await;
        seq(&zf_client, 200).await;
        blob(&tcp_client, 10).await;
        blob(&zf_client, 10).await;
    });
    let start = Instant::now();
    for _ in 0..rounds {
        rt.block_on(async {
            tcp_lat.push(seq(&tcp_client, seq_n).await);
            zf_lat.push(seq(&zf_client, seq_n).await);
            tcp_mb.push(blob(&tcp_client, blob_n).await);
            zf_mb.push(blob(&zf_client, blob_n).await);
        });
    }
    let (tcp_lat, zf_lat) = (median(tcp_lat), median(zf_lat));
    let (tcp_mb, zf_mb) = (median(tcp_mb), median(zf_mb));
    println!("== netchan-rpc over a zero-filling conn ({rounds} rounds, medians) ==");
    println!(
        "sequential 32 B p50: rpc over tcp {tcp_lat:.1} us | rpc over zero-filling tcp {zf_lat:.1} us | ratio {:.2}x",
        zf_lat / tcp_lat
    );
    println!(
        "1 MiB responses: rpc over tcp {tcp_mb:.0} MB/s | rpc over zero-filling tcp {zf_mb:.0} MB/s | ratio {:.2}x",
        zf_mb / tcp_mb
    );
    println!("({:.1?} in all)", start.elapsed());
}
