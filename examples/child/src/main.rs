//! The child-process link (seed 001): a parent spawns this same program as its child over a
//! Unix socket inherited at fd 3, then each side serves a service the other calls, including
//! a nested callback (the parent calls the child, which calls the parent back during the call).
//!
//! Run `cargo run -p child`. The child is this binary run with the `child` argument; it finds
//! its end of the link through `NETCHAN_CHILD_FD`, set by `netchan::net::child::spawn`.

use std::time::Duration;

use anyhow::Context as _;
use netchan::{
    mux,
    net::child,
    rpc::{self, rpc_service, CallOptions, Context, Status},
};

/// Writes one line to stdout; a closed stdout (`child … | head`) ends the program quietly
/// with status 0, as it does a shell tool, instead of a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("child: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`say`].
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

/// What the parent serves to its child.
#[rpc_service]
pub trait Parent {
    /// How the parent would address `name`.
    async fn title(&self, ctx: Context, name: String) -> Result<String, Status>;
}

/// What the child serves to its parent.
#[rpc_service]
pub trait Worker {
    /// The fds the child was born with (read from `/proc/self/fd` before anything else).
    async fn fds(&self, ctx: Context) -> Result<Vec<i32>, Status>;
    /// Greets `name`, asking the parent how to address them (a nested callback).
    async fn greet(&self, ctx: Context, name: String) -> Result<String, Status>;
    /// Sums the numbers.
    async fn sum(&self, ctx: Context, numbers: Vec<u64>) -> Result<u64, Status>;
}

struct ParentImpl;

impl Parent for ParentImpl {
    async fn title(&self, _ctx: Context, name: String) -> Result<String, Status> {
        Ok(format!("dear {name}"))
    }
}

struct WorkerImpl {
    born_with: Vec<i32>,
    parent: ParentClient,
}

impl Worker for WorkerImpl {
    async fn fds(&self, _ctx: Context) -> Result<Vec<i32>, Status> {
        Ok(self.born_with.clone())
    }

    async fn greet(&self, ctx: Context, name: String) -> Result<String, Status> {
        // The parent's call to us is still open while we call the parent: the deadline
        // travels along.
        let title = self
            .parent
            .with_options(CallOptions::propagate(&ctx))
            .title(name)
            .await?;
        Ok(format!("hello, {title} (pid {})", std::process::id()))
    }

    async fn sum(&self, _ctx: Context, numbers: Vec<u64>) -> Result<u64, Status> {
        numbers
            .iter()
            .try_fold(0u64, |acc, n| acc.checked_add(*n))
            .ok_or_else(|| Status::out_of_range("the sum overflows u64"))
    }
}

/// Serves `server` on every channel opened to `listener`, in a task that ends with the
/// listener's session.
fn serve(server: rpc::Server, listener: mux::Listener) {
    tokio::spawn(async move { server.serve_all(listener).await });
}

/// The fds open in this process right now.
fn open_fds() -> Vec<i32> {
    netchan_testkit::fds::open_fd_list()
        .into_iter()
        .map(|(fd, _)| fd)
        .collect()
}

async fn run_child(born_with: Vec<i32>) -> anyhow::Result<()> {
    // Listen in the setup: it runs before the session reads the parent's first dial.
    let session = child::from_env_with(mux::Config::default(), move |session| {
        let Ok(calls) = session.listen("worker") else {
            return;
        };
        let (session, born_with) = (session.clone(), born_with.clone());
        tokio::spawn(async move {
            let parent = match session.dial("parent").await {
                Ok(conn) => ParentClient::new(rpc::Client::new(conn)),
                Err(e) => return eprintln!("child: cannot reach the parent: {e}"),
            };
            let mut server = rpc::Server::new();
            server.add(WorkerImpl { born_with, parent }.into_service());
            serve(server, calls);
        });
    })
    .context("building the child's link")?;
    // The parent closes the session when it is done with us.
    let reason = session.closed().await;
    eprintln!("child: session ended ({reason}), exiting");
    Ok(())
}

async fn run_parent() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to spawn it")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("child").kill_on_drop(true);
    // The child keeps its channel to our Parent service open to the end, so our graceful
    // close would wait out the default 5 s grace for it: keep the grace short.
    let config = mux::Config::default().close_grace(Duration::from_millis(200));
    // Serve Parent from the start: the child may dial it before we get to run another line.
    let link = child::spawn_with(cmd, config, |session| {
        if let Ok(calls) = session.listen("parent") {
            let mut server = rpc::Server::new();
            server.add(ParentImpl.into_service());
            serve(server, calls);
        }
    })?;
    say!(
        "parent: spawned child pid {} with the link at fd 3",
        link.id()
    );

    let worker = WorkerClient::new(rpc::Client::new(link.session().dial("worker").await?))
        .with_options(CallOptions::default().timeout(Duration::from_secs(10)));
    let fds = worker.fds().await?;
    say!("parent: the child was born with fds {fds:?}");
    let greeting = worker.greet("ada".to_string()).await?;
    say!("parent: child.greet(\"ada\") = {greeting:?} (the child called parent.title back)");
    let sum = worker.sum((1..=100).collect()).await?;
    say!("parent: child.sum(1..=100) = {sum}");
    let err = worker.sum(vec![u64::MAX, 1]).await.unwrap_err();
    say!("parent: child.sum([u64::MAX, 1]) failed: {err}");

    link.session().close().await;
    let status = tokio::time::timeout(Duration::from_secs(30), link.wait())
        .await
        .context("the child did not exit within 30 s of the close")?
        .context("the child's exit status is unknown")?;
    say!("parent: child exited ({status})");
    anyhow::ensure!(status.success(), "the child failed: {status}");
    Ok(())
}

fn main() {
    // Count fds before the runtime opens its own.
    let born_with = open_fds();
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
            run_child(born_with).await
        } else {
            run_parent().await
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
