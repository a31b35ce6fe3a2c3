//! Keepalive with yamux Ping frames: detect a peer that stopped answering.
//!
//! Any inbound byte counts as liveness (the driver stamps the time of every read), so a busy
//! link never pings and bulk traffic cannot cause a false timeout. When nothing has arrived
//! for `keepalive_interval`, the driver sends a Ping (SYN) that the peer must answer (ACK).
//! When still nothing has arrived `keepalive_timeout` later, the session ends with
//! [`CloseReason::KeepaliveTimeout`]. The timer is driven by the driver task; no task of its
//! own.

use crate::{config::Config, error::CloseReason};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::{Instant, Sleep};

/// What the keepalive timer asks the driver to do.
#[derive(Debug)]
pub(crate) enum Due {
    /// Send a Ping with this opaque value.
    Ping(u32),
    /// Give up: the peer has been silent for too long.
    Dead(CloseReason),
}

/// The driver's keepalive timer.
pub(crate) struct Keepalive {
    interval: Duration,
    /// `keepalive_interval + keepalive_timeout`, saturating (the config may say `Duration::MAX`).
    give_up: Duration,
    timer: Pin<Box<Sleep>>,
    /// The liveness stamp we already pinged for (one ping per quiet period).
    pinged_for: Option<Instant>,
    next_opaque: u32,
}

impl Keepalive {
    /// The timer for a session, unless keepalive is disabled.
    pub(crate) fn new(config: &Config) -> Option<Keepalive> {
        let interval = config.keepalive_interval?;
        Some(Keepalive {
            interval,
            give_up: interval.saturating_add(config.keepalive_timeout),
            timer: Box::pin(tokio::time::sleep_until(later(Instant::now(), interval))),
            pinged_for: None,
            next_opaque: 1,
        })
    }

    /// Ready when a ping is due or the peer is given up on; `last_read` is when bytes last
    /// arrived. Cheap when nothing is due: the timer is only re-armed when it fires.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, last_read: Instant) -> Poll<Due> {
        // Bounded: each pass either returns or re-arms the timer at a later deadline.
        for _ in 0..4 {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let quiet = Instant::now().saturating_duration_since(last_read);
            if quiet >= self.give_up {
                tracing::info!(?quiet, "peer silent for too long");
                return Poll::Ready(Due::Dead(CloseReason::KeepaliveTimeout { after: quiet }));
            }
            if quiet >= self.interval {
                self.timer.as_mut().reset(later(last_read, self.give_up));
                if self.pinged_for != Some(last_read) {
                    tracing::trace!(?quiet, "link quiet; pinging");
                    self.pinged_for = Some(last_read);
                    let opaque = self.next_opaque;
                    self.next_opaque = self.next_opaque.wrapping_add(1);
                    return Poll::Ready(Due::Ping(opaque));
                }
            } else {
                self.timer.as_mut().reset(later(last_read, self.interval));
            }
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
