//! A session to a child process over an inherited Unix socket (the parent spawns, both sides
//! serve and call).
//!
//! The parent calls [`spawn`] with a `tokio::process::Command`: it makes a socket pair, places
//! one end at fd [`CHILD_FD`] (3) in the child, sets the environment variable [`FD_ENV`]
//! (`NETCHAN_CHILD_FD=3`) and closes its own copy of that end once the child runs. The child
//! calls [`from_env`] to build its session from that fd. The parent's session is
//! [`Mode::Client`](crate::mux::Mode), the child's [`Mode::Server`](crate::mux::Mode); either
//! side may listen and dial.
//!
//! Nothing else reaches the child: every fd above 3 is closed on exec, even one the parent
//! left inheritable by mistake. The child's stdin, stdout and stderr stay as the `Command`
//! sets them, free for the program's own use (logs on stderr do not touch the link).
//!
//! Both sessions pass file descriptors ([`Session::with_fds`](crate::mux::Session::with_fds)):
//! a call or a channel can hand the other process an open file, a socket or a memfd.
//!
//! When the child exits without closing its session, the parent's session ends with
//! [`CloseReason::Io`](crate::mux::CloseReason) carrying a [`ChildExited`] that names the
//! process and its exit status; a child that closes its session first ends it with
//! `CloseReason::Peer`.

mod fd;

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    process::ExitStatus,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{
    net::UnixStream,
    sync::{oneshot, watch},
};

use crate::mux::{self, Session};

/// The environment variable [`spawn`] sets in the child: the number of the inherited fd.
pub const FD_ENV: &str = "NETCHAN_CHILD_FD";

/// The fd number the child finds its end of the link at.
pub const CHILD_FD: i32 = 3;

/// How long the parent waits for the child's exit status once the child closed its end of the
/// link, to name that status in the session's close reason.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Why a child link could not be made.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The socket pair could not be created (out of fds?).
    #[error("cannot create the socket pair for the child: {0}")]
    SocketPair(io::Error),
    /// The program could not be started.
    #[error("cannot spawn {program}: {error}")]
    Spawn {
        /// The program.
        program: String,
        /// Why (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// Child side: [`FD_ENV`] is not set, so this process was not spawned by [`spawn`].
    #[error("{FD_ENV} is not set: this process was not spawned with netchan::net::child::spawn")]
    NotAChild,
    /// Child side: [`FD_ENV`] does not hold an fd number.
    #[error("{FD_ENV}={value:?} is not a file descriptor number")]
    BadEnv {
        /// The variable's value.
        value: String,
    },
    /// Child side: the fd named by [`FD_ENV`] is not an open Unix socket.
    #[error("fd {fd} named by {FD_ENV} is not an open unix socket: {error}")]
    NotASocket {
        /// The fd number.
        fd: i32,
        /// What the check said (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// Child side: [`from_env`] was already called in this process; the fd has one owner.
    #[error("the inherited link was already taken by an earlier from_env call")]
    AlreadyTaken,
}

/// The reason a child's link ended without a graceful close: the child exited (or closed its
/// end). Found inside [`CloseReason::Io`](crate::mux::CloseReason) of the parent's session.
#[derive(Debug, Clone, thiserror::Error)]
#[error("child process {pid} ({program}) {}", describe(.status))]
pub struct ChildExited {
    /// The child's process id.
    pub pid: u32,
    /// The program as given to the command.
    pub program: String,
    /// The exit status, or `None` if the child closed the link and was still running
    /// 5 s later.
    pub status: Option<ExitStatus>,
}

fn describe(status: &Option<ExitStatus>) -> String {
    match status {
        Some(status) => format!("exited ({status}) without closing its session"),
        None => "closed its end of the link and is still running".to_owned(),
    }
}

/// A running child with a session to it. See the [module docs](self).
///
/// Dropping it does not kill the child (set `kill_on_drop` on the command for that); a task
/// owned by the runtime reaps the child when it exits.
#[derive(Debug)]
pub struct ChildLink {
    session: Session,
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    kill: Option<oneshot::Sender<()>>,
}

/// Spawns `cmd` with one end of a Unix socket pair at fd 3 and returns a session to it.
///
/// The child finds the fd through [`FD_ENV`] and builds its session with [`from_env`]. The
/// parent's copy of the child's end is closed before this returns; fds above 3 are closed on
/// exec in the child. Takes the command by value: its setup refers to a socket that exists only
/// for this one spawn.
///
/// # Panics
///
/// Panics if called outside a tokio runtime (the session's driver and the reaper are spawned).
pub fn spawn(cmd: tokio::process::Command, config: mux::Config) -> Result<ChildLink, ChildError> {
    spawn_with(cmd, config, |_| {})
}

/// Like [`spawn`], running `setup` on the session before it reads anything from the child:
/// the place to [`listen`](Session::listen) on the names the child dials, so no dial of the
/// child's can arrive before its listener.
pub fn spawn_with(
    mut cmd: tokio::process::Command,
    config: mux::Config,
    setup: impl Fn(&Session) + Send + Sync + 'static,
) -> Result<ChildLink, ChildError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let (parent_end, child_end) =
        std::os::unix::net::UnixStream::pair().map_err(ChildError::SocketPair)?;
    // A duplicate is numbered 3 or above (F_DUPFD_CLOEXEC from 3), so placing it cannot clash
    // with the stdio the command sets up in the child first.
    let child_end = OwnedFd::from(child_end)
        .try_clone()
        .map_err(ChildError::SocketPair)?;
    cmd.env(FD_ENV, CHILD_FD.to_string());
    fd::inherit_as(&mut cmd, child_end.as_raw_fd(), CHILD_FD);
    let spawned = cmd.spawn();
    // The parent keeps no copy of the child's end: when the child exits, the link's last
    // other fd is gone and our reads see it.
    drop(child_end);
    let mut child = spawned.map_err(|error| ChildError::Spawn {
        program: program.clone(),
        error,
    })?;
    let pid = child.id().unwrap_or(0);

    let (exit_tx, exit) = watch::channel(None);
    let (kill, kill_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            Ok(()) = kill_rx => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        match status {
            Ok(status) => {
                tracing::debug!(pid, %status, "child exited");
                let _ = exit_tx.send(Some(status));
            }
            Err(e) => tracing::warn!(pid, error = %e, "waiting for the child failed"),
        }
    });

    let map_err = |error| ChildError::SocketPair(error);
    parent_end.set_nonblocking(true).map_err(map_err)?;
    let io = UnixStream::from_std(parent_end).map_err(map_err)?;
    let builder = Session::builder_with_fds(io, mux::Mode::Client, config);
    setup(builder.session());
    // A link that fails without the child closing its session: name the child's exit.
    let mut watch_exit = exit.clone();
    let builder = builder.explain_end(move |reason| async move {
        let status = tokio::time::timeout(EXIT_GRACE, watch_exit.wait_for(|s| s.is_some()))
            .await
            .ok()
            .and_then(|s| s.ok().and_then(|s| *s));
        let exited = ChildExited {
            pid,
            program,
            status,
        };
        tracing::debug!(%reason, %exited, "link to the child ended");
        mux::CloseReason::Io(std::sync::Arc::new(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            exited,
        )))
    });
    Ok(ChildLink {
        session: builder.start(),
        pid,
        exit,
        kill: Some(kill),
    })
}

impl ChildLink {
    /// The session to the child.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit and returns its status. Cancel-safe.
    pub async fn wait(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let status = exit.wait_for(|s| s.is_some()).await.ok()?;
        *status
    }

    /// Sends the child SIGKILL (once; later calls do nothing). [`wait`](Self::wait) then gives
    /// its status.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// Child side: builds this process's session from the socket its parent passed at the fd named
/// by [`FD_ENV`]. Call it once per process; the fd is made close-on-exec so the process's own
/// children do not inherit it.
///
/// # Panics
///
/// Panics if called outside a tokio runtime (it spawns the session's driver).
pub fn from_env(config: mux::Config) -> Result<Session, ChildError> {
    Ok(Session::with_fds(
        stream_from_env()?,
        mux::Mode::Server,
        config,
    ))
}

/// Like [`from_env`], running `setup` on the session before it reads anything from the
/// parent (see [`spawn_with`]).
pub fn from_env_with(
    config: mux::Config,
    setup: impl Fn(&Session) + Send + Sync + 'static,
) -> Result<Session, ChildError> {
    let setup = super::gate::OnSession(std::sync::Arc::new(setup));
    Ok(super::gate::start_unix(
        stream_from_env()?,
        mux::Mode::Server,
        config,
        Some(&setup),
    ))
}

/// Child side: the inherited socket itself, for a caller that builds its session by hand.
pub fn stream_from_env() -> Result<UnixStream, ChildError> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let value = std::env::var(FD_ENV).map_err(|_| ChildError::NotAChild)?;
    let fd: i32 = value.trim().parse().map_err(|_| ChildError::BadEnv {
        value: value.clone(),
    })?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ChildError::AlreadyTaken);
    }
    let not_a_socket = |error| ChildError::NotASocket { fd, error };
    let owned = fd::take(fd).map_err(not_a_socket)?;
    let std = std::os::unix::net::UnixStream::from(owned);
    // getsockname fails on anything that is not a Unix socket.
    std.local_addr().map_err(not_a_socket)?;
    std.set_nonblocking(true).map_err(not_a_socket)?;
    UnixStream::from_std(std).map_err(not_a_socket)
}
