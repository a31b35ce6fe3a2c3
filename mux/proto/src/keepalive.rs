//! Keepalive with yamux Ping frames, as a timer of the core: detect a peer that stopped
//! answering.
//!
//! Any inbound byte counts as liveness (the I/O room stamps the time of every read), so a
//! busy link never pings and bulk traffic cannot cause a false timeout. When nothing has
//! arrived for `interval`, a Ping (SYN) goes out that the peer must answer (ACK). When still
//! nothing has arrived `timeout` later, the peer is given up on. The core holds the deadline
//! ([`Connection::poll_timeout`](super::Connection::poll_timeout)); whoever runs the clock
//! calls [`Connection::handle_timeout`](super::Connection::handle_timeout) once it passes.

use super::timers::{later, Due};
use std::time::{Duration, Instant};

/// The keepalive timer of one session.
#[derive(Debug)]
pub(crate) struct Keepalive {
    interval: Duration,
    /// `interval + timeout`, saturating (the config may say `Duration::MAX`).
    give_up: Duration,
    /// When to look again. Re-armed only when it passes, not on every read.
    deadline: Instant,
    /// The liveness stamp we already pinged for (one ping per quiet period).
    pinged_for: Option<Instant>,
    next_opaque: u32,
}

impl Keepalive {
    /// A timer started at `now`.
    pub(crate) fn new(interval: Duration, timeout: Duration, now: Instant) -> Keepalive {
        Keepalive {
            interval,
            give_up: interval.saturating_add(timeout),
            deadline: later(now, interval),
            pinged_for: None,
            next_opaque: 1,
        }
    }

    /// When the timer next wants to look.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What is due at `now` ([`Due::Ping`] or [`Due::Dead`]), given that bytes last arrived
    /// at `last_read`; re-arms the timer. `None` before the deadline, or when the link was
    /// not quiet for long enough.
    pub(crate) fn on_timeout(&mut self, now: Instant, last_read: Instant) -> Option<Due> {
        if now < self.deadline {
            return None;
        }
        let quiet = now.saturating_duration_since(last_read);
        if quiet >= self.give_up {
            return Some(Due::Dead(quiet));
        }
        if quiet < self.interval {
            self.deadline = later(last_read, self.interval);
            return None;
        }
        self.deadline = later(last_read, self.give_up);
        if self.pinged_for == Some(last_read) {
            return None;
        }
        self.pinged_for = Some(last_read);
        let opaque = self.next_opaque;
        self.next_opaque = self.next_opaque.wrapping_add(1);
        Some(Due::Ping(opaque))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_quiet_link_is_pinged_once_then_given_up_on() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(10 * SECOND, 5 * SECOND, t0);
        assert_eq!(k.deadline(), t0 + 10 * SECOND);
        assert_eq!(k.on_timeout(t0 + 9 * SECOND, t0), None, "not yet");
        assert_eq!(k.on_timeout(t0 + 10 * SECOND, t0), Some(Due::Ping(1)));
        assert_eq!(k.deadline(), t0 + 15 * SECOND);
        assert_eq!(
            k.on_timeout(t0 + 15 * SECOND, t0),
            Some(Due::Dead(15 * SECOND))
        );
    }

    #[test]
    fn bytes_that_arrived_push_the_deadline_back_without_a_ping() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(10 * SECOND, 5 * SECOND, t0);
        let read = t0 + 6 * SECOND;
        assert_eq!(k.on_timeout(t0 + 10 * SECOND, read), None);
        assert_eq!(k.deadline(), read + 10 * SECOND);
        assert_eq!(k.on_timeout(read + 10 * SECOND, read), Some(Due::Ping(1)));
        // An answer (any byte) starts a new quiet period, pinged for again.
        let answer = read + 11 * SECOND;
        assert_eq!(k.on_timeout(read + 15 * SECOND, answer), None);
        assert_eq!(
            k.on_timeout(answer + 10 * SECOND, answer),
            Some(Due::Ping(2))
        );
    }

    #[test]
    fn a_huge_interval_means_practically_never() {
        let t0 = Instant::now();
        let k = Keepalive::new(Duration::MAX, Duration::MAX, t0);
        assert!(k.deadline() > t0 + 3600 * SECOND);
    }
}
