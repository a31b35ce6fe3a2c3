//! Helpers for the end-to-end tests: start real `share` processes, read their output with
//! timeouts, and kill them when the test ends (also when it panics).

#![allow(dead_code)] // not every helper is used by every test file

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Bound for anything that should happen promptly (process start, a command).
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A `share` command with logs kept plain.
pub(crate) fn share() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_share"));
    cmd.env_remove("SHARE_TOKEN").env("NO_COLOR", "1");
    cmd
}

/// Lines of one output stream, collected by a thread.
pub(crate) struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    /// Starts reading `r` line by line.
    pub(crate) fn new(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits up to `limit` for a line containing `needle`; returns it. Panics with everything
    /// seen so far on timeout.
    pub(crate) fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line containing {needle:?} within {limit:?}; saw {:#?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "stream ended before a line containing {needle:?}; saw {:#?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Waits up to `limit` for the stream to end (the writer exited). Panics with everything
    /// seen so far on timeout.
    pub(crate) fn wait_end(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stream still open after {limit:?}; saw {:#?}", self.seen)
                }
            }
        }
    }

    /// Everything seen so far (plus whatever is already buffered).
    pub(crate) fn drain(&mut self) -> Vec<String> {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) name: String,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal with kill(1) (the crate forbids unsafe code, so no libc::kill).
    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Kills the process now and waits for it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit once its output streams have ended (the caller saw
    /// them close, so this does not block for long).
    pub(crate) fn reap(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM present")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running hub.
pub(crate) struct Hub {
    pub(crate) proc: Proc,
    pub(crate) addr: String,
    pub(crate) log: Lines,
}

/// Starts `share hub` on an ephemeral port (or `listen`), with extra arguments.
pub(crate) fn start_hub_at(listen: &str, args: &[&str]) -> Hub {
    let mut child = share()
        .args(["hub", "--listen", listen])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hub");
    let mut out = Lines::new(child.stdout.take().unwrap());
    let log = Lines::new(child.stderr.take().unwrap());
    let proc = Proc {
        child,
        name: "hub".into(),
    };
    let line = out.wait_for("hub listening on ", WAIT);
    let addr = line
        .trim_start_matches("hub listening on ")
        .trim()
        .to_owned();
    Hub { proc, addr, log }
}

/// Starts `share hub` on an ephemeral loopback port.
pub(crate) fn start_hub(args: &[&str]) -> Hub {
    start_hub_at("127.0.0.1:0", args)
}

/// A client in `--serve` mode.
pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) log: Lines,
}

/// Starts `share --name NAME --root ROOT --serve ADDR` and waits until it is published.
pub(crate) fn start_server(addr: &str, name: &str, root: &Path, args: &[&str]) -> Server {
    let mut child = share()
        .args(["--name", name, "--root"])
        .arg(root)
        .arg("--serve")
        .args(args)
        .arg(addr)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut log = Lines::new(child.stderr.take().unwrap());
    let proc = Proc {
        child,
        name: name.into(),
    };
    log.wait_for("connected to the hub", WAIT);
    Server { proc, log }
}

/// What a scripted client printed and how it exited.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: String,
    pub(crate) status: ExitStatus,
}

impl Outcome {
    pub(crate) fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A scripted client: spawned with piped stdin/stdout/stderr.
pub(crate) fn spawn_script(
    addr: &str,
    name: &str,
    root: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut cmd = share();
    cmd.args(["--name", name, "--root"])
        .arg(root)
        .args(args)
        .arg(addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().expect("spawn scripted client"),
        name: name.into(),
    }
}

/// Runs a scripted client with `input` on stdin and collects its output, within `limit`.
pub(crate) fn run_script_with(
    addr: &str,
    name: &str,
    root: &Path,
    input: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    limit: Duration,
) -> Outcome {
    let mut p = spawn_script(addr, name, root, args, envs);
    let mut stdin = p.child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let stdout = reader(p.child.stdout.take().unwrap());
    let stderr = reader(p.child.stderr.take().unwrap());
    // Both streams close when the process exits: that is the event waited for.
    let stdout = stdout
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{name} did not finish within {limit:?}"));
    let stderr = stderr.recv_timeout(WAIT).expect("stderr collected");
    let status = p.reap();
    let _ = writer.join();
    Outcome {
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        status,
    }
}

/// Runs a scripted client with default options.
pub(crate) fn run_script(addr: &str, name: &str, root: &Path, input: &str) -> Outcome {
    run_script_with(addr, name, root, input, &[], &[], WAIT)
}

/// Reads a stream to the end on a thread; the bytes arrive on the receiver.
pub(crate) fn reader(mut r: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Keeps a scripted client's stdin open for more commands.
pub(crate) fn stdin_of(p: &mut Proc) -> ChildStdin {
    p.child.stdin.take().expect("stdin piped")
}

/// A fresh directory.
pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Writes `len` bytes of a deterministic, non-repeating-looking pattern to `path`.
pub(crate) fn write_pattern(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut left = len;
    let mut block = vec![0u8; 1 << 16];
    // Bounded by `len`.
    while left > 0 {
        for b in block.chunks_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// Whether two files have identical bytes (compared in blocks, never loaded whole).
pub(crate) fn same_bytes(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ra, mut rb) = (
        BufReader::with_capacity(1 << 20, fa),
        BufReader::with_capacity(1 << 20, fb),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    // Bounded by the file length.
    loop {
        let n = read_full(&mut ra, &mut ba);
        let m = read_full(&mut rb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).unwrap() {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// A root for a peer: `hello.txt` ("hello world\n") and `sub/inner.txt`.
pub(crate) fn demo_root() -> tempfile::TempDir {
    let d = tempdir();
    std::fs::write(d.path().join("hello.txt"), b"hello world\n").unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::write(d.path().join("sub/inner.txt"), b"inner\n").unwrap();
    d
}

/// `path` as a &str.
pub(crate) fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `dir/name`.
pub(crate) fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A free loopback port below Linux's ephemeral range (32768..), found by trying to bind.
pub(crate) fn free_fixed_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = u64::from(std::process::id()) ^ nanos;
    // Bounded: 200 candidates spread over 20000..32000.
    for i in 0..200u64 {
        let port =
            20_000 + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}
