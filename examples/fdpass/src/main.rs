//! File descriptors with calls (seed 002) on the child link (seed 001): a parent spawns this
//! same program as its child over a Unix socket and hands it, with its calls, things the child
//! could not get by itself; the child hands one back.
//!
//! 1. **A file the child cannot open.** The parent creates a file, writes it, and unlinks it
//!    while keeping it open: no path leads to it any more, for anyone. It passes the open fd
//!    with a call (with the old path, which the child tries first and fails on); the child
//!    reads the file through the fd and answers with its line count and first line. The
//!    example then tries a path the child is denied by permissions (a mode-000 file), but only
//!    where permissions deny anything: a process running as root (`CAP_DAC_OVERRIDE`) opens a
//!    mode-000 file anyway, which is why the unlinked file is the case that always holds.
//! 2. **A result in a memfd.** The child computes the primes below 1000 into a memfd, seals it
//!    against writes and resizing, and passes it back with its response; the parent reads the
//!    result from it.
//! 3. **A listening socket.** The parent binds a TCP socket on 127.0.0.1, port 0, passes it to
//!    the child and closes its own copy; the child serves on it (each connection gets one line)
//!    without binding anything itself, and the parent connects to that port.
//!
//! Then the parent asks the child for its open fds again: the same as before the calls, so
//! nothing leaked. Last, over a TCP link (which cannot carry descriptors) a call with an fd and
//! a response with one both fail at once with `FAILED_PRECONDITION`.
//!
//! Run `cargo run -p fdpass`. The child is this binary run with the `child` argument.

use std::{
    fmt::Write as _,
    fs::File,
    io::{Read, Seek, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _};
use netchan::{
    mux,
    net::child,
    rpc::{self, rpc_service, CallOptions, Code, Context, Status},
    BindOptions, ConnectOptions,
};
use rustix::fs::{MemfdFlags, SealFlags};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};

/// Writes one line to stdout; a closed stdout (`fdpass … | head`) ends the program quietly
/// with status 0, as it does a shell tool, instead of a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("fdpass: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`say`].
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

/// The longest any one call, connect or read of the example may take.
const WAIT: Duration = Duration::from_secs(10);

/// The most the child reads from a file it is handed, and the parent from a memfd.
const MAX_READ: u64 = 16 << 20;

/// The largest limit `primes` accepts (its memfd stays a few MiB).
const MAX_PRIMES_LIMIT: u32 = 10_000_000;

/// The most connections the child answers at once on a socket it serves.
const MAX_CONNS: usize = 64;

/// What the child found in a file handed to it.
#[derive(Debug, Serialize, Deserialize)]
pub struct FileReport {
    /// Why the child could not open the file by its path; `None` if it could.
    pub path_error: Option<String>,
    /// Whether the fd arrived close-on-exec (so the child's own children do not inherit it).
    pub cloexec: bool,
    /// The file's size as read through the fd.
    pub bytes: u64,
    /// Its number of lines.
    pub lines: u64,
    /// Its first line.
    pub first_line: String,
}

/// What the child wrote into the memfd it answers `primes` with.
#[derive(Debug, Serialize, Deserialize)]
pub struct PrimesReport {
    /// How many primes (one per line).
    pub count: u64,
    /// The memfd's size.
    pub bytes: u64,
}

/// What the child serves to its parent. Each method taking or giving an fd says so.
#[rpc_service(crate = "netchan::rpc")]
pub trait Worker {
    /// The fds open in the child right now.
    async fn open_fds(&self, ctx: Context) -> Result<Vec<i32>, Status>;
    /// Reads the one file passed with the call. `path` is where the parent found it: the
    /// child tries it first, to show it cannot open it that way.
    async fn read_file(&self, ctx: Context, path: String) -> Result<FileReport, Status>;
    /// Writes the primes below `limit`, one per line, into a sealed memfd sent back with the
    /// response (fetch it with `Client::call_with_fds` on `Worker.primes`).
    async fn primes(&self, ctx: Context, limit: u32) -> Result<PrimesReport, Status>;
    /// Serves on the listening TCP socket passed with the call: each connection gets one
    /// line. Answers the socket's address.
    async fn serve_socket(&self, ctx: Context) -> Result<String, Status>;
    /// Stops serving the socket and closes it. Answers how many connections it answered.
    async fn stop_serving(&self, ctx: Context) -> Result<u64, Status>;
}

/// The socket the child serves: how to stop its accept loop, and the loop.
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<u64>,
}

#[derive(Default)]
struct WorkerImpl {
    serving: Mutex<Option<Serving>>,
}

impl Worker for WorkerImpl {
    async fn open_fds(&self, _ctx: Context) -> Result<Vec<i32>, Status> {
        Ok(open_fds())
    }

    async fn read_file(&self, ctx: Context, path: String) -> Result<FileReport, Status> {
        let path_error = File::open(&path).err().map(|e| e.to_string());
        let fd = one_fd(&ctx, "a file to read")?;
        let cloexec = rustix::io::fcntl_getfd(&fd)
            .map_err(|e| Status::internal(format!("reading the fd's flags: {e}")))?
            .contains(rustix::io::FdFlags::CLOEXEC);
        let mut file = File::from(fd);
        // The offset belongs to the open file, which the parent shares: start from the top.
        // (Plain blocking reads: the file is small and the read is capped.)
        file.rewind()?;
        let mut text = Vec::new();
        file.take(MAX_READ + 1).read_to_end(&mut text)?;
        if text.len() as u64 > MAX_READ {
            return Err(Status::resource_exhausted(format!(
                "the file is larger than {MAX_READ} bytes"
            )));
        }
        let text = String::from_utf8_lossy(&text);
        Ok(FileReport {
            path_error,
            cloexec,
            bytes: text.len() as u64,
            lines: text.lines().count() as u64,
            first_line: text.lines().next().unwrap_or_default().to_string(),
        })
    }

    async fn primes(&self, ctx: Context, limit: u32) -> Result<PrimesReport, Status> {
        if limit > MAX_PRIMES_LIMIT {
            return Err(Status::invalid_argument(format!(
                "limit {limit} is above {MAX_PRIMES_LIMIT}"
            )));
        }
        let primes = primes_below(limit);
        let mut text = String::new();
        for p in &primes {
            let _ = writeln!(text, "{p}");
        }
        let mut file = File::from(memfd("fdpass-primes")?);
        file.write_all(text.as_bytes())?;
        // Sealed, the parent can trust what it reads: nobody can change it any more.
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )
        .map_err(|e| Status::internal(format!("sealing the memfd: {e}")))?;
        // Over a link that cannot carry fds (TCP, TLS) this fails with FAILED_PRECONDITION.
        ctx.reply_fds(vec![file.into()])?;
        Ok(PrimesReport {
            count: primes.len() as u64,
            bytes: text.len() as u64,
        })
    }

    async fn serve_socket(&self, ctx: Context) -> Result<String, Status> {
        let fd = one_fd(&ctx, "a listening TCP socket")?;
        let mut serving = lock(&self.serving);
        if serving.is_some() {
            return Err(Status::failed_precondition("already serving a socket"));
        }
        let listener = std::net::TcpListener::from(fd);
        let addr = listener
            .local_addr()
            .map_err(|e| Status::invalid_argument(format!("the fd is not a TCP socket: {e}")))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, stop_rx));
        *serving = Some(Serving { stop, task });
        eprintln!("child: serving on the parent's socket {addr}");
        Ok(addr.to_string())
    }

    async fn stop_serving(&self, _ctx: Context) -> Result<u64, Status> {
        let Some(Serving { stop, task }) = lock(&self.serving).take() else {
            return Err(Status::failed_precondition("not serving a socket"));
        };
        let _ = stop.send(());
        // The loop closes the socket and every connection before it returns.
        tokio::time::timeout(WAIT, task)
            .await
            .map_err(|_| Status::deadline_exceeded("the accept loop did not stop"))?
            .map_err(|e| Status::internal(format!("the accept loop failed: {e}")))
    }
}

/// The one fd `ctx`'s request carried, or `InvalidArgument` naming what was expected.
fn one_fd(ctx: &Context, what: &str) -> Result<OwnedFd, Status> {
    let mut fds = ctx.take_fds();
    if fds.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "expected one fd ({what}) with the call, got {}",
            fds.len()
        )));
    }
    Ok(fds.remove(0))
}

/// A new memfd named `name` (close-on-exec, sealable).
fn memfd(name: &str) -> Result<OwnedFd, Status> {
    rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| Status::internal(format!("memfd_create: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The primes below `limit` (a sieve of Eratosthenes).
fn primes_below(limit: u32) -> Vec<u32> {
    let n = limit as usize;
    let mut composite = vec![false; n];
    let mut primes = Vec::new();
    for i in 2..n {
        if composite[i] {
            continue;
        }
        primes.push(i as u32);
        for j in (i * i..n).step_by(i) {
            composite[j] = true;
        }
    }
    primes
}

/// Answers each connection to `listener` with one line until `stop` fires, then closes the
/// socket and the connections still open. Returns how many connections it accepted.
async fn accept_loop(listener: tokio::net::TcpListener, mut stop: oneshot::Receiver<()>) -> u64 {
    let mut conns = JoinSet::new();
    let mut accepted = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            next = listener.accept(), if conns.len() < MAX_CONNS => match next {
                Ok((mut stream, _)) => {
                    accepted += 1;
                    let line = format!(
                        "hello from the child (pid {}), connection {accepted}\n",
                        std::process::id()
                    );
                    conns.spawn(async move {
                        let _ = tokio::time::timeout(WAIT, async {
                            stream.write_all(line.as_bytes()).await?;
                            stream.shutdown().await
                        })
                        .await;
                    });
                }
                Err(e) => {
                    eprintln!("child: accept failed, no longer serving: {e}");
                    break;
                }
            },
        }
    }
    conns.shutdown().await;
    accepted
}

/// Serves `server` on every channel opened to `listener`, in a task that ends with the
/// listener's session.
fn serve(server: rpc::Server, listener: mux::Listener) {
    tokio::spawn(async move { server.serve_all(listener).await });
}

fn worker_server() -> rpc::Server {
    let mut server = rpc::Server::new();
    server.add(WorkerImpl::default().into_service());
    server
}

/// The fds open in this process right now.
fn open_fds() -> Vec<i32> {
    netchan_testkit::fds::open_fd_list()
        .into_iter()
        .map(|(fd, _)| fd)
        .collect()
}

async fn run_child() -> anyhow::Result<()> {
    let session = child::from_env_with(mux::Config::default(), |session| {
        if let Ok(calls) = session.listen("worker") {
            serve(worker_server(), calls);
        }
    })
    .context("building the child's link")?;
    let reason = session.closed().await;
    eprintln!("child: session ended ({reason}), exiting");
    Ok(())
}

/// A temporary file holding `text`, open for reading and writing, and its path.
fn temp_file(name: &str, text: &str) -> anyhow::Result<(PathBuf, File)> {
    let path = std::env::temp_dir().join(format!("fdpass-{}-{name}", std::process::id()));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((path, file))
}

/// A file holding `text` that no path leads to any more: only the returned fd reaches it.
fn unlinked_file(name: &str, text: &str) -> anyhow::Result<(PathBuf, OwnedFd)> {
    let (path, file) = temp_file(name, text)?;
    std::fs::remove_file(&path).with_context(|| format!("unlinking {}", path.display()))?;
    Ok((path, file.into()))
}

/// Options for every call of the example: bounded by [`WAIT`].
fn opts() -> CallOptions {
    CallOptions::default().timeout(WAIT)
}

/// The name an fd of this process points at (as `/proc/self/fd` shows it).
fn fd_target(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

const NOTES: &str = "netchan fdpass: the child reads this through an fd\n\
                     the parent unlinked the file before the call\n\
                     so no path leads here\n";

/// Case 1: the child reads a file it cannot open by path.
async fn pass_unlinked_file(worker: &WorkerClient) -> anyhow::Result<()> {
    let (path, fd) = unlinked_file("notes.txt", NOTES)?;
    let path = path.display().to_string();
    let report = worker
        .with_options(opts().fds([fd]))
        .read_file(path.clone())
        .await
        .context("child.read_file")?;
    let Some(path_error) = &report.path_error else {
        bail!("the child opened the unlinked {path} by its path");
    };
    ensure!(
        report.lines == 3 && report.bytes == NOTES.len() as u64,
        "the child read something else: {report:?}"
    );
    ensure!(
        report.cloexec,
        "the fd reached the child without close-on-exec"
    );
    say!(
        "parent: 1. the child could not open {path} ({path_error}); through the fd \
         (close-on-exec) it read {} lines, {} bytes, the first {:?}",
        report.lines,
        report.bytes,
        report.first_line
    );
    Ok(())
}

/// Case 1, with a path the child is denied by permissions, where permissions deny anything.
async fn pass_denied_file(worker: &WorkerClient) -> anyhow::Result<()> {
    let text = "mode 000: only an fd opened before the chmod reads this\n";
    let (path, file) = temp_file("denied.txt", text)?;
    let result = async {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000))?;
        if File::open(&path).is_ok() {
            say!(
                "parent: 1. skipped the denied path: this process opens a mode-000 file anyway \
                 (root, CAP_DAC_OVERRIDE), so permissions deny its child nothing; the unlinked \
                 file above is the case that holds everywhere"
            );
            return Ok(());
        }
        let shown = path.display().to_string();
        let report = worker
            .with_options(opts().fds([OwnedFd::from(file)]))
            .read_file(shown.clone())
            .await
            .context("child.read_file")?;
        let Some(path_error) = &report.path_error else {
            bail!("the child opened the mode-000 {shown} by its path");
        };
        ensure!(
            report.bytes == text.len() as u64,
            "the child read something else: {report:?}"
        );
        say!(
            "parent: 1. the child is denied {shown} ({path_error}); through the fd it read \
             {} line, the first {:?}",
            report.lines,
            report.first_line
        );
        Ok(())
    }
    .await;
    let removed =
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()));
    result.and(removed)
}

/// Case 2: the child answers with a memfd holding its result.
async fn fetch_primes(worker: &WorkerClient) -> anyhow::Result<()> {
    let (report, mut fds) = worker
        .with_options(opts())
        .primes_with_fds(1000)
        .await
        .context("child.primes")?;
    ensure!(
        fds.len() == 1,
        "child.primes answered with {} fds",
        fds.len()
    );
    let memfd = fds.remove(0);
    let target = fd_target(&memfd);
    let seals = rustix::fs::fcntl_get_seals(&memfd).context("reading the memfd's seals")?;
    let mut file = File::from(memfd);
    file.rewind().context("rewinding the memfd")?;
    let mut text = String::new();
    file.take(MAX_READ)
        .read_to_string(&mut text)
        .context("reading the memfd")?;
    let primes: Vec<u32> = text
        .lines()
        .map(|l| l.parse())
        .collect::<Result<_, _>>()
        .context("the memfd holds something else than numbers")?;
    ensure!(
        text.len() as u64 == report.bytes && primes.len() as u64 == report.count,
        "the memfd holds {} primes in {} bytes, the child said {report:?}",
        primes.len(),
        text.len()
    );
    say!(
        "parent: 2. the child answered primes(1000) with a memfd ({target}, sealed against \
         writes: {}): {} primes in {} bytes, the last {}",
        seals.contains(SealFlags::WRITE),
        primes.len(),
        text.len(),
        primes.last().copied().unwrap_or_default()
    );
    Ok(())
}

/// One connection to `addr`: what the server says before it closes.
async fn fetch_line(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::time::timeout(WAIT, async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let mut text = String::new();
        stream.take(4096).read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    })
    .await
    .with_context(|| format!("no answer from {addr} within {WAIT:?}"))?
    .with_context(|| format!("talking to {addr}"))
}

/// Case 3: the child serves on a socket the parent bound.
async fn hand_over_socket(worker: &WorkerClient, child_pid: u32) -> anyhow::Result<()> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 for the child")?;
    let addr = listener.local_addr()?;
    // The options own our copy of the socket: dropping them leaves the child's the only one.
    let with_socket = opts().fds([OwnedFd::from(listener)]);
    let served_at = worker
        .with_options(with_socket)
        .serve_socket()
        .await
        .context("child.serve_socket")?;
    ensure!(
        served_at == addr.to_string(),
        "the child serves {served_at}, not our {addr}"
    );
    say!("parent: 3. bound {addr} and passed it to the child; our copy is closed");
    let expected = format!("hello from the child (pid {child_pid}), connection ");
    for n in 1..=3 {
        let line = fetch_line(addr).await?;
        ensure!(
            line == format!("{expected}{n}\n"),
            "connection {n} to {addr} got {line:?}"
        );
        say!("parent: 3. connection {n} to {addr}: {:?}", line.trim_end());
    }
    let answered = worker.stop_serving().await.context("child.stop_serving")?;
    ensure!(
        answered == 3,
        "the child answered {answered} connections, not 3"
    );
    say!("parent: 3. the child answered {answered} connections and closed the socket");
    Ok(())
}

/// Over a TCP link (no fds): a call with an fd, and a handler answering with one. Both
/// statuses, which should be `FAILED_PRECONDITION`.
async fn refusals_over_tcp() -> anyhow::Result<(Status, Status)> {
    let server = worker_server();
    let options = BindOptions::default().on_session(move |session| {
        if let Ok(calls) = session.listen("worker") {
            serve(server.clone(), calls);
        }
    });
    let mut listener = netchan::bind("127.0.0.1:0", options).await?;
    let addr = listener.local_addr().clone();
    let session = netchan::connect(&addr, ConnectOptions::default().timeout(WAIT)).await?;
    let _server_end = tokio::time::timeout(WAIT, listener.accept())
        .await
        .context("accepting the TCP session")??;
    let conn = tokio::time::timeout(WAIT, session.dial("worker"))
        .await
        .context("dialling the worker over TCP")??;
    let worker = WorkerClient::new(rpc::Client::new(conn));

    let (path, fd) = unlinked_file("tcp.txt", NOTES)?;
    let with_fd = worker
        .with_options(opts().fds([fd]))
        .read_file(path.display().to_string())
        .await;
    let Err(request_refused) = with_fd else {
        bail!("a call with an fd over TCP succeeded");
    };
    let reply = worker
        .client()
        .call_with_fds::<_, PrimesReport>("Worker.primes", &1000u32, opts())
        .await;
    let Err(reply_refused) = reply else {
        bail!("a response with an fd over TCP succeeded");
    };
    drop(worker);
    session.close().await;
    Ok((request_refused, reply_refused))
}

async fn run_parent() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to spawn it")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("child").kill_on_drop(true);
    // Our channel to the child's worker is still open when we close: no need to wait long.
    let config = mux::Config::default().close_grace(Duration::from_millis(200));
    let link = child::spawn_with(cmd, config, |_| {})?;
    let pid = link.id();
    say!("parent: spawned child pid {pid} with the link at fd 3");
    let conn = tokio::time::timeout(WAIT, link.session().dial("worker"))
        .await
        .context("dialling the child's worker")??;
    let worker = WorkerClient::new(rpc::Client::new(conn)).with_options(opts());

    let (child_before, parent_before) = (worker.open_fds().await?, open_fds());
    say!("parent: the child's fds before the calls: {child_before:?}");
    pass_unlinked_file(&worker).await?;
    pass_denied_file(&worker).await?;
    fetch_primes(&worker).await?;
    hand_over_socket(&worker, pid).await?;
    let (child_after, parent_after) = (worker.open_fds().await?, open_fds());
    say!("parent: the child's fds after the calls: {child_after:?}");
    ensure!(
        child_after == child_before,
        "the child leaked fds: {child_before:?} before, {child_after:?} after"
    );
    ensure!(
        parent_after == parent_before,
        "the parent leaked fds: {parent_before:?} before, {parent_after:?} after"
    );
    say!("parent: no fd leaked, in the child or here");

    let (request, reply) = refusals_over_tcp().await?;
    say!("parent: 4. over TCP, a call with an fd is refused: {request}");
    say!("parent: 4. over TCP, a response with an fd is refused: {reply}");
    ensure!(
        request.code() == Code::FailedPrecondition && reply.code() == Code::FailedPrecondition,
        "expected FAILED_PRECONDITION over TCP"
    );

    // Our channel to the worker stays open through the close (the grace above cuts it):
    // dropping it first makes the child answer its end after we dropped the link, and its
    // session end with an i/o error (a netchan-mux bug, pinned by a test below).
    link.session().close().await;
    drop(worker);
    let status = tokio::time::timeout(Duration::from_secs(30), link.wait())
        .await
        .context("the child did not exit within 30 s of the close")?
        .context("the child's exit status is unknown")?;
    say!("parent: child exited ({status})");
    ensure!(status.success(), "the child failed: {status}");
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let is_child = std::env::args().nth(1).as_deref() == Some("child");
    let result = runtime.block_on(async move {
        if is_child {
            run_child().await
        } else {
            run_parent().await
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fds_over_a_tcp_link_fail_at_once_with_failed_precondition() {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(30), refusals_over_tcp())
            .await
            .expect("the refusals came within 30 s")
            .expect("the TCP link works");
        assert_eq!(request.code(), Code::FailedPrecondition, "{request}");
        assert_eq!(reply.code(), Code::FailedPrecondition, "{reply}");
    }

    /// A worker served on one end of a unix socket pair that passes fds, and a client of it.
    async fn worker_over_a_socket_pair() -> (mux::Session, mux::Session, WorkerClient) {
        let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
        let builder = mux::Session::builder_with_fds(b, mux::Mode::Server, mux::Config::default());
        serve(worker_server(), builder.listen("worker").expect("listen"));
        let server = builder.start();
        let client = mux::Session::with_fds(a, mux::Mode::Client, mux::Config::default());
        let conn = tokio::time::timeout(WAIT, client.dial("worker"))
            .await
            .expect("dialled within the wait")
            .expect("dial");
        let worker = WorkerClient::new(rpc::Client::new(conn)).with_options(opts());
        (client, server, worker)
    }

    #[tokio::test]
    async fn the_worker_refuses_calls_without_the_fd_they_need_naming_it() {
        let (_client, _server, worker) = worker_over_a_socket_pair().await;
        let none = worker.read_file("/nowhere".into()).await.unwrap_err();
        assert_eq!(none.code(), Code::InvalidArgument, "{none}");
        assert!(none.message().contains("(a file to read)"), "{none}");
        assert!(none.message().ends_with("got 0"), "{none}");

        let two = [NOTES, NOTES].map(|t| unlinked_file("two.txt", t).unwrap().1);
        let two = worker
            .with_options(opts().fds(two))
            .read_file("/nowhere".into())
            .await
            .unwrap_err();
        assert_eq!(two.code(), Code::InvalidArgument, "{two}");
        assert!(two.message().ends_with("got 2"), "{two}");

        let (_, file) = unlinked_file("not-a-socket.txt", NOTES).unwrap();
        let not_a_socket = worker
            .with_options(opts().fds([file]))
            .serve_socket()
            .await
            .unwrap_err();
        assert_eq!(not_a_socket.code(), Code::InvalidArgument, "{not_a_socket}");
        assert!(
            not_a_socket.message().contains("not a TCP socket"),
            "{not_a_socket}"
        );

        let idle = worker.stop_serving().await.unwrap_err();
        assert_eq!(idle.code(), Code::FailedPrecondition, "{idle}");
        let huge = worker.primes(MAX_PRIMES_LIMIT + 1).await.unwrap_err();
        assert_eq!(huge.code(), Code::InvalidArgument, "{huge}");
    }

    /// Regression: over TCP the refusal used to blame the peer ("the peer does not take
    /// them") when it is the link that cannot carry descriptors.
    #[tokio::test]
    async fn the_tcp_refusal_names_the_link_not_the_peer() {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(30), refusals_over_tcp())
            .await
            .expect("the refusals came within 30 s")
            .expect("the TCP link works");
        for status in [request, reply] {
            assert!(
                !status.message().contains("the peer does not take them"),
                "{status}"
            );
        }
    }

    /// Regression: one side drops a channel and closes its session at once (a graceful
    /// close); the other side, answering the channel's end, wrote after the closer had dropped
    /// the link, and its session ended with an I/O error (`ECONNRESET`/`EPIPE`) instead of
    /// `CloseReason::Peer` although it had the closer's GoAway. Racy, so it tries 200 times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_right_after_dropping_a_channel_ends_the_peer_with_peer() {
        use tokio::io::AsyncReadExt;
        for round in 0..200 {
            let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
            let builder =
                mux::Session::builder_with_fds(b, mux::Mode::Server, mux::Config::default());
            let mut listener = builder.listen("x").expect("listen");
            let server = builder.start();
            let client = mux::Session::with_fds(a, mux::Mode::Client, mux::Config::default());
            let conn = client.dial("x").await.expect("dial");
            let mut accepted = listener.accept().await.expect("accept");
            // Like a server on the channel: it closes its end once the caller closed theirs.
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                while let Ok(n @ 1..) = accepted.read(&mut buf).await {
                    let _ = n;
                }
            });
            drop(conn);
            client.close().await;
            let reason = tokio::time::timeout(Duration::from_secs(10), server.closed())
                .await
                .expect("the server's session ended within 10 s");
            assert!(
                matches!(reason, mux::CloseReason::Peer),
                "round {round}: the server's session ended with {reason}"
            );
        }
    }

    #[test]
    fn primes_below_1000_are_168_ending_in_997() {
        let primes = primes_below(1000);
        assert_eq!(primes.len(), 168);
        assert_eq!(primes[..5], [2, 3, 5, 7, 11]);
        assert_eq!(primes.last(), Some(&997));
        assert!(primes_below(2).is_empty());
    }
}
