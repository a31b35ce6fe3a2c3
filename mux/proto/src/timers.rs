//! The core's timers besides keepalive (`keepalive.rs`): those of the session's end, and
//! [`Due`], what any deadline of the core asks for once it passed.
//!
//! All of them run on the one clock the core knows, the `now` its caller passes in: the core
//! reports its earliest deadline ([`Connection::poll_timeout`](super::Connection::poll_timeout))
//! and runs what passed when told
//! ([`Connection::handle_timeout`](super::Connection::handle_timeout)).

use std::time::{Duration, Instant};

/// What a deadline of the core asks for once it passed, as reported by
/// [`Connection::handle_timeout`](super::Connection::handle_timeout): one at a time, the
/// session's end before keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// A keepalive Ping with this opaque value was queued: the link has been quiet.
    Ping(u32),
    /// Keepalive gives the peer up: it has been silent for this long.
    Dead(Duration),
    /// The close grace ([`Connection::close`](super::Connection::close)) passed before the
    /// session finished draining: its open streams are to be cut.
    CloseGraceOver,
    /// The peer did not take the session's last frames in time
    /// ([`Connection::flush_by`](super::Connection::flush_by)): the link is to be dropped.
    FlushOver,
    /// No GoAway arrived in time after a write failed as if the peer had gone
    /// ([`Connection::await_goaway`](super::Connection::await_goaway)).
    GoAwayWaitOver,
}

/// The deadlines of a session's end. Each is set by the call that starts its phase and
/// reported once, when it passes; a later phase clears the earlier one's.
#[derive(Debug, Default)]
pub(crate) struct EndTimers {
    /// Until when a closing session waits for its open streams.
    close_grace: Option<Instant>,
    /// Until when a finishing session waits for the peer to take its last frames.
    flush: Option<Instant>,
    /// Until when a session whose write failed reads on for the peer's GoAway.
    goaway_wait: Option<Instant>,
}

impl EndTimers {
    /// Starts the close grace at `now` (once: a second close keeps the first deadline), unless
    /// the session already finishes.
    pub(crate) fn close(&mut self, now: Instant, grace: Duration) {
        if self.close_grace.is_none() && self.flush.is_none() {
            self.close_grace = Some(later(now, grace));
        }
    }

    /// Starts the flush deadline at `now`, which ends the close grace.
    pub(crate) fn flush_by(&mut self, now: Instant, within: Duration) {
        self.close_grace = None;
        self.flush = Some(later(now, within));
    }

    /// Starts the wait for the peer's GoAway at `now`.
    pub(crate) fn await_goaway(&mut self, now: Instant, within: Duration) {
        self.goaway_wait = Some(later(now, within));
    }

    /// The earliest deadline set, if any.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        [self.goaway_wait, self.flush, self.close_grace]
            .into_iter()
            .flatten()
            .min()
    }

    /// The first deadline that passed at `now`, cleared as it is reported: the one that ends
    /// the session soonest first.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Option<Due> {
        let passed = |at: &mut Option<Instant>| at.take_if(|at| *at <= now).is_some();
        if passed(&mut self.goaway_wait) {
            return Some(Due::GoAwayWaitOver);
        }
        if passed(&mut self.flush) {
            return Some(Due::FlushOver);
        }
        if passed(&mut self.close_grace) {
            return Some(Due::CloseGraceOver);
        }
        None
    }
}

/// `at + after`, or a far-future instant when that is not representable (a huge configured
/// duration means "practically never"; `Instant + Duration` would panic).
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    at.checked_add(after)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn each_end_deadline_is_reported_once_when_it_passes() {
        let t0 = Instant::now();
        let mut end = EndTimers::default();
        assert_eq!(end.deadline(), None);
        end.close(t0, 5 * SECOND);
        assert_eq!(end.deadline(), Some(t0 + 5 * SECOND));
        assert_eq!(end.on_timeout(t0 + 4 * SECOND), None, "not yet");
        assert_eq!(end.on_timeout(t0 + 5 * SECOND), Some(Due::CloseGraceOver));
        assert_eq!(end.on_timeout(t0 + 6 * SECOND), None, "reported once");
        assert_eq!(end.deadline(), None);
    }

    #[test]
    fn a_second_close_keeps_the_first_grace_and_flushing_ends_it() {
        let t0 = Instant::now();
        let mut end = EndTimers::default();
        end.close(t0, 5 * SECOND);
        end.close(t0 + SECOND, 5 * SECOND);
        assert_eq!(end.deadline(), Some(t0 + 5 * SECOND));
        end.flush_by(t0 + 2 * SECOND, 10 * SECOND);
        assert_eq!(end.deadline(), Some(t0 + 12 * SECOND));
        assert_eq!(end.on_timeout(t0 + 6 * SECOND), None, "the grace is over");
        end.close(t0 + 7 * SECOND, SECOND);
        assert_eq!(
            end.deadline(),
            Some(t0 + 12 * SECOND),
            "no grace once flushing"
        );
        assert_eq!(end.on_timeout(t0 + 12 * SECOND), Some(Due::FlushOver));
    }

    #[test]
    fn deadlines_that_passed_together_are_reported_soonest_end_first() {
        let t0 = Instant::now();
        let mut end = EndTimers::default();
        end.close(t0, SECOND);
        end.await_goaway(t0, 2 * SECOND);
        assert_eq!(end.deadline(), Some(t0 + SECOND));
        let late = t0 + 3 * SECOND;
        assert_eq!(end.on_timeout(late), Some(Due::GoAwayWaitOver));
        assert_eq!(end.on_timeout(late), Some(Due::CloseGraceOver));
        assert_eq!(end.on_timeout(late), None);
    }

    #[test]
    fn a_huge_duration_means_practically_never() {
        let t0 = Instant::now();
        let mut end = EndTimers::default();
        end.flush_by(t0, Duration::MAX);
        assert!(end.deadline().is_some_and(|at| at > t0 + 3600 * SECOND));
    }
}
