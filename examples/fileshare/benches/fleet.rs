//! A fleet of hubs on a real etcd, measured: `cargo bench -p fileshare --bench fleet --
//! [OPTIONS]`.
//!
//! One etcd member on loopback (`netchan_testkit::etcd`, Debian's `etcd-server`), real `share
//! hub --etcd … --fleet-token …` processes, and in-process clients written by hand
//! (tests/common/raw.rs), except where a real client's reconnection is what is measured.
//!
//! 1. **routed**: an exporter (a real `share --serve`) on hub B; a get of `--mib` MiB by a
//!    reader on hub A (routed through A and B), by a reader on hub B (local), and a raw TCP
//!    copy of the same bytes, in a rotating order within each of `--runs` runs. Every byte is
//!    checked. Prints the medians, the medians of the per-run ratios, the hubs' CPU per GiB
//!    and hub A's peak RSS.
//! 2. **joins**: `--clients` clients connect, say hello and publish all at once (each from its
//!    own loopback address, retrying with backoff when the hub sheds it, as a real client
//!    does): first against one hub of a fleet, then spread over `--hubs` hubs of the same
//!    etcd. Prints the join latency p50/p99/max, the retries, when every hub lists every
//!    client, and each hub's RSS growth per client it holds (bound: 64 KiB, checked on hubs
//!    holding at least 300 clients).
//! 3. **sessions**: hub A and `--sessions` other hubs, one client on each; a client of A asks
//!    each other hub's client for a listing (routed), so A opens one hub-to-hub session per
//!    other hub. Prints A's RSS growth per session (the first one, which also warms up the
//!    routing code, left out) and the growth of the hub at the other end.
//! 4. **failover**: `--failover-clients` real `share --serve` clients that know hubs A and B
//!    join A; A is killed with SIGKILL; B's log says when A's lease expired (the names left)
//!    and when each client published again on B. For each TTL of `--ttls` (seconds),
//!    `--failover-runs` times.
//!
//! Options (defaults): `--only routed|joins|sessions|failover` (all), `--mib 256`, `--runs 3`,
//! `--clients 1000`, `--hubs 3`, `--sessions 8`, `--failover-clients 10`, `--failover-runs 2`,
//! `--ttls 10,2`. Exits non-zero when a check fails (bytes, joins, listings, memory bound).

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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use netchan_mux::Session;
use netchan_rpc as rpc;
use netchan_testkit::etcd::Cluster;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::{HubClient, ListReq, PeerPath, PeerRead, PublishReq, EXPORT_CHANNEL};
use support::{cpu_time, share, status_kib, Proc};

/// The fleet's shared secret in this bench.
const TOKEN: &str = "fleet bench secret";

/// Bound on any single step (a join with its retries, a get, a listing to converge).
const STEP: Duration = Duration::from_secs(60);

/// The bound the hub's memory per idle client must stay under, in KiB.
const IDLE_CLIENT_BOUND_KIB: f64 = 64.0;

/// The fewest clients on one hub for which that bound is checked.
const BOUND_CHECKED_FROM: usize = 300;

/// Options, from the command line.
#[derive(Clone)]
struct Opts {
    only: Option<String>,
    mib: usize,
    runs: usize,
    clients: usize,
    hubs: usize,
    sessions: usize,
    failover_clients: usize,
    failover_runs: usize,
    ttls: Vec<u64>,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        Some(
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{name} needs a value"))
                .clone(),
        )
    };
    let number = |name: &str, default: usize| -> usize {
        value(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} needs a number, not {v:?}"))
        })
    };
    let o = Opts {
        only: value("--only"),
        mib: number("--mib", 256),
        runs: number("--runs", 3).max(1),
        clients: number("--clients", 1000).max(1),
        hubs: number("--hubs", 3).max(1),
        sessions: number("--sessions", 8).max(2),
        failover_clients: number("--failover-clients", 10).max(1),
        failover_runs: number("--failover-runs", 2).max(1),
        ttls: value("--ttls")
            .unwrap_or_else(|| "10,2".into())
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("--ttls needs seconds, not {t:?}"))
            })
            .collect(),
    };
    if let Some(only) = &o.only {
        assert!(
            ["routed", "joins", "sessions", "failover"].contains(&only.as_str()),
            "--only takes routed, joins, sessions or failover, not {only:?}"
        );
    }
    o
}

/// What a hub's log said, and when this process read it: the moments each name joined this
/// hub, joined another hub, and left another hub. One entry per name and kind, so it holds no
/// more than the names the bench uses.
#[derive(Default)]
struct Events {
    joined_here: HashMap<String, Instant>,
    joined_elsewhere: HashMap<String, Instant>,
    left_elsewhere: HashMap<String, Instant>,
}

impl Events {
    /// Notes the first time `line` reports a join or departure.
    fn note(&mut self, line: &str, at: Instant) {
        let name_after = |marker: &str| {
            line.split_once(marker)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .map(|n| n.trim_matches('"').to_owned())
        };
        let (map, name) = if let Some(n) = name_after(" joined peer=") {
            (&mut self.joined_here, n)
        } else if let Some(n) = name_after("joined on another hub peer=") {
            (&mut self.joined_elsewhere, n)
        } else if let Some(n) = name_after("left on another hub peer=") {
            (&mut self.left_elsewhere, n)
        } else {
            return;
        };
        map.entry(name).or_insert(at);
    }
}

/// A `share hub` of the fleet.
struct FleetHub {
    proc: Proc,
    addr: SocketAddr,
    /// Its log's joins and departures, when it was started with `log`.
    events: Arc<Mutex<Events>>,
}

impl FleetHub {
    /// Starts `share hub` on free loopback ports (clients and other hubs), in the fleet of
    /// `etcd`, as `id`, with lease TTL `ttl` seconds (the hub's default when `None`). With
    /// `log` its info log is read into [`FleetHub::events`]; without it the hub logs warnings
    /// only, to nowhere.
    fn start(etcd: &str, id: &str, ttl: Option<u64>, log: bool) -> FleetHub {
        FleetHub::spawn(Some((etcd, id)), ttl, log)
    }

    /// A hub on its own, without etcd: the baseline.
    fn alone() -> FleetHub {
        FleetHub::spawn(None, None, false)
    }

    fn spawn(fleet: Option<(&str, &str)>, ttl: Option<u64>, log: bool) -> FleetHub {
        let mut cmd = share();
        cmd.args(["hub", "--listen", "127.0.0.1:0"]);
        if let Some((etcd, id)) = fleet {
            cmd.args(["--etcd", etcd, "--hub-id", id]).args([
                "--fleet-token",
                TOKEN,
                "--fleet-listen",
                "127.0.0.1:0",
            ]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if log { Stdio::piped() } else { Stdio::null() });
        if let Some(ttl) = ttl {
            cmd.args(["--lease-ttl", &ttl.to_string()]);
        }
        if log {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().expect("start share hub");
        let events = Arc::new(Mutex::new(Events::default()));
        if let Some(stderr) = child.stderr.take() {
            let events = events.clone();
            // Ends when the hub closes stderr (it exits); reads every line so the hub never
            // blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at = Instant::now();
                    events
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .note(&line, at);
                }
            });
        }
        let mut stdout = BufReader::new(child.stdout.take().expect("hub stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the hub's first line");
        let addr = line
            .trim()
            .strip_prefix("hub listening on ")
            .unwrap_or_else(|| panic!("unexpected hub output {line:?}"))
            .parse()
            .expect("hub address");
        // Drains whatever else the hub prints, until it exits.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        FleetHub {
            proc: Proc(child),
            addr,
            events,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS")
    }
}

/// One join by hand (connect from `source`, hello, serve an empty export, peer link,
/// publish), every failure returned rather than panicking: a hub at its admission cap sheds
/// connections, and the caller tries again.
async fn try_join(
    hub: SocketAddr,
    source: IpAddr,
    name: &str,
) -> Result<(Session, HubClient), String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind((source, 0).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = sock
        .connect(hub)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let session = Session::client(tcp, netchan_mux::Config::default());
    match hello_and_publish(&session, name).await {
        Ok(hub) => Ok((session, hub)),
        Err(e) => {
            // The tasks serving this session hold it open: end it, so that the hub lets go of
            // whatever this attempt got before the next one.
            let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
            Err(e)
        }
    }
}

/// The hello, an empty export, the peer link and the publish on a new `session`.
async fn hello_and_publish(session: &Session, name: &str) -> Result<HubClient, String> {
    let mut hello = session
        .dial("fileshare.hello")
        .await
        .map_err(|e| format!("hello channel: {e}"))?;
    hello
        .write_all(&raw::hello_bytes(b""))
        .await
        .map_err(|e| format!("hello: {e}"))?;
    hello.flush().await.map_err(|e| format!("hello: {e}"))?;
    let mut head = [0u8; 3];
    hello
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("hello answer: {e}"))?;
    let mut text = vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]]))];
    hello
        .read_exact(&mut text)
        .await
        .map_err(|e| format!("hello answer: {e}"))?;
    if head[0] != 0 {
        return Err(format!("hello refused: {}", String::from_utf8_lossy(&text)));
    }
    let mut exports = session
        .listen(EXPORT_CHANNEL)
        .map_err(|e| format!("export listener: {e}"))?;
    let server = raw::no_files_server();
    tokio::spawn(async move {
        // Ends with the session.
        while let Ok(ch) = exports.accept().await {
            let server = server.clone();
            tokio::spawn(async move { server.serve(ch).await });
        }
    });
    let link = rpc::Peer::connect(session, raw::no_files_server())
        .await
        .map_err(|e| format!("peer link: {e}"))?;
    let hub = HubClient::new(link.client().clone());
    {
        let session = session.clone();
        // Keeps the link for the session's life.
        tokio::spawn(async move {
            session.closed().await;
            drop(link);
        });
    }
    hub.publish(PublishReq { name: name.into() })
        .await
        .map_err(|s| format!("publish: {s}"))?;
    Ok(hub)
}

/// A joined client and what its join took.
struct Joined {
    name: String,
    session: Session,
    hub: HubClient,
    took: Duration,
    attempts: u32,
    /// Why the failed attempts failed.
    errors: Vec<String>,
}

/// [`try_join`] until it succeeds, with a real client's backoff (200 ms doubling, jitter in
/// the upper half, at most 2 s here), for at most [`STEP`]. `took` runs from the first
/// attempt to the publish's answer.
async fn join(hub: SocketAddr, source: IpAddr, name: String) -> Result<Joined, String> {
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut errors = Vec::new();
    // Bounded by STEP.
    loop {
        attempts += 1;
        let last = match tokio::time::timeout(STEP, try_join(hub, source, &name)).await {
            Ok(Ok((session, hub))) => {
                return Ok(Joined {
                    name,
                    session,
                    hub,
                    took: start.elapsed(),
                    attempts,
                    errors,
                })
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {STEP:?}"),
        };
        if start.elapsed() > STEP {
            return Err(format!(
                "{name}: {last} (after {attempts} attempts; the first failed with {:?})",
                errors.first()
            ));
        }
        errors.push(last);
        let full = Duration::from_millis(200)
            .saturating_mul(1 << attempts.min(4))
            .min(Duration::from_secs(2));
        let delay = full.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        tokio::time::sleep(delay).await;
    }
}

/// Gets `path` of `peer` through `hub`, checking every byte against `want`; the time taken.
async fn get(hub: &HubClient, peer: &str, path: &str, want: &[u8]) -> Result<Duration, String> {
    let start = Instant::now();
    let req = PeerRead {
        peer: peer.into(),
        path: path.into(),
        offset: 0,
    };
    let mut stream = hub.read(req).await.map_err(|s| format!("read: {s}"))?;
    let mut pos = 0usize;
    // Bounded by the file's size: the last chunk says eof.
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|s| format!("chunk: {s}"))?;
        if chunk.offset as usize != pos {
            return Err(format!("chunk at {} where {pos} was due", chunk.offset));
        }
        let end = pos + chunk.data.len();
        if end > want.len() || chunk.data[..] != want[pos..end] {
            return Err(format!("bytes {pos}..{end} differ"));
        }
        pos = end;
        if chunk.eof {
            break;
        }
    }
    if pos != want.len() {
        return Err(format!("the get ended at {pos} of {}", want.len()));
    }
    Ok(start.elapsed())
}

/// Copies `data` over one loopback TCP connection and checks it; the time from the first
/// byte written to the last byte read.
async fn raw_copy(data: Arc<Vec<u8>>) -> Result<Duration, String> {
    let (mut client, mut server) = netchan_testkit::tcp_pair().await;
    let start = Instant::now();
    let send = {
        let data = data.clone();
        tokio::spawn(async move {
            client.write_all(&data).await?;
            client.shutdown().await
        })
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut pos = 0usize;
    // Bounded by the data's length (the sender shuts down after it).
    loop {
        let n = server
            .read(&mut buf)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        if pos + n > data.len() || buf[..n] != data[pos..pos + n] {
            return Err(format!("raw bytes {pos}..{} differ", pos + n));
        }
        pos += n;
    }
    let took = start.elapsed();
    send.await
        .map_err(|e| format!("sender: {e}"))?
        .map_err(|e| format!("send: {e}"))?;
    if pos != data.len() {
        return Err(format!("the raw copy ended at {pos} of {}", data.len()));
    }
    Ok(took)
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Polls `hub`'s list (every 50 ms, for at most [`STEP`]) until it holds `n` names starting
/// with `prefix`; the time from `since` when it did.
async fn listed(
    hub: &HubClient,
    prefix: &str,
    n: usize,
    since: Instant,
) -> Result<Duration, String> {
    let deadline = Instant::now() + STEP;
    // Bounded by the deadline.
    loop {
        let names = hub
            .list(ListReq {})
            .await
            .map_err(|s| format!("list: {s}"))?;
        let have = names.iter().filter(|n| n.starts_with(prefix)).count();
        if have >= n {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            return Err(format!("only {have} of {n} {prefix}* names listed"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 1. A routed get against a local get and a raw TCP copy.
async fn routed(etcd: &str, o: &Opts, dir: &Path) -> Result<(), String> {
    let size = o.mib << 20;
    let data: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i % 251) as u8).collect());
    let root = dir.join("routed");
    std::fs::create_dir_all(&root).map_err(|e| format!("temp dir: {e}"))?;
    std::fs::write(root.join("big.bin"), &*data).map_err(|e| format!("write a file: {e}"))?;
    let a = FleetHub::start(etcd, "routed-a", None, false);
    let b = FleetHub::start(etcd, "routed-b", None, false);
    let _exporter = Proc(
        share()
            .args(["--serve", "--name", "near", "--root"])
            .arg(&root)
            .arg(b.addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the exporter: {e}"))?,
    );
    let far = join(a.addr, raw::source(1), "far-reader".into()).await?;
    let near = join(b.addr, raw::source(2), "near-reader".into()).await?;
    // The exporter is on hub B; hub A learns of it through its watch.
    listed(&near.hub, "near", 2, Instant::now()).await?;
    listed(&far.hub, "near", 2, Instant::now()).await?;
    let hwm_before = status_kib(a.pid(), "VmHWM");
    let (mut routed_t, mut local_t, mut raw_t) = (Vec::new(), Vec::new(), Vec::new());
    let (mut vs_local, mut vs_raw) = (Vec::new(), Vec::new());
    let (mut cpu_routed, mut cpu_local) = (Vec::new(), Vec::new());
    let gib = size as f64 / f64::from(1 << 30);
    for run in 0..o.runs {
        let mut times = [Duration::ZERO; 3];
        // Rotating order, so no kind always runs first (cold) or last.
        for k in 0..3 {
            let which = (run + k) % 3;
            let (ca, cb) = (cpu_time(a.pid()), cpu_time(b.pid()));
            times[which] = match which {
                0 => get(&far.hub, "near", "big.bin", &data).await?,
                1 => get(&near.hub, "near", "big.bin", &data).await?,
                _ => raw_copy(data.clone()).await?,
            };
            let spent = (cpu_time(a.pid()) - ca) + (cpu_time(b.pid()) - cb);
            match which {
                0 => cpu_routed.push(secs(spent) / gib),
                1 => cpu_local.push(secs(spent) / gib),
                _ => {}
            }
        }
        let [r, l, w] = times;
        vs_local.push(secs(l) / secs(r));
        vs_raw.push(secs(w) / secs(r));
        routed_t.push(secs(r));
        local_t.push(secs(l));
        raw_t.push(secs(w));
    }
    let rate = |t: f64| o.mib as f64 / t;
    let (r, l, w) = (median_f(routed_t), median_f(local_t), median_f(raw_t));
    println!(
        "routed get, {} MiB, loopback (medians of {} runs, every byte checked):",
        o.mib, o.runs
    );
    println!(
        "  through two hubs {r:.3} s ({:.0} MiB/s); through one hub {l:.3} s ({:.0} MiB/s); \
         raw TCP {w:.3} s ({:.0} MiB/s)",
        rate(r),
        rate(l),
        rate(w)
    );
    println!(
        "  routed/local throughput {:.2}; routed/raw throughput {:.2} (medians of per-run ratios)",
        median_f(vs_local),
        median_f(vs_raw)
    );
    println!(
        "  hubs' CPU (user+system, both hubs) per GiB: routed {:.2} core-s, local {:.2} core-s; \
         hub A's peak RSS {} KiB before the gets, {} KiB after",
        median_f(cpu_routed),
        median_f(cpu_local),
        hwm_before,
        status_kib(a.pid(), "VmHWM")
    );
    Ok(())
}

/// One wave of `n` clients joining all at once, client `i` on `hubs[i % hubs.len()]`, named
/// `prefix` + i. Prints what it took and each hub's memory per client; keeps the clients until
/// it has measured.
async fn wave(label: &str, hubs: &[FleetHub], n: usize, prefix: &str) -> Result<(), String> {
    let rss_before: Vec<u64> = hubs.iter().map(FleetHub::rss_kib).collect();
    let cpu_before: Vec<Duration> = hubs.iter().map(|h| cpu_time(h.pid())).collect();
    let own_cpu_before = cpu_time(std::process::id());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = hubs[i % hubs.len()].addr;
        let name = format!("{prefix}{i}");
        tasks.spawn(async move { (i, join(addr, raw::source(100 + i), name).await) });
    }
    let mut joined: Vec<Option<Joined>> = (0..n).map(|_| None).collect();
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.map_err(|e| format!("join task: {e}"))? {
            (i, Ok(j)) => joined[i] = Some(j),
            (_, Err(e)) => failures.push(e),
        }
    }
    let all_joined = start.elapsed();
    if !failures.is_empty() {
        for f in failures.iter().take(3) {
            println!("  failed join: {f}");
        }
        return Err(format!(
            "{} of {n} joins failed, first: {}",
            failures.len(),
            failures[0]
        ));
    }
    let own_cpu = secs(cpu_time(std::process::id()) - own_cpu_before);
    let joined: Vec<Joined> = joined.into_iter().flatten().collect();
    let cpu: Vec<f64> = hubs
        .iter()
        .zip(&cpu_before)
        .map(|(h, c)| secs(cpu_time(h.pid()) - *c))
        .collect();
    // Every hub lists every client: a client of each hub asks (client h is on hub h).
    let mut everywhere = Ok(Duration::ZERO);
    for (h, client) in joined.iter().take(hubs.len()).enumerate() {
        match listed(&client.hub, prefix, n, start).await {
            Ok(t) => everywhere = everywhere.map(|e| e.max(t)),
            Err(e) => {
                everywhere = Err(format!("hub {h}: {e}"));
                break;
            }
        }
    }
    let mut took: Vec<f64> = joined.iter().map(|j| secs(j.took) * 1e3).collect();
    took.sort_by(f64::total_cmp);
    let retried = joined.iter().filter(|j| j.attempts > 1).count();
    // Why attempts failed, by kind (the message up to its first detail), most frequent first.
    let mut why: HashMap<String, usize> = HashMap::new();
    for e in joined.iter().flat_map(|j| &j.errors) {
        let kind: String = e.chars().take_while(|c| *c != '"' && *c != '(').collect();
        *why.entry(kind.trim().to_owned()).or_default() += 1;
    }
    let mut why: Vec<(String, usize)> = why.into_iter().collect();
    why.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    let attempts: u32 = joined.iter().map(|j| j.attempts).sum();
    println!("{label}: {n} clients joining at once (connect, hello, publish)");
    println!(
        "  join latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; all joined in {:.2} s; listed on \
         every hub after {}; {retried} clients retried ({} attempts in all)",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        percentile(&took, 1.0),
        secs(all_joined),
        match &everywhere {
            Ok(t) => format!("{:.2} s", secs(*t)),
            Err(e) => format!("never ({e})"),
        },
        attempts
    );
    for (kind, count) in why.iter().take(4) {
        println!("  failed attempts: {count} x {kind}");
    }
    if everywhere.is_err() {
        // Which published names are missing from the list, and how their joins went.
        let names = joined[0].hub.list(ListReq {}).await.unwrap_or_default();
        let missing: Vec<&Joined> = joined.iter().filter(|j| !names.contains(&j.name)).collect();
        println!(
            "  {} published names not listed by hub 0, e.g.:",
            missing.len()
        );
        for j in missing.iter().take(3) {
            println!(
                "    {} after {} attempts (session {}): {:?}",
                j.name,
                j.attempts,
                if j.session.is_closed() {
                    "closed"
                } else {
                    "open"
                },
                j.errors
            );
        }
    }
    println!(
        "  CPU for the joins: hubs {:.2} core-s in all, this process (the clients) {own_cpu:.2} core-s",
        cpu.iter().sum::<f64>()
    );
    // Let the hubs finish what the joins started (watch events, buffers returned) before
    // reading their memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut over = Vec::new();
    for (h, hub) in hubs.iter().enumerate() {
        let here = joined.len() / hubs.len() + usize::from(h < joined.len() % hubs.len());
        let after = hub.rss_kib();
        let per = after.saturating_sub(rss_before[h]) as f64 / here.max(1) as f64;
        // Below a few hundred clients, what any hub grows by at first (allocator arenas,
        // code paths used once) is a large part of the share per client.
        let checked = here >= BOUND_CHECKED_FROM;
        println!(
            "  hub {h}: {here} clients; RSS {} -> {after} KiB: {per:.1} KiB per client \
             (bound {IDLE_CLIENT_BOUND_KIB} KiB{}); CPU {:.2} core-s",
            rss_before[h],
            if checked {
                ""
            } else {
                ", not checked with so few"
            },
            cpu[h]
        );
        if checked && per > IDLE_CLIENT_BOUND_KIB {
            over.push(h);
        }
    }
    drop(joined);
    everywhere?;
    if over.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "hubs {over:?} hold more than {IDLE_CLIENT_BOUND_KIB} KiB per client"
        ))
    }
}

/// 2. Publish latency and memory per client: one hub of a fleet, then a fleet of hubs.
async fn joins(etcd: &str, o: &Opts) -> Result<(), String> {
    {
        let hub = FleetHub::alone();
        wave(
            "one hub on its own (no etcd)",
            std::slice::from_ref(&hub),
            o.clients,
            "solo",
        )
        .await?;
    }
    {
        let hub = FleetHub::start(etcd, "joins-one", None, false);
        wave(
            "one hub of a fleet",
            std::slice::from_ref(&hub),
            o.clients,
            "one",
        )
        .await?;
    }
    let hubs: Vec<FleetHub> = (0..o.hubs)
        .map(|h| FleetHub::start(etcd, &format!("joins-{h}"), None, false))
        .collect();
    wave(
        &format!("fleet of {} hubs", o.hubs),
        &hubs,
        o.clients,
        "all",
    )
    .await
}

/// 3. Memory per hub-to-hub session.
async fn sessions(etcd: &str, o: &Opts) -> Result<(), String> {
    let a = FleetHub::start(etcd, "sessions-a", None, false);
    let others: Vec<FleetHub> = (0..o.sessions)
        .map(|i| FleetHub::start(etcd, &format!("sessions-{i}"), None, false))
        .collect();
    let mut clients = Vec::new();
    for (i, hub) in others.iter().enumerate() {
        clients.push(join(hub.addr, raw::source(10 + i), format!("x{i}")).await?);
    }
    let reader = join(a.addr, raw::source(1), "reader".into()).await?;
    listed(&reader.hub, "x", o.sessions, Instant::now()).await?;
    // One routed call per other hub: the listing of its client's (empty) export, which that
    // client refuses with `not_found`, passed back unchanged.
    let route = |i: usize| {
        let hub = reader.hub.clone();
        async move {
            let req = PeerPath {
                peer: format!("x{i}"),
                path: String::new(),
            };
            match hub.ls(req).await {
                Err(s) if s.code() == rpc::Code::NotFound => Ok(()),
                other => Err(format!("routed ls of x{i}: {other:?}")),
            }
        }
    };
    route(0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_before = a.rss_kib();
    let others_before: Vec<u64> = others.iter().map(FleetHub::rss_kib).collect();
    for i in 1..o.sessions {
        route(i).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_after = a.rss_kib();
    let grown: Vec<f64> = others
        .iter()
        .zip(&others_before)
        .skip(1)
        .map(|(h, b)| h.rss_kib().saturating_sub(*b) as f64)
        .collect();
    let n = o.sessions - 1;
    println!(
        "hub-to-hub sessions: hub A opens one to each of {} other hubs",
        o.sessions
    );
    println!(
        "  hub A's RSS {a_before} -> {a_after} KiB over {n} more sessions: {:.1} KiB per session; \
         the accepting hub's RSS grew by {:.1} KiB (median of {n})",
        a_after.saturating_sub(a_before) as f64 / n as f64,
        median_f(grown)
    );
    drop(clients);
    Ok(())
}

/// 4. From `kill -9` of a hub to its clients published on another.
fn failover(etcd: &str, o: &Opts, dir: &Path) -> Result<(), String> {
    let root = dir.join("failover");
    std::fs::create_dir_all(&root).map_err(|e| format!("temp dir: {e}"))?;
    for &ttl in &o.ttls {
        let (mut expiry, mut back, mut after_free) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..o.failover_runs {
            let mut a = FleetHub::start(etcd, &format!("fo-a-{ttl}-{run}"), Some(ttl), false);
            let b = FleetHub::start(etcd, &format!("fo-b-{ttl}-{run}"), Some(ttl), true);
            // Both hubs hold their lease (a probe client publishes on each) before the
            // clients come, so that none is refused by A and lands on B.
            let probe = |hub: SocketAddr, name: String| {
                tokio::runtime::Handle::current().block_on(async move {
                    let probe = join(hub, raw::source(1), name).await?;
                    probe.session.close().await;
                    Ok::<_, String>(())
                })
            };
            probe(a.addr, format!("fo{ttl}r{run}probe-a"))?;
            probe(b.addr, format!("fo{ttl}r{run}probe-b"))?;
            let hubs = format!("{},{}", a.addr, b.addr);
            let names: Vec<String> = (0..o.failover_clients)
                .map(|i| format!("fo{ttl}r{run}c{i}"))
                .collect();
            let client = |name: &str| -> Result<Proc, String> {
                Ok(Proc(
                    share()
                        .args(["--serve", "--name", name, "--root"])
                        .arg(&root)
                        .arg(&hubs)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .map_err(|e| format!("start a client: {e}"))?,
                ))
            };
            let mut clients = names
                .iter()
                .map(|n| client(n))
                .collect::<Result<Vec<_>, _>>()?;
            // Every client joined hub A (the first it knows), as hub B's watch says. A
            // client that exited, or that went on to hub B because A refused it for a
            // moment, is started again.
            let deadline = Instant::now() + STEP;
            // Bounded by the deadline.
            loop {
                let mut events = b.events.lock().unwrap_or_else(|e| e.into_inner());
                let mut waiting = 0;
                for (i, name) in names.iter().enumerate() {
                    if events.joined_elsewhere.contains_key(name) {
                        continue;
                    }
                    waiting += 1;
                    let exited = matches!(clients[i].0.try_wait(), Ok(Some(_)));
                    if exited || events.joined_here.remove(name).is_some() {
                        clients[i] = client(name)?;
                    }
                }
                drop(events);
                if waiting == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{waiting} clients did not join hub A within {STEP:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            a.proc.0.kill().map_err(|e| format!("kill hub A: {e}"))?;
            let killed = Instant::now();
            wait_for(&b.events, &names, STEP, |e| &e.joined_here)
                .map_err(|e| format!("publishing again on hub B: {e}"))?;
            let events = b.events.lock().unwrap_or_else(|e| e.into_inner());
            for name in &names {
                let joined = events.joined_here[name];
                back.push(secs(joined - killed));
                // Hub B saw the name leave when hub A's lease expired (or a moment before
                // the client took it back, when the two land together).
                if let Some(left) = events.left_elsewhere.get(name) {
                    expiry.push(secs(left.saturating_duration_since(killed)));
                    after_free.push(secs(joined.saturating_duration_since(*left)));
                }
            }
            drop(events);
            drop(clients);
        }
        let stats = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            format!(
                "median {:.2} s, min {:.2} s, max {:.2} s",
                percentile(&v, 0.5),
                percentile(&v, 0.0),
                percentile(&v, 1.0)
            )
        };
        let samples = back.len();
        println!(
            "failover, lease TTL {ttl} s: {} clients x {} runs, hub A killed with SIGKILL",
            o.failover_clients, o.failover_runs
        );
        println!(
            "  kill -> published again on hub B: {} ({samples} clients)",
            stats(back)
        );
        println!(
            "  kill -> hub B saw the name leave (lease expired): {}",
            stats(expiry)
        );
        println!(
            "  name left -> published again on hub B (the client's reconnection backoff): {}",
            stats(after_free)
        );
    }
    Ok(())
}

/// Waits (polling every 20 ms, at most `within`) until `which` of `events` holds every name.
fn wait_for(
    events: &Mutex<Events>,
    names: &[String],
    within: Duration,
    which: impl Fn(&Events) -> &HashMap<String, Instant>,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    // Bounded by the deadline.
    loop {
        let missing = {
            let events = events.lock().unwrap_or_else(|e| e.into_inner());
            names
                .iter()
                .filter(|n| !which(&events).contains_key(*n))
                .count()
        };
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{missing} of {} clients missing after {within:?}",
                names.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let o = parse_opts();
    let wants = |mode: &str| o.only.as_deref().is_none_or(|m| m == mode);
    let dir = std::env::temp_dir().join(format!("share-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let failures = rt.block_on(async {
        let etcd = Cluster::start(1).await;
        let url = etcd.endpoint(0);
        println!("etcd 1 member at {url}");
        let mut failures = Vec::new();
        if wants("routed") {
            if let Err(e) = routed(&url, &o, &dir).await {
                failures.push(format!("routed: {e}"));
            }
        }
        if wants("joins") {
            if let Err(e) = joins(&url, &o).await {
                failures.push(format!("joins: {e}"));
            }
        }
        if wants("sessions") {
            if let Err(e) = sessions(&url, &o).await {
                failures.push(format!("sessions: {e}"));
            }
        }
        if wants("failover") {
            // Blocks on processes and logs: off the runtime's workers, which keep reading
            // etcd's log meanwhile.
            let (url, dir) = (url.clone(), dir.clone());
            let o = o.clone();
            match tokio::task::spawn_blocking(move || failover(&url, &o, &dir)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("failover: {e}")),
                Err(e) => failures.push(format!("failover: {e}")),
            }
        }
        drop(etcd);
        failures
    });
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("fleet bench: {f}");
        }
        std::process::exit(1);
    }
}
