//! The state one session shares between its driver, handles, channels and listeners.
//!
//! Everything here sits below the handles and the driver: it imports only the core, the
//! config and the errors, so nothing reaches back up (no import cycles).

use crate::{
    config::Config,
    error::{CloseReason, Error},
    inbound::{Inbound, Through, READ_THROUGH_MIN},
    outbound::{Outbound, WRITE_BATCH},
    proto::{self, Connection, StreamError},
};
use futures::task::AtomicWaker;
use std::{
    collections::HashMap,
    sync::{
        atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, TryLockError,
    },
    task::{Context, Poll, Waker},
};
use tokio::{
    io::ReadBuf,
    sync::{mpsc, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Which end of the link a session is. The two ends of one link must use different modes
/// (yamux allocates odd stream ids to the client and even ones to the server). By convention
/// the side that opened the underlying connection is the [`Mode::Client`]. The mode does not
/// restrict anything else: both ends can listen and dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The end that opened the underlying connection.
    Client,
    /// The end that accepted the underlying connection.
    Server,
}

/// A registered listener: where accepted channels for its name go.
pub(crate) struct ListenerEntry {
    /// Tells a stale removal (from an old listener of the same name) from the current one.
    pub(crate) id: u64,
    pub(crate) sender: mpsc::Sender<Accepted>,
}

/// State shared by the driver, the handles, the channels and the listeners of one session.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) mode: Mode,
    pub(crate) config: Config,
    /// The yamux state. Locked for one short, non-blocking call at a time.
    core: Mutex<Connection>,
    pub(crate) listeners: Mutex<HashMap<String, ListenerEntry>>,
    pub(crate) next_listener_id: AtomicU64,
    /// Open channels in both directions, dials in flight included (see [`ChannelSlot`]).
    open_channels: AtomicUsize,
    /// Set by `close()`: refuse new channels, end once the open ones are done.
    closing: AtomicBool,
    /// Why the session ended; the first reason recorded wins.
    reason: OnceLock<CloseReason>,
    /// Cancelled once the session has ended (after `reason` is set).
    pub(crate) ended: CancellationToken,
    /// Wakes the driver: output queued, close requested, last channel or handle gone.
    pub(crate) driver_waker: AtomicWaker,
    /// The driver's waker, for writes made by handles on its behalf (see `outbound.rs`).
    io_waker: Mutex<Option<Waker>>,
    /// The link's write side, installed by the driver. Lock order: this, then `core`.
    pub(crate) outbound: LinkSide<Outbound>,
    /// Writers of large buffers waiting for the link to be free, so that their bytes go out
    /// straight from their buffers instead of being copied into the output queue; woken
    /// whenever the link is left idle (see [`Shared::wait_for_link`]). At most one per stream.
    link_waiters: Mutex<Vec<Waker>>,
    link_waiting: AtomicBool,
    /// Set while the driver yields to the readers (see `Driver::poll_inbound`).
    pub(crate) driver_yielding: AtomicBool,
    /// The driver runs on a multi-thread runtime (see [`Shared::wake_after_body`]); set when
    /// the session starts.
    pub(crate) multi_thread: AtomicBool,
    /// Bytes readers took straight from the link (read-through), for tests and tracing.
    pub(crate) read_through: AtomicU64,
    /// The link's read side, installed by the driver. Lock order: this, then `core`; never
    /// held together with `outbound`.
    pub(crate) inbound: LinkSide<Inbound>,
    /// Permits for our dials whose handshake is in flight.
    pub(crate) dial_slots: Semaphore,
    /// Permits for inbound handshakes being served.
    pub(crate) inbound_slots: Arc<Semaphore>,
    /// Every task of the session: the driver and the inbound handshakes. Closed when the
    /// session ends; [`Session::closed`](crate::Session::closed) waits for it to empty, so
    /// no task outlives its session.
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    /// `fds`: the link carries file descriptors.
    pub(crate) fn new(config: Config, mode: Mode, fds: bool) -> Shared {
        let pending = config.pending_limit();
        let side = match mode {
            Mode::Client => proto::Side::Client,
            Mode::Server => proto::Side::Server,
        };
        Shared {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            mode,
            core: Mutex::new(Connection::new(
                side,
                proto::Limits {
                    fds,
                    ..config.limits()
                },
            )),
            config,
            listeners: Mutex::new(HashMap::new()),
            next_listener_id: AtomicU64::new(1),
            open_channels: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reason: OnceLock::new(),
            ended: CancellationToken::new(),
            driver_waker: AtomicWaker::new(),
            io_waker: Mutex::new(None),
            outbound: LinkSide::new(),
            link_waiters: Mutex::new(Vec::new()),
            link_waiting: AtomicBool::new(false),
            driver_yielding: AtomicBool::new(false),
            multi_thread: AtomicBool::new(false),
            read_through: AtomicU64::new(0),
            inbound: LinkSide::new(),
            dial_slots: Semaphore::new(pending),
            inbound_slots: Arc::new(Semaphore::new(pending)),
            tasks: TaskTracker::new(),
        }
    }

    /// Locks the yamux state. Callers hold it for one core call and never across `.await`.
    pub(crate) fn core(&self) -> MutexGuard<'_, Connection> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the driver's waker (called by the driver on every turn).
    pub(crate) fn set_io_waker(&self, waker: &Waker) {
        let mut slot = self.io_waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Called by a handle that just queued output: writes it now if nobody else is writing
    /// (with the driver's waker, so a full link wakes the driver), else leaves it to the
    /// driver.
    pub(crate) fn send_now(&self) {
        let waker = self
            .io_waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(waker), Some(mut hold)) = (waker, self.outbound.try_hold(&self.driver_waker))
        else {
            self.driver_waker.wake();
            return;
        };
        let Some(out) = hold.get() else {
            drop(hold);
            self.driver_waker.wake();
            return;
        };
        let mut cx = Context::from_waker(&waker);
        if let Err(e) = out.poll_send(&mut cx, |q| self.core().take_output(WRITE_BATCH, q)) {
            out.fail(e);
            drop(hold);
            self.driver_waker.wake();
        }
    }

    /// A write on stream `id` made straight from the caller's buffer: header and body leave
    /// in one vectored write, without copying the body, when nobody else is writing and
    /// nothing is queued ahead. `None` when that is not possible right now (the caller then
    /// queues the write instead).
    pub(crate) fn try_write_direct(
        &self,
        id: u32,
        buf: &[u8],
        waker: &Waker,
    ) -> Option<Poll<Result<usize, StreamError>>> {
        let io_waker = self
            .io_waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let mut hold = self.outbound.try_hold(&self.driver_waker)?;
        let out = hold.get()?;
        if !out.is_idle() {
            return None;
        }
        let header = match self.core().write_direct(id, buf.len(), waker)? {
            Poll::Ready(Ok(Some(header))) => header,
            Poll::Ready(Ok(None)) => return Some(Poll::Ready(Ok(0))),
            Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
            Poll::Pending => return Some(Poll::Pending),
        };
        let n = header.length as usize;
        let mut cx = Context::from_waker(&io_waker);
        let sent = out
            .write_frame(&mut cx, header.encode(), &buf[..n])
            .and_then(|()| {
                // Frames queued meanwhile, and the flush.
                out.poll_send(&mut cx, |q| self.core().take_output(WRITE_BATCH, q))
                    .map(|_| ())
            });
        let idle = out.is_idle();
        if let Err(e) = sent {
            // The link failed: the driver ends the session with this error.
            out.fail(e);
            drop(hold);
            self.driver_waker.wake();
        } else if idle {
            drop(hold);
            self.link_free();
        }
        Some(Poll::Ready(Ok(n)))
    }

    /// Called by a writer of a large buffer that could not write it straight to the link:
    /// rather than copying its bytes into the output queue, it waits for the link to be free,
    /// as a writer on a busy socket does. `false` if it should not wait (the stream cannot take the write now anyway, or
    /// the session is ending): the caller then goes the usual way, which reports why.
    ///
    /// Only when the link is contended: another task is writing, other streams' frames are
    /// queued, or other writers already wait. A lone writer that found the socket full copies
    /// instead: that keeps the link fed without a task hop.
    pub(crate) fn wait_for_link(&self, id: u32, waker: &Waker) -> bool {
        let contended =
            self.outbound.is_taken(&self.driver_waker) || self.link_waiting.load(Ordering::SeqCst);
        {
            let mut core = self.core();
            if !(contended || core.others_queued(id)) || !core.can_write_now(id) {
                return false;
            }
        }
        {
            let mut waiters = self.link_waiters.lock().unwrap_or_else(|e| e.into_inner());
            if !waiters.iter().any(|w| w.will_wake(waker)) {
                waiters.push(waker.clone());
            }
            self.link_waiting.store(true, Ordering::SeqCst);
        }
        // The driver wakes the waiters once the link is idle, whoever holds it now.
        self.driver_waker.wake();
        true
    }

    /// The link is idle: wakes the writers waiting for it.
    pub(crate) fn link_free(&self) {
        if self.link_waiting.swap(false, Ordering::SeqCst) {
            let waiters =
                std::mem::take(&mut *self.link_waiters.lock().unwrap_or_else(|e| e.into_inner()));
            for w in waiters {
                w.wake();
            }
        }
    }

    /// A read on stream `id` made straight from the link into the caller's buffer, when the
    /// link's next bytes are the body of a data frame on that stream and nothing read before
    /// them is waiting (see `inbound.rs`). `None` when that is not possible right now (the
    /// caller then reads what the driver buffered, or waits for it).
    pub(crate) fn try_read_through(
        &self,
        id: u32,
        buf: &mut ReadBuf<'_>,
        waker: &Waker,
    ) -> Option<Poll<Result<(), StreamError>>> {
        if buf.remaining() < READ_THROUGH_MIN {
            return None;
        }
        let io_waker = self
            .io_waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let mut hold = self.inbound.try_hold(&self.driver_waker)?;
        let inbound = hold.get()?;
        if !inbound.may_read_through(id) {
            return None;
        }
        // Under the read side's lock nothing more is parsed, so if the stream has nothing
        // buffered now, the link's next bytes are the first it has not read.
        if !self.core().wait_readable(id, waker) {
            return None;
        }
        let now = std::time::Instant::now();
        // The link reads into the caller's room as it is: uninitialised room is not zeroed
        // first (except on a link that carries fds, whose `recvmsg` needs it initialised).
        let mut cx = Context::from_waker(&io_waker);
        let through = inbound.read_through(id, &mut cx, buf, |piece| {
            self.core().on_read_through(piece, now)
        });
        drop(hold);
        match through {
            Through::Read { n, ended_body } => {
                self.read_through.fetch_add(n as u64, Ordering::Relaxed);
                if ended_body && self.wake_after_body() {
                    self.driver_waker.wake();
                }
                // The read may have earned the peer a window update.
                self.send_now();
                Some(Poll::Ready(Ok(())))
            }
            // Waits for the driver (its waker is registered with the core above).
            Through::NotHere | Through::Pending => Some(Poll::Pending),
            Through::Driver => {
                self.driver_waker.wake();
                Some(Poll::Pending)
            }
        }
    }

    /// Whether a reader whose read-through ended a body should wake the driver.
    ///
    /// The frames after the body may be on the link already with nobody woken for them: the
    /// link wakes the driver for an arrival only after a read of its found nothing, and the
    /// reader's read found bytes. Woken, the driver reads on now, not at the next arrival,
    /// which may be a round trip away (the peer may wait for the window update the read
    /// earned it). On a multi-thread runtime that wake is worth it even while the driver
    /// yields to its readers: a yielding task comes back only once its worker has run the
    /// other tasks it holds. On a current-thread runtime the yield brings the driver back
    /// right after the tasks already woken, once the runtime has polled the link, and waking
    /// it earlier only runs it before the bytes it would read have arrived.
    fn wake_after_body(&self) -> bool {
        self.multi_thread.load(Ordering::Relaxed) || !self.driver_yielding.load(Ordering::SeqCst)
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Starts a graceful close and wakes the driver to carry it out.
    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.driver_waker.wake();
    }

    pub(crate) fn open_channels(&self) -> usize {
        self.open_channels.load(Ordering::SeqCst)
    }

    /// Takes one of `max_channels` slots, or `None` if all are taken.
    pub(crate) fn try_channel_slot(self: &Arc<Self>) -> Option<ChannelSlot> {
        let limit = self.config.channel_limit();
        self.open_channels
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot {
                shared: self.clone(),
            })
    }

    /// The recorded reason, whether or not the driver has finished ending the session.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason.get().cloned()
    }

    /// The reason, once the session has fully ended.
    pub(crate) fn ended_reason(&self) -> Option<CloseReason> {
        if self.ended.is_cancelled() {
            Some(self.reason().unwrap_or(CloseReason::Local))
        } else {
            None
        }
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::SessionClosed(self.reason().unwrap_or(CloseReason::Local))
    }

    /// Ends the session: records `reason` (unless one is already recorded), fails every
    /// stream operation, drops every listener registration and wakes everything waiting on
    /// the session. Returns the reason that stands.
    pub(crate) fn finish(&self, reason: CloseReason) -> CloseReason {
        let _ = self.reason.set(reason);
        self.closing.store(true, Ordering::SeqCst);
        self.core().terminate();
        // Nothing more is written: release the link now (the socket closes once the driver,
        // which owns the read side, is gone too), not when the last handle goes.
        *self.outbound.lock() = None;
        *self.inbound.lock() = None;
        self.link_free();
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.dial_slots.close();
        self.inbound_slots.close();
        // The tasks still running end on the cancellation below (the driver returns after
        // this call, the handshakes select on `ended`); the tracker empties once they have.
        self.tasks.close();
        self.ended.cancel();
        self.reason().unwrap_or(CloseReason::Local)
    }

    pub(crate) fn listener_sender(&self, name: &str) -> Option<mpsc::Sender<Accepted>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.get(name).map(|entry| entry.sender.clone())
    }

    pub(crate) fn remove_listener(&self, name: &str, id: u64) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if listeners.get(name).is_some_and(|entry| entry.id == id) {
            listeners.remove(name);
        }
    }
}

/// One side of the link (its read or write half with its state), which the driver and the
/// handles take turns on. The driver never blocks its thread on a handle's turn: it finds the
/// side taken, leaves a note, and the handle wakes it on letting go.
pub(crate) struct LinkSide<T> {
    state: Mutex<Option<T>>,
    /// Set by the driver when it found the side taken by a handle.
    driver_wants: AtomicBool,
}

impl<T> LinkSide<T> {
    fn new() -> LinkSide<T> {
        LinkSide {
            state: Mutex::new(None),
            driver_wants: AtomicBool::new(false),
        }
    }

    /// Waits for the side: for installing it, ending the session, and the last shutdown.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<T>> {
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
    fn is_taken(&self, driver: &AtomicWaker) -> bool {
        self.try_hold(driver).is_none()
    }

    /// The side for the driver's turn, unless a handle holds it: then `None`, and that handle
    /// wakes the driver when it lets go.
    pub(crate) fn for_driver(&self) -> Option<MutexGuard<'_, Option<T>>> {
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
    fn try_hold<'a>(&'a self, driver: &'a AtomicWaker) -> Option<Hold<'a, T>> {
        Some(Hold {
            guard: Some(self.try_lock()?),
            side: self,
            driver,
        })
    }
}

/// A handle's hold on one side of the link. Letting go wakes the driver if it found the side
/// taken meanwhile (see [`LinkSide::for_driver`]).
struct Hold<'a, T> {
    guard: Option<MutexGuard<'a, Option<T>>>,
    side: &'a LinkSide<T>,
    driver: &'a AtomicWaker,
}

impl<T> Hold<'_, T> {
    /// The side's state, unless the session has ended.
    fn get(&mut self) -> Option<&mut T> {
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

/// One of the session's `max_channels` slots, held by an open channel (or a dial in flight)
/// and released when dropped.
pub(crate) struct ChannelSlot {
    shared: Arc<Shared>,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.shared.open_channels.fetch_sub(1, Ordering::SeqCst);
        if self.shared.is_closing() {
            // A graceful close waits for the last channel to go.
            self.shared.driver_waker.wake();
        }
    }
}

/// Ownership of one yamux stream. Dropping it tells the core the stream's user is gone
/// (FIN after everything written, see [`Connection::drop_handle`]).
pub(crate) struct StreamHandle {
    pub(crate) id: u32,
    pub(crate) shared: Arc<Shared>,
}

impl StreamHandle {
    /// Aborts the stream (RST) instead of closing it.
    pub(crate) fn reset(self) {
        self.shared.core().reset(self.id);
        self.shared.driver_waker.wake();
        // Drop then finds the stream gone and does nothing.
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.shared.core().drop_handle(self.id);
        self.shared.driver_waker.wake();
    }
}

/// An inbound channel accepted by the handshake, queued for its listener.
pub(crate) struct Accepted {
    pub(crate) stream: StreamHandle,
    pub(crate) slot: ChannelSlot,
    pub(crate) name: Arc<str>,
}

/// Proof that a user-facing handle (`Session`, `Listener`, `Conn`) is alive. When the last
/// one is dropped, nobody can use the session any more and it closes gracefully.
pub(crate) struct HandleToken {
    on_last_drop: Arc<dyn Fn() + Send + Sync>,
}

impl HandleToken {
    pub(crate) fn new(on_last_drop: Arc<dyn Fn() + Send + Sync>) -> HandleToken {
        HandleToken { on_last_drop }
    }
}

impl Drop for HandleToken {
    fn drop(&mut self) {
        (self.on_last_drop)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        link,
        proto::{FrameType, Header, SYN},
        stream::RawStream,
    };
    use netchan_testkit::counting_waker;
    use std::pin::Pin;
    use tokio::io::{AsyncRead, AsyncWriteExt};

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

    /// One turn of the driver's reading, by hand: reads what the link has (into the read
    /// buffer) and parses it. Returns the streams the peer opened.
    fn driver_turn(shared: &Shared, cx: &mut Context<'_>) -> Vec<u32> {
        // As the driver does on every turn (a wake takes the registration).
        shared.driver_waker.register(cx.waker());
        let mut guard = shared.inbound.lock();
        let inbound = guard.as_mut().unwrap();
        assert!(inbound.poll_fill(cx).is_ready(), "the link has bytes");
        inbound
            .parse(&mut shared.core(), std::time::Instant::now())
            .unwrap()
    }

    /// On a multi-thread runtime a yielding driver may come back only after its worker ran
    /// everything else it holds: a reader that ends a body wakes it all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_thread_runtime_a_yielding_driver_is_woken_after_a_body() {
        let (a, _b) = tokio::io::duplex(1024);
        let session = crate::Session::new(a, Mode::Client, Config::default());
        let shared = &session.shared;
        assert!(shared.wake_after_body());
        shared.driver_yielding.store(true, Ordering::SeqCst);
        assert!(shared.wake_after_body());
    }

    /// A reader that reads a body through to its end wakes the driver, which may have frames
    /// to read after it with nobody woken for them; a read-through that leaves part of the
    /// body does not. On a current-thread runtime a driver that yields to its readers is
    /// left to come back by itself.
    #[tokio::test]
    async fn a_read_through_that_ends_a_body_wakes_the_driver() {
        let shared = Arc::new(Shared::new(Config::default(), Mode::Server, false));
        assert!(
            !shared.multi_thread.load(Ordering::Relaxed),
            "a current-thread runtime"
        );
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let (read, write) = link::split(ours);
        *shared.inbound.lock() = Some(Inbound::new(read));
        // Our window updates go out to the peer (unread here) without waking the driver.
        *shared.outbound.lock() = Some(Outbound::new(write));
        let (driver, driver_wakes) = counting_waker();
        shared.set_io_waker(&driver);
        // Stream 1, opened by the peer: three large bodies (within the first window).
        const FIRST: usize = 160 * 1024;
        const NEXT: usize = 40 * 1024;
        let bodies = [(SYN, FIRST, 1u8), (0, NEXT, 2u8), (0, NEXT, 3u8)];
        for (flags, len, byte) in bodies {
            let header = Header::new(FrameType::Data, flags, 1, len as u32).encode();
            peer.write_all(&header).await.unwrap();
            peer.write_all(&vec![byte; len]).await.unwrap();
        }
        let mut driver_cx = Context::from_waker(&driver);
        let mut stream = RawStream::new(StreamHandle {
            id: 1,
            shared: shared.clone(),
        });
        let (reader, _) = counting_waker();
        let mut reader_cx = Context::from_waker(&reader);
        const ROOM: usize = 256 * 1024;
        let mut room = vec![0u8; ROOM];
        // A read into `max` bytes of room, which finds bytes there.
        let mut read = |stream: &mut RawStream, max: usize| {
            let mut buf = ReadBuf::new(&mut room[..max]);
            match Pin::new(stream).poll_read(&mut reader_cx, &mut buf) {
                Poll::Ready(Ok(())) => buf.filled().to_vec(),
                other => panic!("a read with bytes there: {other:?}"),
            }
        };

        // The driver reads a chunk: the header and the first part of the body, which it
        // hands to the stream; the rest of the body stays on the link.
        assert_eq!(driver_turn(&shared, &mut driver_cx), [1]);
        let mut first = read(&mut stream, ROOM);
        assert!(first.len() < FIRST, "the part the driver read");
        let through = |shared: &Shared| shared.read_through.load(Ordering::Relaxed);
        assert_eq!(through(&shared), 0);

        // Part of the rest, straight from the link: no wake, the body goes on.
        let wakes = driver_wakes.count();
        first.extend(read(&mut stream, 32 * 1024));
        assert_eq!(through(&shared), 32 * 1024, "read through");
        assert_eq!(
            driver_wakes.count(),
            wakes,
            "the body goes on: nothing for the driver"
        );

        // The rest, to the body's end, while the driver yields to its readers: on this
        // current-thread runtime the yield brings it back, so nobody wakes it.
        shared.driver_yielding.store(true, Ordering::SeqCst);
        first.extend(read(&mut stream, ROOM));
        assert_eq!(first, vec![1u8; FIRST], "the whole first body");
        assert_eq!(
            driver_wakes.count(),
            wakes,
            "a yielding driver comes back by itself"
        );
        shared.driver_yielding.store(false, Ordering::SeqCst);

        // The next body: its header by the driver, its bytes through, to the end; the driver,
        // not yielding, is woken to read the frame after it.
        for byte in [2u8, 3] {
            assert!(driver_turn(&shared, &mut driver_cx).is_empty());
            let before = through(&shared);
            let wakes = driver_wakes.count();
            assert_eq!(read(&mut stream, ROOM), vec![byte; NEXT]);
            assert_eq!(through(&shared) - before, NEXT as u64, "read through");
            assert!(
                driver_wakes.count() > wakes,
                "the driver is woken to read on"
            );
        }
    }
}
