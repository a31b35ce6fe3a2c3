//! A command executor over netchan (seed 000: run a command where the server is, e.g. inside a
//! container, and get its output as it runs).
//!
//! The server runs only programs on the allowlist it was started with, each in its own process
//! group. Output comes back line by line, stdout and stderr interleaved as they arrive, then the
//! exit status. Output is bounded end to end: lines go through a small queue and the RPC
//! stream's credit window, so a client that reads slowly (or not at all) stops the program at
//! its next write instead of growing the server's memory. When the call ends early — the
//! client's Ctrl-C drops the call, its deadline passes, or the client vanishes with its
//! session — the whole process group is killed with SIGKILL.
//!
//! # Layout
//!
//! - this file: the wire types, the [`Exec`] service and [`ExecServer`];
//! - `main.rs`: the `exec` binary (`serve`, `run`, `demo`).
//!
//! The sessions live as long as their peer keeps them: dropping an accepted `Session` handle
//! does not end it while its channels are open.

use std::{
    collections::BTreeSet,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures::StreamExt;
use netchan::{
    rpc::{self, rpc_service, Context, ItemStream, Status},
    Addr, BindOptions,
};
use serde::{Deserialize, Serialize};
use tokio::{process::Command, sync::mpsc, sync::watch, task::JoinHandle};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// The channel name the server listens on in every session.
pub const CHANNEL: &str = "exec";

/// The longest output line sent whole; longer lines are cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

/// Lines queued between the pipes and the RPC stream (whose own window adds 16 more).
const LINE_QUEUE: usize = 16;

/// A program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    /// The program, as named on the server's allowlist.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// One item of a run's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// A line the program wrote to stdout (without its newline).
    Stdout(String),
    /// A line the program wrote to stderr (without its newline).
    Stderr(String),
    /// The program ended: the last item.
    Exited(ExitInfo),
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "killed by signal {signal}"),
            (None, None) => f.write_str("unknown exit"),
        }
    }
}

/// Runs allowlisted commands.
#[rpc_service]
pub trait Exec {
    /// Runs `cmd` and streams its output lines, then its exit status.
    /// `PermissionDenied` for a program not on the allowlist, `NotFound` if it cannot start.
    async fn run(&self, ctx: Context, cmd: CommandLine) -> Result<ItemStream<Output>, Status>;
}

/// What a server has done, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Output lines read from programs' pipes and queued for their callers.
    pub lines_queued: AtomicU64,
    /// Process groups killed because their call ended early.
    pub groups_killed: AtomicU64,
}

/// The [`Exec`] implementation: an allowlist and counters.
#[derive(Clone)]
pub struct ExecServer {
    allow: Arc<BTreeSet<String>>,
    stats: Arc<Stats>,
    running: Arc<watch::Sender<usize>>,
}

impl ExecServer {
    /// A server that runs exactly the programs in `allow` (matched as given, no lookup).
    pub fn new(allow: impl IntoIterator<Item = String>) -> ExecServer {
        ExecServer {
            allow: Arc::new(allow.into_iter().collect()),
            stats: Arc::default(),
            running: Arc::new(watch::channel(0).0),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How many runs are in progress, watched: a run counts until its process group is gone.
    pub fn running(&self) -> watch::Receiver<usize> {
        self.running.subscribe()
    }
}

impl Exec for ExecServer {
    async fn run(&self, ctx: Context, cmd: CommandLine) -> Result<ItemStream<Output>, Status> {
        // Who: the session the call came on (see `bind`).
        let who = ctx.peer().unwrap_or("unknown").to_owned();
        if !self.allow.contains(&cmd.program) {
            tracing::info!(%who, program = %cmd.program, args = ?cmd.args, "refused: not on the allowlist");
            return Err(Status::permission_denied(format!(
                "command {:?} is not on this server's allowlist",
                cmd.program
            )));
        }
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so the whole tree can be killed at once.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Status::not_found(format!("cannot start {:?}: {e}", cmd.program)))?;
        let pgid = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32));
        tracing::info!(
            %who,
            program = %cmd.program,
            args = ?cmd.args,
            pid = pgid.map(|p| p.as_raw_nonzero().get()),
            "running"
        );
        let program = cmd.program.clone();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (lines, queue) = mpsc::channel(LINE_QUEUE);
        let stats = self.stats.clone();
        let task = tokio::spawn(async move {
            let out = FramedRead::new(
                stdout.expect("piped"),
                LinesCodec::new_with_max_length(MAX_LINE),
            )
            .map(|l| l.map(Output::Stdout));
            let err = FramedRead::new(
                stderr.expect("piped"),
                LinesCodec::new_with_max_length(MAX_LINE),
            )
            .map(|l| l.map(Output::Stderr));
            let mut merged = futures::stream::select(out, err);
            let mut status = None;
            loop {
                tokio::select! {
                    line = merged.next() => match line {
                        Some(Ok(line)) => {
                            // Waits while the queue is full: that is the backpressure.
                            if lines.send(line).await.is_err() {
                                return;
                            }
                            stats.lines_queued.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                            let cut = Output::Stderr(format!("[exec: a line over {MAX_LINE} bytes was dropped]"));
                            if lines.send(cut).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(LinesCodecError::Io(e))) => {
                            tracing::warn!(error = %e, "reading output failed");
                            break;
                        }
                        None => break,
                    },
                    exited = child.wait(), if status.is_none() => {
                        status = Some(exited);
                        // The leader is gone: stop what it left running in its group, so
                        // the pipes close and the run ends.
                        if let Some(pgid) = pgid {
                            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                        }
                    }
                }
            }
            let status = match status {
                Some(status) => status,
                None => child.wait().await,
            };
            let info = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => ExitInfo {
                    code: None,
                    signal: None,
                },
            };
            tracing::info!(%who, %program, status = %info, "finished");
            let _ = lines.send(Output::Exited(info)).await;
        });
        self.running.send_modify(|n| *n += 1);
        let guard = GroupGuard {
            pgid,
            task,
            stats: self.stats.clone(),
            running: self.running.clone(),
        };
        let stream = futures::stream::unfold((queue, guard), |(mut queue, guard)| async move {
            let item = queue.recv().await?;
            Some((Ok(item), (queue, guard)))
        });
        Ok(Box::pin(stream))
    }
}

/// Owns a run: dropping it before the run ended (the call was cancelled, its deadline passed,
/// its session died) kills the process group.
struct GroupGuard {
    pgid: Option<rustix::process::Pid>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
    running: Arc<watch::Sender<usize>>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            if let Some(pgid) = self.pgid {
                tracing::info!(
                    pgid = pgid.as_raw_nonzero().get(),
                    "call ended early: killing the process group"
                );
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                self.stats.groups_killed.fetch_add(1, Ordering::Relaxed);
            }
            // Dropping the task drops the child (kill_on_drop); tokio reaps it.
            self.task.abort();
        }
        self.running.send_modify(|n| *n -= 1);
    }
}

/// Binds `addr` and serves `server` on every session: each session listens on [`CHANNEL`]
/// before it reads the client's first dial. Run [`serve`] on the listener.
pub async fn bind(
    addr: &Addr,
    server: ExecServer,
) -> Result<netchan::Listener, netchan::net::BindError> {
    let mut rpc_server = rpc::Server::new();
    rpc_server.add(server.into_service());
    let sessions = AtomicU64::new(0);
    let options = BindOptions::default().on_session(move |session| {
        let Ok(mut calls) = session.listen(CHANNEL) else {
            return;
        };
        // Calls are logged with the session they came on.
        let who = format!("session {}", sessions.fetch_add(1, Ordering::Relaxed) + 1);
        tracing::info!(%who, "client connected");
        let rpc_server = rpc_server.clone();
        tokio::spawn(async move {
            while let Ok(conn) = calls.accept().await {
                let (rpc_server, who) = (rpc_server.clone(), who.clone());
                tokio::spawn(async move { rpc_server.serve_named(conn, who).await });
            }
        });
    });
    netchan::bind(addr, options).await
}

/// Accepts sessions until the task is dropped; they serve themselves (see [`bind`]).
pub async fn serve(mut listener: netchan::Listener) {
    loop {
        match listener.accept().await {
            Ok(_session) => tracing::debug!("session accepted"),
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}
