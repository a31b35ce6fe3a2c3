//! End-to-end tests: real `share` processes (a hub and several clients) on 127.0.0.1,
//! driven through the scripted REPL mode.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::time::Duration;

use common::*;

#[test]
fn three_peers_list_read_ls_and_get_with_identical_bytes() {
    let mut hub = start_hub(&[]);
    let (rb, rc, ra) = (demo_root(), demo_root(), tempdir());
    write_pattern(&rb.path().join("data.bin"), 5 << 20, 7);
    std::fs::write(rc.path().join("c.txt"), "from carol\n").unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let _carol = start_server(&hub.addr, "carol", rc.path(), &[]);
    let local = ra.path().join("copy.bin");
    let script = format!(
        "list\nread bob hello.txt\nls bob\nls bob sub\nget bob data.bin {}\nread carol c.txt\n",
        s(&local)
    );
    let out = run_script(&hub.addr, "alice", ra.path(), &script);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stderr, "", "no decoration in scripted mode");
    let want = format!(
        "alice\nbob\ncarol\n\
         hello world\n\
         \x20   5.0M  data.bin\n\
         \x20     12  hello.txt\n\
         \x20  <dir>  sub/\n\
         \x20      6  inner.txt\n\
         saved 5242880 bytes to {} (verified)\n\
         from carol\n",
        s(&local)
    );
    assert_eq!(out.out(), want);
    assert!(same_bytes(&local, &rb.path().join("data.bin")));
    // The hub knows the reader by its connection and logs who read what.
    hub.log
        .wait_for("read reader=alice peer=bob path=hello.txt", WAIT);
    // No partial file is left next to the download.
    let names: Vec<_> = std::fs::read_dir(ra.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["copy.bin"]);
    // Into a directory (keeping the name), and never over an existing file.
    let script = format!(
        "get bob hello.txt {dir}\nget bob hello.txt {dir}\n",
        dir = s(ra.path())
    );
    let out = run_script(&hub.addr, "alice", ra.path(), &script);
    assert_eq!(out.status.code(), Some(1));
    let saved = ra.path().join("hello.txt");
    assert_eq!(
        out.out(),
        format!("saved 12 bytes to {} (verified)\n", s(&saved))
    );
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(std::fs::read(&saved).unwrap(), b"hello world\n");
}

#[test]
fn the_articles_go_style_flags_work() {
    let hub = start_hub(&[]);
    let rb = demo_root();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let mut p = share()
        .args(["-name", "second-client", "-root"])
        .arg(rb.path())
        .arg(&hub.addr)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin
        .take()
        .unwrap()
        .write_all(b"list\nread bob hello.txt\n")
        .unwrap();
    let out = reader(p.stdout.take().unwrap()).recv_timeout(WAIT).unwrap();
    assert!(p.wait().unwrap().success());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "bob\nsecond-client\nhello world\n"
    );
}

#[test]
fn confinement_attacks_through_the_hub_are_refused() {
    let hub = start_hub(&[]);
    let (top, ra) = (tempdir(), tempdir());
    let root = top.path().join("root");
    let outside = top.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "TOP SECRET\n").unwrap();
    std::fs::write(root.join("ok.txt"), "fine\n").unwrap();
    symlink(outside.join("secret.txt"), root.join("link-out")).unwrap();
    symlink(&outside, root.join("door")).unwrap();
    symlink("ok.txt", root.join("link-in")).unwrap();
    let fifo = root.join("pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let _bob = start_server(&hub.addr, "bob", &root, &[]);
    let attacks = [
        (
            "read bob ../outside/secret.txt",
            "outside the exported directory",
        ),
        (
            "read bob sub/../../outside/secret.txt",
            "outside the exported directory",
        ),
        (
            &format!("read bob {}", s(&outside.join("secret.txt"))),
            "absolute path",
        ),
        ("read bob /etc/passwd", "absolute path"),
        ("read bob link-out", "outside the exported directory"),
        ("read bob door/secret.txt", "outside the exported directory"),
        ("ls bob door", "outside the exported directory"),
        ("ls bob ..", "outside the exported directory"),
        ("read bob pipe", "fifo; only regular files are served"),
        ("read bob sock", "socket; only regular files are served"),
        ("read bob sub", "is a directory"),
        ("read bob nope.txt", "no such file"),
    ];
    for (cmd, want) in attacks {
        let out = run_script(&hub.addr, "mallory", ra.path(), &format!("{cmd}\n"));
        assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
        assert!(out.stdout.is_empty(), "{cmd}: printed {:?}", out.out());
        assert!(
            out.stderr.starts_with("error: ") && out.stderr.contains(want),
            "{cmd}: stderr {:?} lacks {want:?}",
            out.stderr
        );
    }
    // bob and the hub are unharmed; a symlink inside the root is fine.
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "read bob ok.txt\nread bob link-in\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "fine\nfine\n");
}

#[test]
fn a_duplicate_or_invalid_name_exits_non_zero_with_a_clear_error() {
    let hub = start_hub(&[]);
    let (rb, rx) = (demo_root(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let out = run_script(&hub.addr, "bob", rx.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr
            .contains("peer name \"bob\" is already taken by another connected peer"),
        "{}",
        out.stderr
    );
    let long = "x".repeat(65);
    for (name, want) in [
        ("", "peer name is empty"),
        (long.as_str(), "65 bytes long"),
        ("a b", "control character or whitespace"),
        ("bell\u{7}", "control character or whitespace"),
    ] {
        let out = run_script(&hub.addr, name, rx.path(), "list\n");
        assert_eq!(out.status.code(), Some(1), "{name:?}: {out:?}");
        assert!(out.stderr.contains(want), "{name:?}: {}", out.stderr);
    }
    // The original bob is still the one listed.
    let out = run_script(&hub.addr, "alice", rx.path(), "list\nread bob hello.txt\n");
    assert_eq!(out.out(), "alice\nbob\nhello world\n");
}

#[test]
fn unknown_peers_bad_commands_and_a_missing_hub_fail_clearly() {
    let hub = start_hub(&[]);
    let ra = tempdir();
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "read dave x\nfrobnicate\nread alice\nlist\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.out(), "alice\n", "later commands still run");
    let errors: Vec<_> = out.stderr.lines().collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].contains("unknown peer \"dave\""), "{errors:?}");
    assert!(errors[1].contains("unknown command \"frobnicate\""));
    assert!(errors[2].contains("usage: read PEER PATH"));

    // A port nobody listens on: take a free one, then close it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = run_script(&addr, "alice", ra.path(), "list\n");
    assert_eq!(out.status.code(), Some(1));
    // One sentence about the situation, not the layers below it.
    assert_eq!(
        out.stderr.trim_end(),
        format!("share: cannot connect to {addr} (is the hub running?)"),
    );
}

#[test]
fn killing_an_exporter_mid_transfer_fails_the_read_and_the_hub_lives_on() {
    let hub = start_hub(&[]);
    let (rb, ra, rc) = (tempdir(), tempdir(), tempdir());
    // Sparse: large without using disk; the reader stalls long before the end.
    std::fs::File::create(rb.path().join("big.bin"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mut bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let _carol = start_server(&hub.addr, "carol", rc.path(), &[]);
    let mut alice = spawn_script(&hub.addr, "alice", ra.path(), &[], &[]);
    let mut stdin = stdin_of(&mut alice);
    stdin.write_all(b"read bob big.bin\n").unwrap();
    drop(stdin);
    let mut stdout = alice.child.stdout.take().unwrap();
    let stderr = reader(alice.child.stderr.take().unwrap());
    // Take the first MiB: the transfer is under way (and stalls when we stop reading).
    let mut first = vec![0u8; 1 << 20];
    stdout.read_exact(&mut first).unwrap();
    bob.proc.signal("KILL");
    bob.proc.kill();
    // Drain the rest: the read must end with an error, not a silent short file.
    let rest = reader(stdout)
        .recv_timeout(WAIT)
        .expect("alice's output ends");
    let stderr = String::from_utf8(stderr.recv_timeout(WAIT).unwrap()).unwrap();
    let status = alice.reap();
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        (first.len() + rest.len()) < (1 << 30),
        "the read did not complete"
    );
    // One sentence about the situation; the hub's details only with -v.
    assert!(
        stderr.contains("error: bob went away during the command; run it again once bob is back"),
        "{stderr}"
    );
    assert!(!stderr.contains("peer gone"), "{stderr}");
    // The hub lives on: carol is served, bob is gone from the list.
    let out = run_script(&hub.addr, "dave", ra.path(), "list\n");
    assert_eq!(out.out(), "carol\ndave\n");
}

/// Starts a new hub at `addr` (the old one is gone), waits until `bob` has reconnected to it,
/// and checks that a fresh client `alice` (root `ra`) lists bob and reads through the new hub.
fn hub_comes_back_and_bob_with_it(addr: &str, bob: &mut Server, ra: &std::path::Path) {
    let _hub2 = start_hub_at(addr, &[]);
    bob.log.wait_for("reconnected to the hub", WAIT);
    let out = run_script(addr, "alice", ra, "list\nread bob hello.txt\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\nbob\nhello world\n");
}

#[test]
fn clients_reconnect_and_republish_after_the_hub_restarts() {
    // A fixed port below the ephemeral range, so that no outgoing connection of a parallel
    // test can take it while the hub is down.
    let addr = format!("127.0.0.1:{}", free_fixed_port());
    let mut hub = start_hub_at(&addr, &[]);
    let (rb, ra) = (demo_root(), tempdir());
    let mut bob = start_server(&addr, "bob", rb.path(), &[]);
    hub.proc.signal("KILL");
    hub.proc.kill();
    bob.log.wait_for("lost the hub", WAIT);
    // While the hub is away a new client cannot start.
    let out = run_script(&addr, "alice", ra.path(), "list\n");
    assert_eq!(out.status.code(), Some(1));
    hub_comes_back_and_bob_with_it(&addr, &mut bob, ra.path());
}

#[test]
fn sigterm_makes_the_hub_close_every_session_and_exit_zero_and_clients_come_back() {
    // A fixed port below the ephemeral range (see the restart test).
    let addr = format!("127.0.0.1:{}", free_fixed_port());
    let mut hub = start_hub_at(&addr, &[]);
    let (rb, ra) = (demo_root(), tempdir());
    let mut bob = start_server(&addr, "bob", rb.path(), &[]);
    hub.log.wait_for("joined", WAIT);
    hub.proc.signal("TERM");
    hub.log
        .wait_for("shutting down: closing every session", WAIT);
    hub.log.wait_for("every session closed", WAIT);
    // stderr closes when the process exits, so reaping does not block.
    hub.log.wait_end(WAIT);
    let status = hub.proc.reap();
    assert_eq!(status.code(), Some(0), "hub exit: {status:?}");
    // Bob is told the hub closed the session (a graceful close, not an i/o error).
    let line = bob.log.wait_for("closed the connection", WAIT);
    assert!(line.contains(&format!("the hub at {addr}")), "{line}");
    assert!(!line.contains("i/o error"), "{line}");
    hub_comes_back_and_bob_with_it(&addr, &mut bob, ra.path());
}

#[test]
fn a_frozen_peer_keeps_its_name_until_keepalive_drops_it_then_a_new_client_gets_it() {
    // 10 s: long enough that the refused attempt below surely comes first on a busy machine.
    let mut hub = start_hub(&["--keepalive", "10"]);
    let (r_old, r_new, ra) = (demo_root(), tempdir(), tempdir());
    std::fs::write(r_new.path().join("hello.txt"), b"the new bob\n").unwrap();
    let old_bob = start_server(&hub.addr, "bob", r_old.path(), &[]);
    hub.log.wait_for("joined", WAIT);
    old_bob.proc.signal("STOP");
    // While the hub's session to the frozen bob lives, nobody else gets the name.
    let out = run_script(&hub.addr, "bob", r_new.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("already taken"), "{}", out.stderr);
    // The transport declares it dead; only then is the name free.
    hub.log.wait_for("left: keepalive timeout", WAIT);
    let _new_bob = start_server(&hub.addr, "bob", r_new.path(), &[]);
    hub.log.wait_for("joined", WAIT);
    let out = run_script(&hub.addr, "alice", ra.path(), "list\nread bob hello.txt\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\nbob\nthe new bob\n");
    // Dropping the stopped process kills it (SIGKILL works on a stopped process).
}

#[test]
fn a_silent_peer_disappears_from_list_within_the_keepalive_bound() {
    // 3 s: short for the test, long enough that a busy machine does not drop live peers.
    let mut hub = start_hub(&["--keepalive", "3"]);
    let (rb, ra) = (demo_root(), tempdir());
    let bob = start_server(&hub.addr, "bob", rb.path(), &["--keepalive", "3"]);
    hub.log.wait_for("joined", WAIT);
    bob.proc.signal("STOP");
    hub.log.wait_for("left: keepalive timeout", WAIT);
    let out = run_script(&hub.addr, "alice", ra.path(), "list\nread bob hello.txt\n");
    bob.proc.signal("CONT");
    assert_eq!(out.out(), "alice\n");
    assert!(
        out.stderr.contains("unknown peer \"bob\""),
        "{}",
        out.stderr
    );
}

#[test]
fn a_wrong_token_is_refused_and_the_right_one_accepted() {
    let hub = start_hub(&["--token", "s3cret"]);
    let ra = tempdir();
    let out = run_script_with(
        &hub.addr,
        "eve",
        ra.path(),
        "list\n",
        &["--token", "guess"],
        &[],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("the hub refused the token"),
        "{}",
        out.stderr
    );
    let out = run_script(&hub.addr, "eve", ra.path(), "list\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("requires a token"), "{}", out.stderr);
    let out = run_script_with(
        &hub.addr,
        "alice",
        ra.path(),
        "list\n",
        &[],
        &[("SHARE_TOKEN", "s3cret")],
        WAIT,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\n");
}

#[test]
fn the_hub_warns_when_the_link_is_plaintext_and_unauthenticated() {
    let mut hub = start_hub(&[]);
    hub.log.wait_for("plaintext and unauthenticated", WAIT);
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a hub certificate for 127.0.0.1 and a client certificate, as PEM files.
    fn new() -> Pki {
        let dir = tempdir();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (who, san) in [("hub", "127.0.0.1"), ("client", "alice.example")] {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![san.to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            write(&format!("{who}.pem"), cert.pem());
            write(&format!("{who}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        s(&self.dir.path().join(name)).to_owned()
    }
}

#[test]
fn tls_and_mutual_tls_work_with_generated_certificates() {
    let pki = Pki::new();
    let ra = tempdir();
    let (cert, key, ca) = (pki.path("hub.pem"), pki.path("hub.key"), pki.path("ca.pem"));
    let hub = start_hub(&["--tls-cert", &cert, "--tls-key", &key]);
    let tls = ["--tls-ca", ca.as_str()];
    let out = run_script_with(&hub.addr, "alice", ra.path(), "list\n", &tls, &[], WAIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\n");
    // A plaintext client cannot talk to a TLS hub.
    let out = run_script(&hub.addr, "bob", ra.path(), "list\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // Mutual TLS: a client certificate is required.
    let mhub = start_hub(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    let out = run_script_with(&mhub.addr, "alice", ra.path(), "list\n", &tls, &[], WAIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (ccert, ckey) = (pki.path("client.pem"), pki.path("client.key"));
    let mtls = ["--tls-ca", &ca, "--tls-cert", &ccert, "--tls-key", &ckey];
    let out = run_script_with(&mhub.addr, "alice", ra.path(), "list\n", &mtls, &[], WAIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "alice\n");
}

/// Size of the big transfer in MiB: `FILESHARE_BIG_MIB`, default 1024 (the full 1 GiB check
/// takes about 10 s in a debug build on 2 cores, and 2 GiB of temporary disk).
fn big_mib() -> u64 {
    std::env::var("FILESHARE_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[test]
fn a_large_get_streams_with_bounded_memory_while_others_stay_responsive() {
    const LIMIT_KIB: u64 = 64 * 1024;
    let mib = big_mib();
    let hub = start_hub(&[]);
    let (rb, ra, rc) = (tempdir(), tempdir(), demo_root());
    let src = rb.path().join("big.bin");
    write_pattern(&src, mib << 20, 42);
    let bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let _carol = start_server(&hub.addr, "carol", rc.path(), &[]);
    let local = ra.path().join("big.copy");
    let mut alice = spawn_script(&hub.addr, "alice", ra.path(), &[], &[]);
    let mut stdin = stdin_of(&mut alice);
    writeln!(stdin, "get bob big.bin {}", s(&local)).unwrap();
    stdin.flush().unwrap();
    let mut out = Lines::new(alice.child.stdout.take().unwrap());
    let err = reader(alice.child.stderr.take().unwrap());
    // Meanwhile other peers' calls through the hub are answered, again and again until the
    // transfer is done; at least one full round must complete while it is still running.
    let saved = format!("saved {} bytes", mib << 20);
    let mut rounds_during_transfer = 0;
    // Bounded: 10 000 rounds would take far longer than the transfer.
    for _ in 0..10_000 {
        let o = run_script_with(
            &hub.addr,
            "dave",
            ra.path(),
            "list\nread carol hello.txt\n",
            &[],
            &[],
            Duration::from_secs(20),
        );
        assert!(o.status.success(), "{o:?}");
        // (alice may still be connecting during the first rounds.)
        assert!(
            o.out().ends_with("bob\ncarol\ndave\nhello world\n"),
            "{o:?}"
        );
        if out.drain().iter().any(|l| l.contains(&saved)) {
            break;
        }
        rounds_during_transfer += 1;
    }
    assert!(
        rounds_during_transfer >= 1,
        "the transfer ended before any other call"
    );
    let limit = Duration::from_secs(30 + mib / 4);
    if !out.drain().iter().any(|l| l.contains(&saved)) {
        out.wait_for(&saved, limit);
    }
    let peaks = [
        ("hub", hub.proc.peak_rss_kib()),
        ("bob (exporter)", bob.proc.peak_rss_kib()),
        ("alice (reader)", alice.peak_rss_kib()),
    ];
    drop(stdin);
    let _ = err.recv_timeout(WAIT);
    assert!(alice.reap().success());
    eprintln!("{mib} MiB get, {rounds_during_transfer} rounds of other calls meanwhile, peak RSS (VmHWM): {peaks:?} KiB");
    for (who, kib) in peaks {
        assert!(kib < LIMIT_KIB, "{who} peaked at {kib} KiB");
    }
    assert!(same_bytes(&local, &src), "the copy differs");
}

/// One yamux frame header (hashicorp/yamux spec.md): version, type, flags, stream, length.
fn yamux_frame(ty: u8, flags: u16, stream: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0, ty];
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Reads one yamux frame: (type, flags, stream, body).
fn read_yamux_frame(r: &mut impl Read) -> std::io::Result<(u8, u16, u32, Vec<u8>)> {
    let mut h = [0u8; 12];
    r.read_exact(&mut h)?;
    let flags = u16::from_be_bytes([h[2], h[3]]);
    let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    // Only data frames carry a body; for the others `len` is a window delta or a ping id.
    let mut body = vec![0u8; if h[1] == 0 { len as usize } else { 0 }];
    r.read_exact(&mut body)?;
    Ok((h[1], flags, stream, body))
}

#[test]
fn the_hub_ends_the_hello_stream_with_fin_never_a_reset() {
    // Frame by frame, as a client in another language sees it: hashicorp/yamux drops unread
    // data when a stream is reset, so the answer must be followed by FIN, not RST.
    const SYN: u16 = 1;
    const FIN: u16 = 4;
    const RST: u16 = 8;
    let hub = start_hub(&[]);
    let mut tcp = std::net::TcpStream::connect(&hub.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    // Open stream 1 with the channel handshake for "fileshare.hello" (Part 1).
    let mut open = vec![1, 15];
    open.extend_from_slice(b"fileshare.hello");
    tcp.write_all(&yamux_frame(0, SYN, 1, &open)).unwrap();
    let mut data = Vec::new();
    let mut sent_hello = false;
    // Bounded: every frame is read within WAIT, and the hub sends a handful on this stream.
    for _ in 0..64 {
        let (ty, flags, stream, body) = read_yamux_frame(&mut tcp).expect("a frame from the hub");
        if stream != 1 {
            continue;
        }
        data.extend_from_slice(&body);
        if !sent_hello && data.starts_with(&[1, 0]) {
            // Accepted: now the hello, version 3 with no token.
            data.drain(..2);
            tcp.write_all(&yamux_frame(0, 0, 1, &[3, 0, 0])).unwrap();
            sent_hello = true;
        }
        assert_eq!(flags & RST, 0, "the hub reset the hello stream (type {ty})");
        if flags & FIN != 0 {
            assert!(sent_hello, "closed before the channel was accepted");
            assert_eq!(data, b"\x00\x00\x07welcome", "the whole answer, then FIN");
            return;
        }
    }
    panic!("no FIN on the hello stream; data so far {data:?}");
}

/// A `--serve` client started before its hub says why it cannot join and keeps trying with
/// backoff instead of exiting; it joins once the hub is up.
#[test]
fn a_serve_client_started_before_its_hub_waits_and_joins_once_the_hub_is_up() {
    let addr = format!("127.0.0.1:{}", free_fixed_port());
    let (rb, ra) = (tempdir(), tempdir());
    std::fs::write(rb.path().join("hello.txt"), b"hi\n").unwrap();
    let mut child = share()
        .args(["--name", "bob", "--root"])
        .arg(rb.path())
        .args(["--serve", &addr])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut log = Lines::new(child.stderr.take().unwrap());
    let bob = Proc {
        child,
        name: "bob".into(),
    };
    log.wait_for(
        &format!("share: cannot connect to {addr} (is the hub running?); trying again"),
        WAIT,
    );
    let _hub = start_hub_at(&addr, &[]);
    log.wait_for("connected to the hub", WAIT);
    let out = run_script(&addr, "alice", ra.path(), "read bob hello.txt\n");
    assert_eq!(out.out(), "hi\n", "{}", out.stderr);
    drop(bob);
}

/// `share … | head`: a reader that goes away ends the client quietly (status 0, no panic,
/// no error per remaining command).
#[test]
fn a_closed_stdout_ends_a_scripted_client_quietly() {
    let hub = start_hub(&[]);
    let (rb, ra) = (tempdir(), tempdir());
    write_pattern(&rb.path().join("big.bin"), 4 << 20, 1);
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let mut p = spawn_script(&hub.addr, "alice", ra.path(), &[], &[]);
    drop(p.child.stdout.take());
    let mut stdin = stdin_of(&mut p);
    stdin
        .write_all(b"read bob big.bin\nread bob big.bin\nlist\n")
        .unwrap();
    drop(stdin);
    // Bounded: stderr ends when the client exits.
    let stderr = reader(p.child.stderr.take().unwrap())
        .recv_timeout(WAIT)
        .expect("the client ends");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let status = p.reap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}
