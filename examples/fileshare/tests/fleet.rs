//! A fleet of real `share hub --etcd` processes on a real etcd (netchan_testkit::etcd):
//! one name space and one list across hubs, three hubs and six clients reading each other,
//! a killed hub's names freed within its lease, and etcd going away for 20 s and coming back.
//! Skipped when etcd is not installed, except under `CI=true`, where they fail instead.
//!
//! The tests block on processes (the `common` helpers), so they run on a multi-threaded
//! runtime whose workers keep reading etcd's logs meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use netchan_testkit::etcd::Cluster;

/// The lease TTL of the hubs in these tests, in seconds.
const TTL_S: u64 = 2;

/// The hub-to-hub secret of these tests' fleets.
const FLEET_TOKEN: &str = "fleet secret";

/// `share hub --etcd … --hub-id ID --lease-ttl 2 --fleet-token …` on ephemeral ports.
fn fleet_hub(etcd: &Cluster, id: &str) -> Hub {
    fleet_hub_with_ttl(etcd, id, TTL_S)
}

/// A hub of the fleet on `etcd` with id `id` and a lease of `ttl` seconds, serving the other
/// hubs on an ephemeral port.
fn fleet_hub_with_ttl(etcd: &Cluster, id: &str, ttl: u64) -> Hub {
    let endpoints = etcd.endpoints().join(",");
    start_hub(&[
        "--etcd",
        &endpoints,
        "--hub-id",
        id,
        "--lease-ttl",
        &ttl.to_string(),
        "--fleet-token",
        FLEET_TOKEN,
        "--fleet-listen",
        "127.0.0.1:0",
    ])
}

/// Waits until `hub` has logged a join (of its own clients or another hub's) for every one
/// of `names`.
fn wait_joined(hub: &mut Hub, names: &[&str]) {
    let mut missing: std::collections::HashSet<&str> = names.iter().copied().collect();
    let deadline = Instant::now() + WAIT;
    // Bounded: each iteration takes one line, within WAIT overall.
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = hub.log.wait_for("joined", left);
        missing.retain(|n| {
            !line.contains(&format!("peer={n} ")) && !line.ends_with(&format!("peer={n}"))
        });
    }
}

/// A scripted client kept running: commands go to its stdin, its output is read line by line.
struct Repl {
    proc: Proc,
    stdin: std::process::ChildStdin,
    out: Lines,
    err: Lines,
}

impl Repl {
    fn start(addr: &str, name: &str, root: &std::path::Path) -> Repl {
        let mut proc = spawn_script(addr, name, root, &[], &[]);
        let stdin = stdin_of(&mut proc);
        let out = Lines::new(proc.child.stdout.take().unwrap());
        let err = Lines::new(proc.child.stderr.take().unwrap());
        Repl {
            proc,
            stdin,
            out,
            err,
        }
    }

    fn send(&mut self, line: &str) {
        use std::io::Write as _;
        writeln!(self.stdin, "{line}").expect("the client reads its stdin");
        self.stdin.flush().unwrap();
    }

    /// The next `n` lines of its output.
    fn lines(&mut self, n: usize, limit: Duration) -> Vec<String> {
        (0..n).map(|_| self.out.wait_for("", limit)).collect()
    }

    /// Runs `command`, which must fail, and returns its error line.
    fn error_of(&mut self, command: &str) -> String {
        self.send(command);
        self.err.wait_for("error: ", WAIT)
    }
}

/// The SHA-256 of a file, read in blocks.
fn sha256_of(path: &std::path::Path) -> Vec<u8> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    // Bounded by the file's length.
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return ctx.finish().as_ref().to_vec();
        }
        ctx.update(&buf[..n]);
    }
}

/// A scripted client's output, retried (bounded) while the hub refuses its name because the
/// directory is still coming back.
fn run_script_until_in(addr: &str, name: &str, root: &std::path::Path, input: &str) -> Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = run_script(addr, name, root, input);
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        assert!(
            out.stderr.contains("the fleet's directory is unreachable"),
            "{}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_one_name_space_and_one_list() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let (rb, ra, rx) = (demo_root(), tempdir(), tempdir());
    let _bob = start_server(&a.addr, "bob", rb.path(), &[]);
    a.log.wait_for("joined", WAIT);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);

    // The name is taken on the other hub too, with today's answer.
    let out = run_script(&b.addr, "bob", rx.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("peer name \"bob\" is already taken by another connected peer"),
        "{}",
        out.stderr
    );

    // A client of hub b lists the whole fleet.
    let out = run_script(&b.addr, "alice", ra.path(), "list\n");
    assert!(out.status.success(), "{out:?}");
    let stdout = out.out();
    let listed: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert!(
        listed.contains(&"bob") && listed.contains(&"alice"),
        "{listed:?}"
    );
    // alice left when her script ended: hub a hears of it.
    a.log
        .wait_for("left on another hub peer=alice hub=hub-b", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_frees_its_names_within_the_lease_ttl_plus_2_s() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let (rb, rb2) = (demo_root(), demo_root());
    let mut bob = start_server(&a.addr, "bob", rb.path(), &[]);
    b.log
        .wait_for("joined on another hub peer=bob hub=hub-a", WAIT);

    a.proc.kill();
    let killed = Instant::now();
    b.log.wait_for(
        "left on another hub peer=bob hub=hub-a",
        Duration::from_secs(TTL_S + 2),
    );
    let freed = killed.elapsed();
    assert!(freed <= Duration::from_secs(TTL_S + 2), "{freed:?}");
    // The old bob cannot reach its hub; a new bob gets the name on hub b.
    bob.proc.kill();
    let _new_bob = start_server(&b.addr, "bob", rb2.path(), &[]);
    b.log.wait_for("joined", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_of_a_killed_hub_are_back_on_another_hub_within_15_s() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut a = fleet_hub(&etcd, "hub-a");
    let mut b = fleet_hub(&etcd, "hub-b");
    let (rb, ra, rc) = (demo_root(), tempdir(), demo_root());
    write_pattern(&rb.path().join("data.bin"), 32 << 20, 7);
    // bob knows both hubs and joins the first; alice and carol are on hub b.
    let hubs = format!("{},{}", a.addr, b.addr);
    let bob = start_server(&hubs, "bob", rb.path(), &[]);
    let mut carol = start_server(&b.addr, "carol", rc.path(), &[]);
    let mut alice = Repl::start(&b.addr, "alice", ra.path());
    wait_joined(&mut b, &["bob", "carol", "alice"]);
    a.log.wait_for("joined peer=bob", WAIT);

    // alice's read of bob is routed to hub a, and in flight when hub a is killed (bob is
    // stopped as soon as it started, so it cannot have finished).
    let local = ra.path().join("copy.bin");
    let get = format!("get bob data.bin {}", s(&local));
    alice.send(&get);
    b.log.wait_for("read routed to another hub", WAIT);
    bob.proc.signal("STOP");
    a.proc.kill();
    let killed = Instant::now();
    let error = alice.err.wait_for("error: ", WAIT);
    assert!(error.contains("the hub holding bob is gone"), "{error}");
    bob.proc.signal("CONT");
    // bob reconnects to hub b; his name is taken there until hub a's lease expires, then his
    // publish (retried with his backoff) gets it.
    b.log.wait_for("joined peer=bob", Duration::from_secs(15));
    eprintln!(
        "bob published on hub b {:?} after hub a was killed (lease TTL {TTL_S} s)",
        killed.elapsed()
    );
    // The same get again finishes the copy.
    alice.send(&get);
    let line = alice.out.wait_for("saved", WAIT);
    assert!(line.contains("(verified)"), "{line}");
    assert!(same_bytes(&local, &rb.path().join("data.bin")));
    alice.send("list");
    assert_eq!(alice.lines(3, WAIT), ["alice", "bob", "carol"]);
    // Nobody else saw an error: alice's only one was the routed read, carol stayed connected.
    let errors: Vec<String> = alice
        .err
        .drain()
        .into_iter()
        .filter(|l| l.contains("error"))
        .collect();
    assert_eq!(errors, [error], "alice saw only the routed read's error");
    let carol_log = carol.log.drain();
    assert!(
        !carol_log
            .iter()
            .any(|l| l.contains("error") || l.contains("lost")),
        "{carol_log:#?}"
    );
}

#[test]
fn a_fleet_hub_without_hub_to_hub_authentication_does_not_start() {
    let mut child = share()
        .args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            "http://127.0.0.1:1",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn hub");
    let stderr = reader(child.stderr.take().unwrap())
        .recv_timeout(WAIT)
        .expect("the hub exits at once");
    let status = child.wait().unwrap();
    let stderr = String::from_utf8_lossy(&stderr);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs hub-to-hub authentication")
            && stderr.contains("--fleet-token")
            && stderr.contains("--fleet-ca"),
        "{stderr}"
    );
}

/// The size of the file read across hubs in the three-hub test.
const BIG: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_and_six_clients_list_each_other_read_across_hubs_and_keep_error_codes() {
    let Some(etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    let mut hubs = [
        fleet_hub(&etcd, "hub-1"),
        fleet_hub(&etcd, "hub-2"),
        fleet_hub(&etcd, "hub-3"),
    ];
    let names = ["p1", "p2", "p3", "p4", "p5", "p6"];
    let roots: Vec<_> = names.iter().map(|_| demo_root()).collect();
    let started = Instant::now();
    write_pattern(&roots[5].path().join("big.bin"), BIG, 3);
    eprintln!("wrote {BIG} bytes in {:?}", started.elapsed());
    // p1, p2 on hub-1; p3, p4 on hub-2; p5, p6 on hub-3.
    let mut clients: Vec<Repl> = names
        .iter()
        .zip(&roots)
        .enumerate()
        .map(|(i, (name, root))| Repl::start(&hubs[i / 2].addr, name, root.path()))
        .collect();
    for hub in &mut hubs {
        wait_joined(hub, &names);
    }
    for c in &mut clients {
        c.send("list");
        assert_eq!(c.lines(6, WAIT), names);
    }

    // p1 (hub-1) gets p6's file (hub-3): checked by the client's SHA-256 and here.
    let local = roots[0].path().join("big-copy.bin");
    let started = Instant::now();
    clients[0].send(&format!("get p6 big.bin {}", s(&local)));
    let line = clients[0].out.wait_for("saved", Duration::from_secs(600));
    eprintln!("routed get of {BIG} bytes took {:?}", started.elapsed());
    assert!(
        line.contains(&format!("saved {BIG} bytes")) && line.contains("(verified)"),
        "{line}"
    );
    assert_eq!(std::fs::metadata(&local).unwrap().len(), BIG);
    assert_eq!(
        sha256_of(&local),
        sha256_of(&roots[5].path().join("big.bin"))
    );
    std::fs::remove_file(&local).unwrap();

    // The same failures of p6's files, asked by p1 (routed through two hubs) and by p5 (on
    // p6's hub), are told the same.
    for command in [
        "ls p6 nope",
        "stat p6 nope",
        "read p6 nope",
        "read p6 sub",
        "read p6 ../outside",
    ] {
        let routed = clients[0].error_of(command);
        let local = clients[4].error_of(command);
        assert_eq!(routed, local, "{command}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_20_s_without_etcd_local_reads_go_on_new_names_are_refused_and_all_come_back() {
    let Some(mut etcd) = Cluster::start_or_skip(1).await else {
        return;
    };
    // The default lease TTL (10 s): the outage outlasts it.
    let mut a = fleet_hub_with_ttl(&etcd, "hub-a", 10);
    let mut b = fleet_hub_with_ttl(&etcd, "hub-b", 10);
    let (rb, ra, rc, rd, rn) = (demo_root(), tempdir(), tempdir(), tempdir(), tempdir());
    write_pattern(&rb.path().join("data.bin"), 1 << 20, 5);
    let _bob = start_server(&a.addr, "bob", rb.path(), &[]);
    let _carol = start_server(&b.addr, "carol", rc.path(), &[]);
    let mut alice = Repl::start(&a.addr, "alice", ra.path());
    wait_joined(&mut a, &["bob", "alice", "carol"]);
    wait_joined(&mut b, &["bob", "alice", "carol"]);

    etcd.kill(0).await;
    let killed = Instant::now();
    // A new name is refused clearly on both hubs.
    for hub in [&a, &b] {
        let out = run_script(&hub.addr, "dave", rd.path(), "list\n");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr.contains("the fleet's directory is unreachable"),
            "{}",
            out.stderr
        );
    }
    // alice gets bob's file (both on hub a) all through the outage, well past the lease TTL.
    let mut gets = 0;
    // Bounded: one get a second for 20 s.
    while killed.elapsed() < Duration::from_secs(20) {
        let local = ra.path().join(format!("copy-{gets}.bin"));
        alice.send(&format!("get bob data.bin {}", s(&local)));
        let line = alice.out.wait_for("saved", WAIT);
        assert!(
            line.contains("saved 1048576 bytes") && line.contains("(verified)"),
            "{line}"
        );
        gets += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("{gets} gets during the outage");
    a.log
        .wait_for("the fleet's directory is unreachable; retrying", WAIT);

    etcd.restart(0).await;
    a.log.wait_for("the fleet's directory is reachable", WAIT);
    b.log.wait_for("the fleet's directory is reachable", WAIT);
    // Every live client is listed once, on both hubs; newcomers get their names again.
    let out = run_script_until_in(&b.addr, "dave", rd.path(), "list\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\nbob\ncarol\ndave\n", "{out:?}");
    let out = run_script_until_in(&a.addr, "nora", rn.path(), "list\n");
    assert_eq!(out.out(), "alice\nbob\ncarol\nnora\n", "{out:?}");
    alice.send("list");
    assert_eq!(alice.lines(3, WAIT), ["alice", "bob", "carol"]);
    drop(alice.proc);
}
