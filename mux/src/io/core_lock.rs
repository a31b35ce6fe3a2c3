//! The core behind its lock, with the wakers of the tasks that wait on it.
//!
//! The core keeps no wakers: an operation that cannot make progress returns pending, and the
//! core later reports it ready ([`Ready`]). Here the tasks' wakers are kept per stream, and
//! every time the lock is let go the core's reports are turned into wakes (under the lock, so
//! a report cannot be lost between a pending return and its waker being kept).

use netchan_mux_proto::{Connection, Header, IdMap, Ready, StreamError};
use std::{
    collections::hash_map::Entry,
    io::IoSlice,
    ops::{Deref, DerefMut},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
    task::{Poll, Waker},
    time::Instant,
};

/// The yamux state of one session behind its lock, shared by the I/O room and the handles.
/// Locked for one short, non-blocking call at a time, never across `.await`.
pub(crate) struct Core {
    locked: Mutex<Locked>,
    /// Whether the core had output queued when its lock was last let go (see
    /// [`Core::may_have_output`]).
    queued: AtomicBool,
}

struct Locked {
    conn: Connection,
    wakers: Wakers,
}

/// The wakers of the tasks whose stream operation is pending, at most one reader and one
/// writer per stream: kept until the core reports the operation ready, or the stream goes.
#[derive(Default)]
struct Wakers {
    readers: IdMap<Waker>,
    writers: IdMap<Waker>,
}

fn keep(map: &mut IdMap<Waker>, id: u32, waker: &Waker) {
    match map.entry(id) {
        Entry::Occupied(mut e) => {
            if !e.get().will_wake(waker) {
                e.insert(waker.clone());
            }
        }
        Entry::Vacant(e) => {
            e.insert(waker.clone());
        }
    }
}

impl Core {
    pub(crate) fn new(conn: Connection) -> Core {
        Core {
            locked: Mutex::new(Locked {
                conn,
                wakers: Wakers::default(),
            }),
            queued: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> CoreGuard<'_> {
        CoreGuard {
            guard: self.locked.lock().unwrap_or_else(|e| e.into_inner()),
            queued: &self.queued,
        }
    }

    /// Whether the core may have output queued, read without its lock: `false` once the
    /// output queue was found empty when the lock was last let go. Lets the driver's write,
    /// on every turn, skip locking the core when nothing is queued. Output queued by another
    /// task that this misses is that task's to send: it writes it itself or wakes the driver
    /// (`Link::send_now`, `Link::wake_driver`), whose next turn sees it.
    pub(crate) fn may_have_output(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }
}

/// The locked core: the [`Connection`] (through `Deref`), and its stream operations that
/// wait taking the waiting task's waker. Wakes the tasks whose operation the core reported
/// ready when dropped.
pub(crate) struct CoreGuard<'a> {
    guard: MutexGuard<'a, Locked>,
    queued: &'a AtomicBool,
}

impl Deref for CoreGuard<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.guard.conn
    }
}

impl DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.guard.conn
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        let Locked { conn, wakers } = &mut *self.guard;
        self.queued.store(conn.out_bytes() > 0, Ordering::Release);
        if !conn.has_ready() {
            return;
        }
        for ready in conn.drain_ready() {
            let waker = match ready {
                Ready::Read(id) => wakers.readers.remove(&id),
                Ready::Write(id) => wakers.writers.remove(&id),
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl CoreGuard<'_> {
    /// [`Connection::read`], keeping `waker` if it is pending.
    pub(crate) fn read(
        &mut self,
        id: u32,
        max: usize,
        waker: &Waker,
        now: impl FnOnce() -> Instant,
        sink: impl FnMut(&[u8]),
    ) -> Poll<Result<usize, StreamError>> {
        let Locked { conn, wakers } = &mut *self.guard;
        let read = conn.read(id, max, now, sink);
        if read.is_pending() {
            keep(&mut wakers.readers, id, waker);
        }
        read
    }

    /// [`Connection::wait_readable`], keeping `waker` if the read would wait.
    pub(crate) fn wait_readable(&mut self, id: u32, waker: &Waker) -> bool {
        let Locked { conn, wakers } = &mut *self.guard;
        let wait = conn.wait_readable(id);
        if wait {
            keep(&mut wakers.readers, id, waker);
        }
        wait
    }

    /// [`Connection::write_vectored`], keeping `waker` if it is pending.
    pub(crate) fn write_vectored(
        &mut self,
        id: u32,
        bufs: &[IoSlice<'_>],
        waker: &Waker,
    ) -> Poll<Result<usize, StreamError>> {
        let Locked { conn, wakers } = &mut *self.guard;
        let write = conn.write_vectored(id, bufs);
        if write.is_pending() {
            keep(&mut wakers.writers, id, waker);
        }
        write
    }

    /// [`Connection::write_direct`], keeping `waker` if it is pending.
    pub(crate) fn write_direct(
        &mut self,
        id: u32,
        len: usize,
        waker: &Waker,
    ) -> Option<Poll<Result<Option<Header>, StreamError>>> {
        let Locked { conn, wakers } = &mut *self.guard;
        let write = conn.write_direct(id, len);
        if write.as_ref().is_some_and(Poll::is_pending) {
            keep(&mut wakers.writers, id, waker);
        }
        write
    }

    /// [`Connection::reset`], forgetting the stream's wakers.
    pub(crate) fn reset(&mut self, id: u32) {
        self.forget(id);
        self.guard.conn.reset(id);
    }

    /// [`Connection::drop_handle`], forgetting the stream's wakers.
    pub(crate) fn drop_handle(&mut self, id: u32) {
        self.forget(id);
        self.guard.conn.drop_handle(id);
    }

    fn forget(&mut self, id: u32) {
        let wakers = &mut self.guard.wakers;
        wakers.readers.remove(&id);
        wakers.writers.remove(&id);
    }
}

#[cfg(test)]
impl Core {
    /// How many wakers are kept (readers, writers).
    fn kept(&self) -> (usize, usize) {
        let locked = self.locked.lock().unwrap();
        (locked.wakers.readers.len(), locked.wakers.writers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use bytes::BytesMut;
    use netchan_mux_proto::{FrameType, Side, ACK};
    use netchan_testkit::counting_waker;

    /// A core with one open stream whose reader waits; the stream's id.
    fn waiting_reader(waker: &Waker) -> (Core, u32) {
        let core = Core::new(Connection::new(Side::Client, Config::default().limits()));
        let id = core.lock().open().unwrap();
        let read = core.lock().read(id, 64, waker, Instant::now, |_| {});
        assert!(read.is_pending());
        (core, id)
    }

    #[test]
    fn a_waiting_reader_is_woken_once_when_data_arrives_and_its_waker_let_go() {
        let (waker, wakes) = counting_waker();
        let (core, id) = waiting_reader(&waker);
        assert_eq!(core.kept(), (1, 0));
        let h = Header::new(FrameType::Data, ACK, id, 2);
        let mut locked = core.lock();
        locked.on_header(&h).unwrap();
        locked
            .on_frame(h, BytesMut::from(&b"hi"[..]), Instant::now())
            .unwrap();
        assert_eq!(wakes.count(), 0, "woken when the lock is let go");
        drop(locked);
        assert_eq!(wakes.count(), 1);
        assert_eq!(core.kept(), (0, 0));
    }

    #[test]
    fn the_wakers_of_a_stream_go_with_it() {
        let (waker, wakes) = counting_waker();
        let (core, id) = waiting_reader(&waker);
        core.lock().drop_handle(id);
        assert_eq!(core.kept(), (0, 0));
        let (core, id) = waiting_reader(&waker);
        core.lock().reset(id);
        assert_eq!(core.kept(), (0, 0));
        assert_eq!(wakes.count(), 0);
    }

    #[test]
    fn the_output_hint_says_whether_output_was_queued_when_the_lock_was_let_go() {
        let core = Core::new(Connection::new(Side::Client, Config::default().limits()));
        assert!(!core.may_have_output());
        let id = core.lock().open().unwrap();
        let (waker, _) = counting_waker();
        let wrote = core
            .lock()
            .write_vectored(id, &[IoSlice::new(b"hi")], &waker);
        assert!(wrote.is_ready());
        assert!(core.may_have_output());
        core.lock()
            .take_output(usize::MAX, &mut std::collections::VecDeque::new());
        assert!(!core.may_have_output());
    }

    #[test]
    fn the_sessions_end_wakes_every_waiting_task() {
        let (waker, wakes) = counting_waker();
        let (core, _) = waiting_reader(&waker);
        core.lock().terminate();
        assert_eq!(wakes.count(), 1);
        assert_eq!(core.kept(), (0, 0));
    }
}
