//! Keepalive (yamux 0.14 has none): detect a peer that stopped answering.
//!
//! Any inbound byte counts as liveness ([`Socket`](crate::socket::Socket) stamps the time of
//! every read), so a busy link never pings and bulk traffic cannot cause a false timeout.
//! When nothing has arrived for `keepalive_interval`, a pinger task writes one byte on an
//! internal channel ([`KEEPALIVE_NAME`]) that the peer echoes back. When still nothing has
//! arrived `keepalive_timeout` later, the driver ends the session with
//! [`CloseReason::KeepaliveTimeout`].

use crate::{
    channel::Conn,
    driver::Command,
    error::CloseReason,
    handshake::{self, Status, KEEPALIVE_NAME},
    session::{self, Shared},
};
use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, Notify},
    time::{Instant, Sleep},
};
use tokio_util::compat::Compat;
use tracing::Instrument;

/// The driver's side of keepalive: a timer that asks the pinger for a ping when the link has
/// been quiet for the interval, and gives up after the timeout.
pub(crate) struct Keepalive {
    interval: Duration,
    /// `keepalive_interval + keepalive_timeout`, saturating (the config may say `Duration::MAX`).
    give_up: Duration,
    timer: Pin<Box<Sleep>>,
    ping: Arc<Notify>,
    /// The liveness stamp we already pinged for (one ping per quiet period).
    pinged_for: Option<Instant>,
}

impl Keepalive {
    /// Starts keepalive for a session (spawning its pinger), unless it is disabled.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        handles: mpsc::WeakSender<Command>,
    ) -> Option<Keepalive> {
        let interval = shared.config.keepalive_interval?;
        let timeout = shared.config.keepalive_timeout;
        let ping = Arc::new(Notify::new());
        let span = tracing::debug_span!("pinger");
        tokio::spawn(pinger(shared.clone(), handles, ping.clone()).instrument(span));
        Some(Keepalive {
            interval,
            give_up: interval.saturating_add(timeout),
            timer: Box::pin(tokio::time::sleep(interval)),
            ping,
            pinged_for: None,
        })
    }

    /// Ready with the close reason once the peer has been silent for interval + timeout.
    ///
    /// Cheap when nothing is due: the timer is only re-armed when it fires (at most a few times
    /// per interval), not on every driver poll, even though every inbound read moves the
    /// liveness stamp.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, shared: &Shared) -> Poll<CloseReason> {
        // Bounded: each pass either returns or re-arms the timer at a later deadline.
        for _ in 0..4 {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let last = shared.last_read();
            let quiet = Instant::now().saturating_duration_since(last);
            if quiet >= self.give_up {
                tracing::info!(?quiet, "peer silent for too long");
                return Poll::Ready(CloseReason::KeepaliveTimeout { after: quiet });
            }
            let next = if quiet >= self.interval {
                if self.pinged_for != Some(last) {
                    tracing::trace!(?quiet, "link quiet; pinging");
                    self.pinged_for = Some(last);
                    self.ping.notify_one();
                }
                later(last, self.give_up)
            } else {
                later(last, self.interval)
            };
            self.timer.as_mut().reset(next);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// `at + after`, or a far-future instant when that is not representable (a huge configured
/// interval or timeout means "practically never"; `Instant + Duration` would panic).
fn later(at: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    at.checked_add(after)
        .or_else(|| Instant::now().checked_add(FAR))
        .unwrap_or(at)
}

/// Sends pings on request over the internal keepalive channel, opening it when needed, and
/// drains the echoes (their arrival is what counts, and reading returns the window).
async fn pinger(shared: Arc<Shared>, handles: mpsc::WeakSender<Command>, ping: Arc<Notify>) {
    let mut channel: Option<Conn> = None;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = shared.ended.cancelled() => return,
            _ = ping.notified() => {
                if channel.is_none() {
                    // Only a weak handle: keepalive alone must not keep a session alive.
                    let Some(commands) = handles.upgrade() else { return };
                    match session::open_stream(&shared, &commands, KEEPALIVE_NAME).await {
                        Ok(io) => channel = Some(Conn::new(KEEPALIVE_NAME, io, None, shared.clone(), None)),
                        Err(e) => tracing::debug!(error = %e, "could not open the keepalive channel"),
                    }
                }
                if let Some(conn) = &mut channel {
                    if conn.write_all(&[0]).await.is_err() {
                        channel = None;
                    }
                }
            }
            n = async {
                match &mut channel {
                    Some(conn) => conn.read(&mut buf).await.unwrap_or(0),
                    None => std::future::pending().await,
                }
            } => {
                if n == 0 {
                    channel = None;
                }
            }
        }
    }
}

/// Serves the peer's keepalive channel: echoes every byte back. One at a time per session.
pub(crate) async fn serve_echo(mut io: Compat<yamux::Stream>, shared: &Shared) {
    if shared.keepalive_echo_active.swap(true, Ordering::SeqCst) {
        let reply = handshake::encode_reply(Status::Busy, "keepalive channel already open");
        let _ = tokio::time::timeout(shared.config.handshake_timeout, io.write_all(&reply)).await;
        return;
    }
    struct Active<'a>(&'a Shared);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.keepalive_echo_active.store(false, Ordering::SeqCst);
        }
    }
    let _active = Active(shared);
    if io
        .write_all(&handshake::encode_reply(Status::Accepted, ""))
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 64];
    // Ends when the peer closes the channel or the session ends (the caller selects on it).
    loop {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
