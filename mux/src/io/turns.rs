//! The writers waiting for the link, and whose turn it is.
//!
//! Writers of large buffers wait for the link to be free instead of copying their bytes into
//! the output queue. When the link frees, one of them is woken and given the turn, not all:
//! each of the others would only find the link taken again by the first and go back to
//! waiting, a wake-up and a pass through its task for nothing.
//!
//! A writer given the turn may never come back for it: its write future can be dropped
//! (cancelled) while its stream lives on. The turn is therefore passed on
//! - when its writer comes back to write on its stream ([`Turns::take`]), whatever that write
//!   then does (once it leaves the link idle, the next waiter gets the turn);
//! - when its stream goes ([`Turns::forget`]);
//! - when it has been held for [`TURN_GRACE`] without its writer coming back ([`Turns::grant`]
//!   on the next free link, or the driver's timer, see `Link::poll_write`).
//!
//! Passing a turn on too early (a writer slow to be scheduled) costs one extra wake-up; a
//! turn is never kept longer than that grace.

use std::{collections::VecDeque, task::Waker, time::Duration};
use tokio::time::Instant;

/// How long a writer may hold the turn without coming back for it before it passes to the
/// next waiter. A woken task normally runs within microseconds; this is only the bound on
/// how long a cancelled write can hold the others up.
pub(crate) const TURN_GRACE: Duration = Duration::from_millis(2);

/// The writers waiting for the link, first come first served, at most one per stream, and
/// the one holding the turn.
#[derive(Default)]
pub(crate) struct Turns {
    queue: VecDeque<(u32, Waker)>,
    /// The stream woken to write and when, until its writer comes back or the turn expires.
    turn: Option<(u32, Instant)>,
}

impl Turns {
    /// Whether anybody waits for the link or holds the turn: a writer arriving now does
    /// not go first.
    pub(crate) fn is_busy(&self) -> bool {
        self.turn.is_some() || !self.queue.is_empty()
    }

    /// Stream `id`'s writer came back to write: it no longer holds the turn, nor waits.
    pub(crate) fn take(&mut self, id: u32) {
        if self.turn.is_some_and(|(t, _)| t == id) {
            self.turn = None;
        }
        self.queue.retain(|(w, _)| *w != id);
    }

    /// Queues stream `id`'s writer (or refreshes its waker, keeping its place).
    pub(crate) fn wait(&mut self, id: u32, waker: &Waker) {
        if self.turn.is_some_and(|(t, _)| t == id) {
            self.turn = None;
        }
        match self.queue.iter_mut().find(|(w, _)| *w == id) {
            Some((_, kept)) => {
                if !kept.will_wake(waker) {
                    *kept = waker.clone();
                }
            }
            None => self.queue.push_back((id, waker.clone())),
        }
    }

    /// Stream `id` is gone: its writer neither waits nor holds the turn any more. Returns
    /// whether it held the turn (the link should then be offered to the next waiter).
    pub(crate) fn forget(&mut self, id: u32) -> bool {
        self.queue.retain(|(w, _)| *w != id);
        if self.turn.is_some_and(|(t, _)| t == id) {
            self.turn = None;
            return true;
        }
        false
    }

    /// The link is free: gives the turn to the first waiter, unless another writer holds a
    /// turn not yet expired at `now`. Returns the waker to wake.
    pub(crate) fn grant(&mut self, now: Instant) -> Option<Waker> {
        if let Some((_, since)) = self.turn {
            if now < since + TURN_GRACE {
                return None;
            }
            self.turn = None;
        }
        let (id, waker) = self.queue.pop_front()?;
        self.turn = Some((id, now));
        Some(waker)
    }

    /// When the turn held now expires, if anybody waits behind it (`None`: nobody holds it,
    /// or nobody would get it).
    pub(crate) fn expires(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.turn.map(|(_, since)| since + TURN_GRACE)
    }

    /// Everyone, for the end of the link: nobody waits or holds the turn afterwards.
    pub(crate) fn drain(&mut self) -> Vec<Waker> {
        self.turn = None;
        self.queue.drain(..).map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netchan_testkit::counting_waker;

    #[test]
    fn a_free_link_wakes_one_waiter_at_a_time_in_arrival_order() {
        let (a, a_wakes) = counting_waker();
        let (b, b_wakes) = counting_waker();
        let mut turns = Turns::default();
        let t0 = Instant::now();
        turns.wait(1, &a);
        turns.wait(2, &b);
        turns.wait(1, &a);
        assert!(turns.is_busy());

        turns.grant(t0).unwrap().wake();
        assert_eq!((a_wakes.count(), b_wakes.count()), (1, 0));
        // The link frees again before stream 1 came back: nobody else is woken.
        assert!(turns.grant(t0).is_none());
        assert_eq!(
            turns.expires(),
            Some(t0 + TURN_GRACE),
            "stream 2 waits behind it"
        );

        // Stream 1 writes; the next free link goes to stream 2.
        turns.take(1);
        turns.grant(t0).unwrap().wake();
        assert_eq!((a_wakes.count(), b_wakes.count()), (1, 1));
        assert_eq!(turns.expires(), None, "nobody waits behind stream 2");
        turns.take(2);
        assert!(!turns.is_busy());
        assert!(turns.grant(t0).is_none());
    }

    #[test]
    fn a_writer_that_waits_again_goes_to_the_back_and_gives_up_its_turn() {
        let (a, a_wakes) = counting_waker();
        let (b, b_wakes) = counting_waker();
        let mut turns = Turns::default();
        let t0 = Instant::now();
        turns.wait(1, &a);
        turns.wait(2, &b);
        turns.grant(t0).unwrap().wake();
        // Stream 1 found the link taken and waits again: the turn is free for stream 2.
        turns.wait(1, &a);
        turns.grant(t0).unwrap().wake();
        assert_eq!((a_wakes.count(), b_wakes.count()), (1, 1));
        turns.take(2);
        turns.grant(t0).unwrap().wake();
        assert_eq!(a_wakes.count(), 2);
    }

    /// Regression guard for the hand-off: a writer woken for the turn whose write was then
    /// cancelled must not hold the other writers up for longer than the grace.
    #[test]
    fn a_turn_nobody_comes_back_for_passes_on_after_the_grace() {
        let (a, _) = counting_waker();
        let (b, b_wakes) = counting_waker();
        let mut turns = Turns::default();
        let t0 = Instant::now();
        turns.wait(1, &a);
        turns.wait(2, &b);
        turns.grant(t0).unwrap();
        assert!(turns.grant(t0 + TURN_GRACE / 2).is_none());
        turns.grant(t0 + TURN_GRACE).unwrap().wake();
        assert_eq!(b_wakes.count(), 1);
        turns.wait(1, &a);
        assert_eq!(turns.expires(), Some(t0 + 2 * TURN_GRACE));
    }

    #[test]
    fn a_stream_that_goes_gives_up_its_place_and_its_turn() {
        let (a, _) = counting_waker();
        let (b, b_wakes) = counting_waker();
        let mut turns = Turns::default();
        let t0 = Instant::now();
        turns.wait(1, &a);
        turns.wait(2, &b);
        assert!(!turns.forget(2), "waiting, not holding the turn");
        turns.grant(t0).unwrap();
        turns.wait(2, &b);
        assert!(turns.forget(1), "held the turn");
        turns.grant(t0).unwrap().wake();
        assert_eq!(b_wakes.count(), 1);
        assert_eq!(turns.drain().len(), 0);
        assert!(!turns.is_busy());
    }
}
