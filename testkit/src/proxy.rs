//! A loopback TCP proxy that simulates a link: one-way delay, a bandwidth limit with a bounded
//! number of bytes in flight, and faults injected at run time (stall one direction, blackhole,
//! change the pace, cut with FIN, reset with RST).
//!
//! These kernels have no `netem` qdisc, so a slow or distant link is built here instead. Each
//! direction of each proxied connection is a *delay line*: a byte read from one side is
//! written to the other no earlier than `delay` later, after it has been serialised at `rate`
//! bytes per second behind the bytes before it. The line stops reading once `in_flight` bytes
//! are inside it, so the sender's socket fills up exactly as it would on a real link whose
//! bandwidth-delay product is that large; a receive window smaller than the product then shows
//! up as lost throughput.
//!
//! ```
//! use netchan_testkit::proxy::{Direction, Link, Proxy};
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let link = Link::delayed(Duration::from_millis(5));
//! let (mut client, mut server, proxy) = Proxy::pair(link).await.unwrap();
//! client.write_all(b"hello").await.unwrap();
//! let mut buf = [0u8; 5];
//! server.read_exact(&mut buf).await.unwrap();
//! assert_eq!(&buf, b"hello");
//! proxy.stall(Direction::Down); // server -> client bytes are held from now on
//! # }
//! ```

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Semaphore},
    task::JoinSet,
    time::Instant,
};

/// The largest read the delay line makes at once, and so the granularity of its timing.
const CHUNK: usize = 64 * 1024;

/// In-flight bound of a line with no rate limit: what it holds before it stops reading.
const UNLIMITED_IN_FLIGHT: usize = 4 * 1024 * 1024;

/// One direction of the proxied connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client that connected to the proxy towards the upstream server.
    Up,
    /// From the upstream server towards the client.
    Down,
}

/// The shape of a simulated link, the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// One-way delay added to every byte. Default: zero.
    pub delay: Duration,
    /// Bandwidth in bytes per second, or `None` for no limit. Default: `None`.
    pub rate: Option<u64>,
    /// Bytes a direction holds before it stops reading from its sender. Default (`None`):
    /// `rate × delay` (the bandwidth-delay product, at least one 64 KiB chunk) when a rate is
    /// set, otherwise 4 MiB.
    pub in_flight: Option<usize>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            delay: Duration::ZERO,
            rate: None,
            in_flight: None,
        }
    }
}

impl Link {
    /// A link with no delay and no rate limit: faults only.
    pub fn ideal() -> Link {
        Link::default()
    }

    /// A link that delays every byte by `one_way`, with no rate limit.
    pub fn delayed(one_way: Duration) -> Link {
        Link {
            delay: one_way,
            ..Link::default()
        }
    }

    /// A wide-area link: round-trip time `rtt` (half of it each way) and `bits_per_sec` of
    /// bandwidth, holding at most its bandwidth-delay product in flight.
    pub fn wan(rtt: Duration, bits_per_sec: u64) -> Link {
        Link {
            delay: rtt / 2,
            rate: Some((bits_per_sec / 8).max(1)),
            in_flight: None,
        }
    }

    /// The in-flight bound this link applies to each direction.
    pub fn in_flight_bound(&self) -> usize {
        if let Some(n) = self.in_flight {
            return n.max(1);
        }
        match self.rate {
            Some(rate) => {
                let bdp = (rate as u128 * self.delay.as_nanos() / 1_000_000_000) as usize;
                bdp.max(CHUNK)
            }
            None => UNLIMITED_IN_FLIGHT,
        }
    }
}

/// What one direction does with the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    /// Bytes are held (not written) while set; the sender is pushed back once the line is full.
    stalled: bool,
    /// Bytes are read and thrown away: the sender sees a live link that delivers nothing.
    blackhole: bool,
    /// The current pace in bytes per second (`None`: no limit).
    rate: Option<u64>,
}

/// How every connection of the proxy is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Open,
    /// Both sockets are shut down with a FIN, after nothing more is forwarded.
    Cut,
    /// Both sockets are closed with an RST (`SO_LINGER` of zero).
    Reset,
}

struct Controls {
    up: watch::Sender<Flow>,
    down: watch::Sender<Flow>,
    ending: watch::Sender<Ending>,
}

impl Controls {
    fn flow(&self, dir: Direction) -> &watch::Sender<Flow> {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// A running proxy on a loopback port; see the [module docs](self).
///
/// Dropping it stops accepting and ends every proxied connection (their sockets close).
pub struct Proxy {
    addr: SocketAddr,
    controls: Arc<Controls>,
    accepted: Arc<Mutex<usize>>,
    /// Owns the accept loop, and through it every connection: dropped with the proxy.
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("addr", &self.addr).finish()
    }
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards each accepted connection to `upstream`
    /// through `link`.
    pub async fn start(upstream: SocketAddr, link: Link) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let flow = Flow {
            stalled: false,
            blackhole: false,
            rate: link.rate,
        };
        let controls = Arc::new(Controls {
            up: watch::Sender::new(flow),
            down: watch::Sender::new(flow),
            ending: watch::Sender::new(Ending::Open),
        });
        let accepted = Arc::new(Mutex::new(0));
        let mut tasks = JoinSet::new();
        let (c, a) = (controls.clone(), accepted.clone());
        tasks.spawn(accept_loop(listener, upstream, link, c, a));
        Ok(Proxy {
            addr,
            controls,
            accepted,
            _tasks: tasks,
        })
    }

    /// A connected pair of loopback sockets (client, server) whose traffic crosses a new
    /// proxy with `link`. Both sockets have `TCP_NODELAY` set.
    pub async fn pair(link: Link) -> io::Result<(TcpStream, TcpStream, Proxy)> {
        let server_listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Proxy::start(server_listener.local_addr()?, link).await?;
        let (client, server) =
            tokio::join!(TcpStream::connect(proxy.addr()), server_listener.accept());
        let (client, (server, _)) = (client?, server?);
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok((client, server, proxy))
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().expect("proxy counter lock")
    }

    /// Holds every byte travelling in `dir` until [`resume`](Self::resume): the line fills,
    /// then the sender's socket does, as with a peer that stopped reading.
    pub fn stall(&self, dir: Direction) {
        self.controls.flow(dir).send_modify(|f| f.stalled = true);
    }

    /// Undoes [`stall`](Self::stall) and [`blackhole`](Self::blackhole) for `dir`.
    pub fn resume(&self, dir: Direction) {
        self.controls.flow(dir).send_modify(|f| {
            f.stalled = false;
            f.blackhole = false;
        });
    }

    /// Reads and discards every byte travelling in `dir` from now on: the connection stays
    /// open and the sender is never pushed back, but nothing arrives.
    pub fn blackhole(&self, dir: Direction) {
        self.controls.flow(dir).send_modify(|f| f.blackhole = true);
    }

    /// Blackholes both directions: a peer that froze or vanished without closing.
    pub fn blackhole_both(&self) {
        self.blackhole(Direction::Up);
        self.blackhole(Direction::Down);
    }

    /// Sets the pace of `dir` to `bytes_per_sec` (`None`: no limit) from the next chunk on.
    pub fn pace(&self, dir: Direction, bytes_per_sec: Option<u64>) {
        self.controls
            .flow(dir)
            .send_modify(|f| f.rate = bytes_per_sec.map(|r| r.max(1)));
    }

    /// Ends every proxied connection with a FIN in both directions, dropping what is still
    /// in flight. New connections are still accepted.
    pub fn cut(&self) {
        self.controls.ending.send_replace(Ending::Cut);
    }

    /// Ends every proxied connection with an RST on both sides. New connections are still
    /// accepted.
    pub fn reset(&self) {
        self.controls.ending.send_replace(Ending::Reset);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    link: Link,
    controls: Arc<Controls>,
    accepted: Arc<Mutex<usize>>,
) {
    // Connections end when their sockets do or when the proxy is dropped (this set with it).
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let Ok((client, _)) = res else { continue };
                *accepted.lock().expect("proxy counter lock") += 1;
                conns.spawn(proxy_conn(client, upstream, link, controls.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn proxy_conn(client: TcpStream, upstream: SocketAddr, link: Link, controls: Arc<Controls>) {
    // A connection accepted after a cut or reset starts open.
    let mut ending = controls.ending.subscribe();
    ending.mark_unchanged();
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let client_std = client.into_std();
    let server_std = server.into_std();
    let (Ok(client_std), Ok(server_std)) = (client_std, server_std) else {
        return;
    };
    // Keep clones for a reset: SO_LINGER 0 then close sends an RST.
    let (Ok(client_keep), Ok(server_keep)) = (client_std.try_clone(), server_std.try_clone())
    else {
        return;
    };
    let (Ok(client), Ok(server)) = (
        TcpStream::from_std(client_std),
        TcpStream::from_std(server_std),
    ) else {
        return;
    };
    // `io::split`, not `into_split`: an owned write half sends a FIN when dropped, which
    // would show a reset as a clean end.
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(server);
    let mut lines = JoinSet::new();
    lines.spawn(delay_line(
        client_r,
        server_w,
        link,
        controls.up.subscribe(),
    ));
    lines.spawn(delay_line(
        server_r,
        client_w,
        link,
        controls.down.subscribe(),
    ));
    loop {
        tokio::select! {
            joined = lines.join_next() => {
                if joined.is_none() {
                    return;
                }
            }
            changed = ending.changed() => {
                if changed.is_err() {
                    return;
                }
                let end = *ending.borrow_and_update();
                match end {
                    Ending::Open => continue,
                    Ending::Cut => {
                        lines.abort_all();
                        for s in [&client_keep, &server_keep] {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    Ending::Reset => {
                        lines.abort_all();
                        for s in [client_keep, server_keep] {
                            if let Ok(s) = TcpStream::from_std(s) {
                                // Deprecated because a non-zero linger blocks the thread on
                                // drop; a zero linger closes at once, with the RST we want.
                                #[allow(deprecated)]
                                let _ = s.set_linger(Some(Duration::ZERO));
                                drop(s);
                            }
                        }
                    }
                }
                // Wait for the aborted halves to drop their sockets, so the close happens.
                while lines.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// One direction: reads from `from`, holds each chunk until its delivery time, writes to `to`.
async fn delay_line(
    mut from: ReadHalf<TcpStream>,
    mut to: WriteHalf<TcpStream>,
    link: Link,
    mut flow: watch::Receiver<Flow>,
) {
    let bound = link.in_flight_bound();
    let room = Arc::new(Semaphore::new(bound));
    // Bounded by `room`: at most `bound` bytes sit in this queue (plus one chunk being read).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_room = room.clone();
    let mut reader_flow = flow.clone();
    let reader = async move {
        let mut tx_end = Instant::now();
        loop {
            let mut buf = vec![0u8; CHUNK.min(bound)];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            let current = *reader_flow.borrow_and_update();
            if current.blackhole {
                continue;
            }
            buf.truncate(n);
            // Serialisation at the current rate behind the bytes before, then propagation.
            tx_end = tx_end.max(now);
            if let Some(rate) = current.rate {
                tx_end += Duration::from_nanos((n as u128 * 1_000_000_000 / rate as u128) as u64);
            }
            let Ok(permits) = reader_room.acquire_many(n as u32).await else {
                return;
            };
            permits.forget();
            if tx.send((tx_end + link.delay, buf)).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            loop {
                let current = *flow.borrow_and_update();
                if current.blackhole {
                    break;
                }
                if !current.stalled {
                    if to.write_all(&chunk).await.is_err() {
                        return;
                    }
                    break;
                }
                if flow.changed().await.is_err() {
                    return;
                }
            }
            room.add_permits(chunk.len());
        }
        // The sender closed its side: pass the FIN on.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::within;

    async fn read_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_fin_passes_through() {
        let (mut c, mut s, proxy) = Proxy::pair(Link::ideal()).await.unwrap();
        c.write_all(b"up").await.unwrap();
        assert_eq!(within(10, "up", read_n(&mut s, 2)).await.unwrap(), b"up");
        s.write_all(b"down").await.unwrap();
        assert_eq!(
            within(10, "down", read_n(&mut c, 4)).await.unwrap(),
            b"down"
        );
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within(10, "fin", s.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(proxy.accepted(), 1);
    }

    #[tokio::test]
    async fn delay_holds_each_byte_for_the_one_way_time() {
        let link = Link::delayed(Duration::from_millis(40));
        let (mut c, mut s, _proxy) = Proxy::pair(link).await.unwrap();
        let start = std::time::Instant::now();
        c.write_all(b"x").await.unwrap();
        within(10, "delayed byte", read_n(&mut s, 1)).await.unwrap();
        // A lower bound only: a loaded machine may add time, never remove it.
        assert!(start.elapsed() >= Duration::from_millis(40));
    }

    #[tokio::test]
    async fn a_large_transfer_arrives_intact_through_a_paced_line() {
        let link = Link {
            delay: Duration::from_millis(2),
            rate: Some(64 * 1024 * 1024),
            in_flight: None,
        };
        let (mut c, mut s, _proxy) = Proxy::pair(link).await.unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&sent).await.unwrap();
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        within(30, "bulk", s.read_to_end(&mut got)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "payload corrupted");
    }

    #[tokio::test]
    async fn a_stalled_direction_holds_bytes_until_resumed() {
        let (mut c, mut s, proxy) = Proxy::pair(Link::ideal()).await.unwrap();
        proxy.stall(Direction::Up);
        c.write_all(b"held").await.unwrap();
        // The other direction still flows while this one is stalled.
        s.write_all(b"free").await.unwrap();
        assert_eq!(
            within(10, "down", read_n(&mut c, 4)).await.unwrap(),
            b"free"
        );
        let mut one = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(100), s.read(&mut one)).await;
        assert!(early.is_err(), "a stalled byte was delivered");
        proxy.resume(Direction::Up);
        assert_eq!(
            within(10, "resumed", read_n(&mut s, 4)).await.unwrap(),
            b"held"
        );
    }

    #[tokio::test]
    async fn a_stalled_line_pushes_back_on_the_sender_once_full() {
        let link = Link {
            in_flight: Some(64 * 1024),
            ..Link::ideal()
        };
        let (mut c, _s, proxy) = Proxy::pair(link).await.unwrap();
        proxy.stall(Direction::Up);
        // The line holds 64 KiB and the kernel buffers some MiB; 64 MiB can never fit.
        let big = vec![0u8; 64 << 20];
        let write = tokio::time::timeout(Duration::from_secs(2), c.write_all(&big)).await;
        assert!(write.is_err(), "64 MiB were absorbed by a stalled line");
    }

    #[tokio::test]
    async fn a_blackholed_direction_drops_bytes_but_keeps_the_link_open() {
        let (mut c, mut s, proxy) = Proxy::pair(Link::ideal()).await.unwrap();
        proxy.blackhole(Direction::Up);
        c.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        let mut one = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(100), s.read(&mut one)).await;
        assert!(early.is_err(), "a blackholed byte was delivered");
        s.write_all(b"ok").await.unwrap();
        assert_eq!(within(10, "down", read_n(&mut c, 2)).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn cut_ends_both_sides_with_eof() {
        let (mut c, mut s, proxy) = Proxy::pair(Link::ideal()).await.unwrap();
        proxy.cut();
        let mut buf = Vec::new();
        assert_eq!(
            within(10, "client eof", c.read_to_end(&mut buf))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            within(10, "server eof", s.read_to_end(&mut buf))
                .await
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn reset_ends_both_sides_with_connection_reset() {
        let (mut c, mut s, proxy) = Proxy::pair(Link::ideal()).await.unwrap();
        proxy.reset();
        let mut buf = [0u8; 1];
        for (side, sock) in [("client", &mut c), ("server", &mut s)] {
            let err = within(10, side, sock.read(&mut buf)).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{side}: {err}");
        }
    }

    #[test]
    fn wan_in_flight_is_the_bandwidth_delay_product() {
        let link = Link::wan(Duration::from_millis(50), 1_000_000_000);
        // 125 MB/s × 25 ms one way.
        assert_eq!(link.in_flight_bound(), 3_125_000);
        assert_eq!(Link::ideal().in_flight_bound(), UNLIMITED_IN_FLIGHT);
    }
}
