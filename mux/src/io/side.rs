//! Turn-taking on one side of the link between the driver and the handles.

use futures::task::AtomicWaker;
use std::sync::{
    atomic::{fence, AtomicBool, Ordering},
    Mutex, MutexGuard, TryLockError,
};

/// One side of the link (its read or write half with its state), which the driver and the
/// handles take turns on. The driver never blocks its thread on a handle's turn: it finds the
/// side taken, leaves a note, and the handle wakes it on letting go.
pub(super) struct LinkSide<T> {
    state: Mutex<Option<T>>,
    /// Set by the driver when it found the side taken by a handle.
    driver_wants: AtomicBool,
}

impl<T> LinkSide<T> {
    pub(super) fn new() -> LinkSide<T> {
        LinkSide {
            state: Mutex::new(None),
            driver_wants: AtomicBool::new(false),
        }
    }

    /// Waits for the side: for installing it, ending the session, and the last shutdown.
    pub(super) fn lock(&self) -> MutexGuard<'_, Option<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, Option<T>>> {
        match self.state.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Whether someone holds the side right now. Checked by taking it for a moment, as a
    /// handle: letting go then wakes the driver if it found the side taken meanwhile (a plain
    /// lock would swallow that note).
    pub(super) fn is_taken(&self, driver: &AtomicWaker) -> bool {
        self.try_hold(driver).is_none()
    }

    /// The side for the driver's turn, unless a handle holds it: then `None`, and that handle
    /// wakes the driver when it lets go.
    pub(super) fn for_driver(&self) -> Option<MutexGuard<'_, Option<T>>> {
        if let Some(guard) = self.try_lock() {
            return Some(guard);
        }
        self.driver_wants.store(true, Ordering::SeqCst);
        // Pairs with the fence in `Hold::drop`: either the handle sees the note, or this
        // second try sees the side released.
        fence(Ordering::SeqCst);
        let guard = self.try_lock()?;
        self.driver_wants.store(false, Ordering::SeqCst);
        Some(guard)
    }

    /// The side for a handle, if nobody holds it.
    pub(super) fn try_hold<'a>(&'a self, driver: &'a AtomicWaker) -> Option<Hold<'a, T>> {
        Some(Hold {
            guard: Some(self.try_lock()?),
            side: self,
            driver,
        })
    }
}

/// A handle's hold on one side of the link. Letting go wakes the driver if it found the side
/// taken meanwhile (see [`LinkSide::for_driver`]).
pub(super) struct Hold<'a, T> {
    guard: Option<MutexGuard<'a, Option<T>>>,
    side: &'a LinkSide<T>,
    driver: &'a AtomicWaker,
}

impl<T> Hold<'_, T> {
    /// The side's state, unless the session has ended.
    pub(super) fn get(&mut self) -> Option<&mut T> {
        self.guard.as_deref_mut()?.as_mut()
    }
}

impl<T> Drop for Hold<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        fence(Ordering::SeqCst);
        if self.side.driver_wants.swap(false, Ordering::SeqCst) {
            self.driver.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netchan_testkit::counting_waker;

    /// The driver never waits for a handle's turn on a side of the link: it finds the side
    /// taken, and the handle wakes it on letting go (once), so no turn is lost.
    #[test]
    fn the_driver_skips_a_taken_side_and_is_woken_when_it_is_let_go() {
        let side = LinkSide::new();
        *side.lock() = Some(7u32);
        let driver = AtomicWaker::new();
        let (waker, wakes) = counting_waker();
        driver.register(&waker);

        // Nobody holds it: the driver takes it, and letting go wakes nobody.
        assert_eq!(side.for_driver().as_deref(), Some(&Some(7)));
        let mut hold = side.try_hold(&driver).unwrap();
        assert_eq!(hold.get(), Some(&mut 7));
        assert!(side.is_taken(&driver));
        assert!(side.try_hold(&driver).is_none(), "one holder at a time");
        drop(hold);
        assert_eq!(wakes.count(), 0, "nobody asked for it");

        // A handle holds it: the driver gets `None` at once, and is woken on release.
        let hold = side.try_hold(&driver).unwrap();
        assert!(side.for_driver().is_none());
        assert_eq!(wakes.count(), 0);
        drop(hold);
        assert_eq!(wakes.count(), 1, "woken on letting go");
        assert!(side.for_driver().is_some());

        // The note is taken by that wake: the next release wakes nobody.
        driver.register(&waker); // as the driver does on every turn
        drop(side.try_hold(&driver).unwrap());
        assert_eq!(wakes.count(), 1);

        // A note left while the side is held in a way that does not pass it on (the blocking
        // lock, used only while a session ends) is passed on by the next handle that merely
        // looks whether the side is taken.
        let plain = side.lock();
        assert!(side.for_driver().is_none());
        drop(plain);
        assert_eq!(wakes.count(), 1);
        assert!(!side.is_taken(&driver));
        assert_eq!(wakes.count(), 2, "looking passed the note on");
    }
}
