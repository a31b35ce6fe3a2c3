//! Test support shared by netchan's test suites and benchmarks (dev-only, never published).
//!
//! It depends on tokio (and, with feature `yamux`, on the `yamux` crate), not on any
//! netchan crate, so every crate of the workspace can take it as a dev-dependency without a
//! cycle.
//!
//! # Layout
//! - [`within`]: a hang guard for any future.
//! - [`tcp_pair`]: a connected pair of loopback TCP sockets with `TCP_NODELAY`.
//! - [`counting_waker`]: a waker that counts its wakes, for tests of who wakes whom.
//! - [`ends_quietly_without_stdout`]: a program whose stdout reader goes away (`… | head`)
//!   must end with status 0 and no panic.
//! - [`proxy`]: a loopback TCP proxy that simulates a link (delay, bandwidth, faults).
//! - [`fds`] (unix): unlinked files, open-descriptor counts and listings for the fd-passing
//!   tests and examples.
//! - `yamux` (feature `yamux`): a `yamux` crate peer in a task of its own, the interop oracle
//!   and baseline of the mux's tests and benchmarks.
//! - [`etcd`]: real etcd clusters on loopback (start, kill, restart a member, find the leader).

pub mod etcd;
#[cfg(unix)]
pub mod fds;
pub mod proxy;
#[cfg(feature = "yamux")]
pub mod yamux;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Wake, Waker},
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};

/// Awaits `fut`, panicking with `what` if it takes longer than `secs` seconds.
///
/// Every wait in a test goes through a guard like this one, so a hang fails the test with a
/// message instead of stalling the suite.
pub async fn within<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// A connected pair of loopback TCP sockets (client, server), both with `TCP_NODELAY` set.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect loopback");
    let (server, _) = server.expect("accept loopback");
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    (client, server)
}

/// The count of a [`counting_waker`]'s wakes.
#[derive(Debug, Default)]
pub struct WakeCount(AtomicUsize);

impl WakeCount {
    /// How many times the waker (or a clone of it) was woken so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A waker that only counts its wakes, and the count.
pub fn counting_waker() -> (Waker, Arc<WakeCount>) {
    let count = Arc::new(WakeCount::default());
    (Waker::from(count.clone()), count)
}

/// Runs `cmd` with its stdout closed at once (as `cmd | head` does once `head` has had
/// enough) and asserts that it ends within `secs` seconds with status 0 and nothing about a
/// panic on stderr. Returns its stderr.
pub async fn ends_quietly_without_stdout(mut cmd: tokio::process::Command, secs: u64) -> String {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the program");
    drop(child.stdout.take());
    let out = within(secs, "the program ends", child.wait_with_output())
        .await
        .expect("wait for the program");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_counting_waker_counts_the_wakes_of_every_clone() {
        let (waker, count) = counting_waker();
        assert_eq!(count.count(), 0);
        let clone = waker.clone();
        waker.wake_by_ref();
        waker.wake();
        clone.wake();
        assert_eq!(count.count(), 3);
    }

    #[tokio::test]
    async fn tcp_pair_is_connected_both_ways() {
        let (mut a, mut b) = tcp_pair().await;
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        within(5, "read ping", b.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").await.unwrap();
        within(5, "read pong", a.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1 s: never")]
    async fn within_panics_naming_the_wait() {
        within(1, "never", std::future::pending::<()>()).await;
    }
}
