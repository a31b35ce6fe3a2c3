//! The I/O room: the only code that touches a session's byte stream. It sits on the core
//! (the crate `netchan-mux-proto`, which it takes by reference, as [`Core`]) and under the
//! handles and the driver task, which call in here and never touch the stream themselves.
//!
//! - `core_lock.rs` — [`Core`], the core behind its lock, with the wakers of the tasks whose
//!   stream operation waits: the core reports what may make progress, and letting go of the
//!   lock wakes those tasks;
//! - `transport.rs` (and `transport/unix.rs`) — the byte stream's two halves as the room
//!   uses them, with file descriptors on a unix socket that carries them;
//! - `inbound.rs` — the read side: bytes in, frames to the core, and the read-through;
//! - `outbound.rs` — the write side: vectored writes of the frames the core queued;
//! - `side.rs` — turn-taking on one side between the driver and the handles;
//! - `turns.rs` — the writers waiting for the link, woken one at a time (multi-thread);
//! - this file — [`Link`], which owns both sides, the driver's wakers and the writers
//!   waiting for the link, and the contract below.
//!
//! # Who touches the socket when
//!
//! Each side of the link (read, write) is held by one task at a time, and nobody waits for
//! it: whoever finds it taken does something else.
//!
//! - **The driver task** takes each side on every turn ([`Link::poll_read`],
//!   [`Link::poll_write`]): it reads and parses what arrived and writes what the core queued.
//!   Finding a side taken by a handle, it leaves a note and skips it; the handle wakes it on
//!   letting go. Nothing is read from the link unless the driver runs.
//! - **A handle that queued output** ([`Link::send_now`]) or writes a frame
//!   ([`Link::try_write_direct`]: header and body straight from its buffer, the one-channel
//!   fast path) does so itself when the write side is free and nothing is queued ahead. It
//!   writes with the driver's waker (the io waker), so a full socket wakes the driver, which
//!   finishes the write; the handle never waits on the socket.
//! - **A writer of a large buffer** on a contended link, or on a socket that is full, waits
//!   for the link to be free ([`Link::wait_for_link`], [`Link::try_write_direct`]) instead
//!   of copying its bytes into the queue; whoever leaves the write side idle gives the turn
//!   to the first of them (see `turns.rs`; on a current-thread runtime it wakes them all),
//!   and a turn nobody comes back for passes on.
//! - **A reader** may take the read side only when the link's next bytes are the body of a
//!   data frame for its own stream ([`Link::try_read_through`], the other fast path): it reads
//!   them straight into its buffer, with the driver's waker. The driver leaves such a body on
//!   the link when its reader is about to run. On a multi-thread runtime it waits, without
//!   yielding, for the reader to wake it (having read the body, or finding it cannot:
//!   [`Link::after_read`]), for at most [`READER_GRACE`]; on a current-thread runtime, or
//!   while another stream is interactive, it yields to the reader for one turn. A reader that ends a body reads and parses the next
//!   frame header with it (see `inbound.rs`), and wakes the driver to read the frames after
//!   it unless the link was drained.
//! - **The end** ([`Link::release`]) drops both halves: from then on nobody touches the
//!   socket.
//!
//! Lock order: a side, then the core; never both sides at once.

mod core_lock;
mod inbound;
mod outbound;
mod side;
pub(crate) mod transport;
mod turns;

pub(crate) use core_lock::{Core, CoreGuard};
use futures::task::AtomicWaker;
use inbound::{Defer, Failed, Inbound, Through, HEADER_AHEAD, READ_THROUGH_MIN};
use netchan_mux_proto::HEADER_LEN;
use netchan_mux_proto::{StreamError, Violation};
pub(crate) use outbound::MAX_DIRECT_SLICES;
use outbound::{Outbound, WRITE_BATCH};
use side::LinkSide;
use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
};
use tokio::{
    io::ReadBuf,
    time::{Instant, Sleep},
};
use transport::{LinkRead, LinkWrite};
use turns::Turns;
#[cfg(test)]
pub(crate) use turns::TURN_GRACE;

/// The session's clock, read by the core's timers and its flow control alike: tokio's clock
/// (which tests may pause), as the `std` instant the core takes.
pub(crate) fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The bounds the driver's reads keep (from the session's config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadLimits {
    /// Output queued in the core beyond which nothing more is read: a peer that does not read
    /// what we send (answers to its pings, window updates, resets) gets nothing more read
    /// until it does.
    pub(crate) out_limit: usize,
    /// File descriptors received and not yet claimed by a frame, at most.
    pub(crate) max_fds: usize,
}

/// How long, at most, the driver of a multi-thread runtime leaves the body of a data frame on
/// the link for the reader it woke to take it straight into its own buffer (see
/// [`Link::poll_read`]). The reader normally comes within microseconds, and one that reads
/// the body through, or finds it cannot, wakes the driver at once; this bounds the wait for
/// a reader whose task was woken but does not read (the driver then reads the body itself).
const READER_GRACE: std::time::Duration = std::time::Duration::from_millis(1);

/// The driver's own state between its reads (see [`Link::poll_read`]).
pub(crate) struct ReadTurn {
    /// Lets the readers run before the driver reads on, when one of them may read a body
    /// straight into its own buffer (current-thread runtime).
    yielding: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// How long the driver leaves a body to its reader on a multi-thread runtime (see
    /// [`READER_GRACE`]), kept between turns so that re-arming it allocates nothing.
    grace: Option<Pin<Box<Sleep>>>,
    /// When bytes last arrived, by the driver's reads or a reader's (keepalive).
    pub(crate) last_read: Instant,
}

impl ReadTurn {
    pub(crate) fn new() -> ReadTurn {
        ReadTurn {
            yielding: None,
            grace: None,
            last_read: Instant::now(),
        }
    }
}

/// What a read by the driver found.
pub(crate) enum Read {
    /// Nothing this turn: no bytes, the side taken by a reader, a reader given the turn, or
    /// the output queue full.
    Nothing,
    /// Bytes arrived and were handed to the core; the streams the peer opened with them.
    Frames(Vec<u32>),
    /// The byte stream ended.
    Eof,
    /// Reading failed (the driver's read or a reader's).
    Failed(io::Error),
    /// The peer broke the protocol.
    Violation(Violation),
}

/// The writers waiting for the link.
#[derive(Default)]
struct Waiters {
    turns: Turns,
}

/// The link of one session: its two sides, the driver's wakers and the writers waiting for
/// it (see the module docs for who touches what when).
pub(crate) struct Link {
    /// Wakes the driver: output queued, a side let go, close requested, a channel gone.
    driver: AtomicWaker,
    /// The driver's waker, for reads and writes made by handles on its behalf.
    io_waker: Mutex<Option<Waker>>,
    /// The write side, installed when the session is built.
    outbound: LinkSide<Outbound>,
    /// The read side, installed when the session is built.
    inbound: LinkSide<Inbound>,
    /// Writers of large buffers waiting for the link to be free, so that their bytes go out
    /// straight from their buffers instead of being copied into the output queue; one is
    /// given the turn whenever the link is left idle (see [`Link::wait_for_link`]). At most
    /// one per stream.
    waiters: Mutex<Waiters>,
    /// Whether `waiters` has anyone waiting or holding the turn (read without its lock).
    waiting: AtomicBool,
    /// The driver's timer is armed for a turn (it re-arms it for the turn held when it fires):
    /// whoever gives a turn while it is not must wake the driver to arm it. Written under
    /// the `waiters` lock, read without it by the driver's turns.
    turn_watched: AtomicBool,
    /// The driver's timer for the turn held now (see [`Link::poll_turn`]).
    turn_timer: Mutex<Option<Pin<Box<Sleep>>>>,
    /// Set while the driver yields to the readers (see [`Link::poll_read`]).
    yielding: AtomicBool,
    /// The stream whose reader the driver of a multi-thread runtime leaves the link's next
    /// body to, 0 if none: that reader, if it finds it cannot read the body through, takes
    /// it back and wakes the driver (see [`Link::poll_read`]).
    deferred_to: AtomicU32,
    /// The driver runs on a multi-thread runtime (see [`Link::wake_after_body`]).
    multi_thread: AtomicBool,
    /// Bytes readers took straight from the link (read-through), for tests.
    read_through: AtomicU64,
    limits: ReadLimits,
}

impl Link {
    pub(crate) fn new(
        read: Box<dyn LinkRead>,
        write: Box<dyn LinkWrite>,
        limits: ReadLimits,
    ) -> Link {
        let link = Link {
            driver: AtomicWaker::new(),
            io_waker: Mutex::new(None),
            outbound: LinkSide::new(),
            inbound: LinkSide::new(),
            waiters: Mutex::new(Waiters::default()),
            waiting: AtomicBool::new(false),
            turn_watched: AtomicBool::new(false),
            turn_timer: Mutex::new(None),
            yielding: AtomicBool::new(false),
            deferred_to: AtomicU32::new(0),
            multi_thread: AtomicBool::new(false),
            read_through: AtomicU64::new(0),
            limits,
        };
        *link.outbound.lock() = Some(Outbound::new(write));
        *link.inbound.lock() = Some(Inbound::new(read));
        link
    }

    /// Records the runtime flavour the driver runs on (see [`Link::wake_after_body`]).
    pub(crate) fn set_multi_thread(&self, multi_thread: bool) {
        self.multi_thread.store(multi_thread, Ordering::Relaxed);
    }

    /// Wakes the driver task.
    pub(crate) fn wake_driver(&self) {
        self.driver.wake();
    }

    /// Remembers the driver's waker (called by the driver on every turn): for the wakes of
    /// [`Link::wake_driver`], and as the waker of the reads and writes handles make.
    pub(crate) fn register_driver(&self, waker: &Waker) {
        self.driver.register(waker);
        let mut slot = self.io_waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn io_waker(&self) -> Option<Waker> {
        self.io_waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bytes readers took straight from the link so far.
    #[cfg(test)]
    pub(crate) fn read_through_bytes(&self) -> u64 {
        self.read_through.load(Ordering::Relaxed)
    }

    /// Ends the link: drops both sides (nothing more is read or written; the socket closes
    /// with them) and wakes the writers waiting for it.
    pub(crate) fn release(&self) {
        *self.outbound.lock() = None;
        *self.inbound.lock() = None;
        self.wake_every_waiter();
    }

    /// Wakes every writer waiting for the link at once; nobody holds a turn after it.
    fn wake_every_waiter(&self) {
        let waiters = {
            let mut waiters = self.waiters();
            self.waiting.store(false, Ordering::SeqCst);
            waiters.turns.drain()
        };
        for w in waiters {
            w.wake();
        }
    }

    // The handles' side.

    /// Called by a handle that just queued output: writes it now if nobody else is writing
    /// (with the driver's waker, so a full link wakes the driver), else leaves it to the
    /// driver. Leaving the link idle wakes the writers waiting for it.
    pub(crate) fn send_now(&self, core: &Core) {
        let (Some(waker), Some(mut hold)) = (self.io_waker(), self.outbound.try_hold(&self.driver))
        else {
            self.driver.wake();
            return;
        };
        let Some(out) = hold.get() else {
            drop(hold);
            self.driver.wake();
            return;
        };
        let mut cx = Context::from_waker(&waker);
        match out.poll_send(&mut cx, |q| core.lock().take_output(WRITE_BATCH, q)) {
            Ok((_, true)) => {
                drop(hold);
                self.link_free();
            }
            Ok((_, false)) => {}
            Err(e) => {
                out.fail(e);
                drop(hold);
                self.driver.wake();
            }
        }
    }

    /// A write on stream `id` made straight from the caller's buffers (one frame of the
    /// first [`MAX_DIRECT_SLICES`] of `bufs`): header and body leave in one vectored write,
    /// without copying the body, when nobody else is writing and
    /// nothing is queued in the core. Whatever the write side holds is written first, with
    /// the driver's waker; if the link cannot take all of it now and `may_wait` (on a multi-thread
    /// runtime), the writer waits for the link to be free, as a writer on a full socket does,
    /// rather than have its bytes copied into the queue: it is registered while the write
    /// side is held, so whoever leaves the link idle next (the driver, once the socket
    /// drains) gives it its turn. A turn this stream was given is used up by the call, and
    /// a call that leaves the link idle gives the next one. `None` when none of that is
    /// possible right now (the caller then queues the write instead).
    pub(crate) fn try_write_direct(
        &self,
        core: &Core,
        id: u32,
        bufs: &[IoSlice<'_>],
        may_wait: bool,
        waker: &Waker,
    ) -> Option<Poll<Result<usize, StreamError>>> {
        // Back to write: a turn this stream was given is used now, whatever happens next.
        if self.waiting.load(Ordering::SeqCst) {
            let mut waiters = self.waiters();
            waiters.turns.take(id);
            self.waiting
                .store(waiters.turns.is_busy(), Ordering::SeqCst);
        }
        let io_waker = self.io_waker()?;
        let mut hold = self.outbound.try_hold(&self.driver)?;
        let out = hold.get()?;
        let mut cx = Context::from_waker(&io_waker);
        let written = self.write_direct_held(out, &mut cx, core, id, bufs, may_wait, waker);
        let idle = out.is_idle();
        let failed = out.has_failed();
        drop(hold);
        if failed {
            // The link failed: the driver ends the session with the error kept.
            self.driver.wake();
        } else if idle {
            self.link_free();
        }
        written
    }

    /// [`Link::try_write_direct`] with the write side held. An error of the link is kept in
    /// `out` for the driver: `None` if it came before this write's frame, the frame's length
    /// if after (the frame was written or queued, the session ends either way).
    #[allow(clippy::too_many_arguments)]
    fn write_direct_held(
        &self,
        out: &mut Outbound,
        cx: &mut Context<'_>,
        core: &Core,
        id: u32,
        bufs: &[IoSlice<'_>],
        may_wait: bool,
        waker: &Waker,
    ) -> Option<Poll<Result<usize, StreamError>>> {
        if !out.is_idle() {
            match out.poll_send(cx, |q| core.lock().take_output(WRITE_BATCH, q)) {
                Ok((_, true)) => {}
                Ok((_, false)) => {
                    // The socket is full (the driver is woken once it drains). On a
                    // current-thread runtime the writer copies instead: there the wait costs
                    // a pass of the whole runtime per drain, more than the copy (the
                    // in-process bench's one channel ran 10-15% slower waiting).
                    let multi_thread = self.multi_thread.load(Ordering::Relaxed);
                    if !(may_wait && multi_thread && core.lock().can_write_now(id)) {
                        return None;
                    }
                    self.add_waiter(id, waker);
                    return Some(Poll::Pending);
                }
                Err(e) => {
                    out.fail(e);
                    return None;
                }
            }
        }
        // `None` while the core has frames queued: they keep their order (the caller queues
        // its write behind them).
        let bufs = &bufs[..bufs.len().min(MAX_DIRECT_SLICES)];
        let len = bufs.iter().map(|b| b.len()).sum();
        let header = match core.lock().write_direct(id, len, waker)? {
            Poll::Ready(Ok(Some(header))) => header,
            Poll::Ready(Ok(None)) => return Some(Poll::Ready(Ok(0))),
            Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
            Poll::Pending => return Some(Poll::Pending),
        };
        let n = header.length as usize;
        let sent = out
            .write_frame(cx, header.encode(), bufs, n)
            .and_then(|()| {
                // What the link did not take, and the flush. Frames other tasks queued
                // meanwhile are left to the driver, which whoever queued them woke on
                // finding the write side taken (`send_now`): not looking for them here
                // saves a lock of the core per write.
                out.poll_send(cx, |_| {}).map(|_| ())
            });
        if let Err(e) = sent {
            out.fail(e);
        }
        Some(Poll::Ready(Ok(n)))
    }

    /// Called by a writer of a large buffer that could not write it straight to the link:
    /// rather than copying its bytes into the output queue, it waits for the link to be free,
    /// as a writer on a busy socket does. `false` if it should not wait (the stream cannot
    /// take the write now anyway, or the session is ending): the caller then goes the usual
    /// way, which reports why.
    ///
    /// Only when the link is contended: another task is writing, other streams' frames are
    /// queued, or other writers already wait. (A lone writer that finds the socket full waits
    /// in [`Link::try_write_direct`].)
    pub(crate) fn wait_for_link(&self, core: &Core, id: u32, waker: &Waker) -> bool {
        let contended = self.outbound.is_taken(&self.driver) || self.waiting.load(Ordering::SeqCst);
        {
            let mut core = core.lock();
            if !(contended || core.others_queued(id)) || !core.can_write_now(id) {
                return false;
            }
        }
        self.add_waiter(id, waker);
        // Whoever holds the write side gives the turn on when it leaves the link idle (it
        // sees this waiter: the fence pairs with the one in `link_free`). If nobody holds it
        // now, it was let go since we looked: the driver's next write gives the turn. (On a
        // current-thread runtime waking the driver costs no system call: it is always woken,
        // as every waiter is there, see `give_turn`.)
        fence(Ordering::SeqCst);
        if !self.multi_thread.load(Ordering::Relaxed) || !self.outbound.is_taken(&self.driver) {
            self.driver.wake();
        }
        true
    }

    /// Stream `id` is gone: a body the driver left to its reader is the driver's again (the
    /// caller wakes the driver, which reads and drops it).
    pub(crate) fn forget_reader(&self, id: u32) {
        let _ = self
            .deferred_to
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Stream `id` is gone: its writer no longer waits for the link, and a turn it was given
    /// passes on (the caller wakes the driver, whose next write gives it).
    pub(crate) fn forget_writer(&self, id: u32) {
        if self.waiting.load(Ordering::SeqCst) {
            let mut waiters = self.waiters();
            waiters.turns.forget(id);
            self.waiting
                .store(waiters.turns.is_busy(), Ordering::SeqCst);
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers stream `id`'s writer as waiting for the link (see [`Link::wait_for_link`]).
    fn add_waiter(&self, id: u32, waker: &Waker) {
        let mut waiters = self.waiters();
        waiters.turns.wait(id, waker);
        self.waiting.store(true, Ordering::SeqCst);
    }

    /// The link is idle: gives the turn to the first writer waiting for it, unless another
    /// holds it (see `turns.rs`).
    fn link_free(&self) {
        self.give_turn(false);
    }

    /// [`Link::link_free`]; `by_driver` when the driver calls it (it then arms its timer for
    /// the turn itself, instead of being woken to).
    fn give_turn(&self, by_driver: bool) {
        // Pairs with the fence in `wait_for_link`: a writer that registered while we held the
        // write side is seen here, or it sees the side let go.
        fence(Ordering::SeqCst);
        if !self.waiting.load(Ordering::SeqCst) {
            return;
        }
        if !self.multi_thread.load(Ordering::Relaxed) {
            // On a current-thread runtime waking every waiter costs no more than queueing
            // their tasks, and they run in one pass of the runtime (the in-process bench's
            // eight channels ran no faster one at a time), so all go, and nobody holds a turn.
            self.wake_every_waiter();
            return;
        }
        let (waker, wake_driver) = {
            let mut waiters = self.waiters();
            let waker = waiters.turns.grant(Instant::now());
            self.waiting
                .store(waiters.turns.is_busy(), Ordering::SeqCst);
            let unwatched =
                waiters.turns.expires().is_some() && !self.turn_watched.load(Ordering::SeqCst);
            (waker, unwatched && !by_driver)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        if wake_driver {
            self.driver.wake();
        }
    }

    /// The driver's watch over the turn: a turn held past its grace (its writer's write was
    /// dropped, say) passes on to the next waiter, within twice the grace; the driver's timer
    /// is armed while somebody waits behind a turn.
    fn poll_turn(&self, cx: &mut Context<'_>) {
        // Nobody waits and the timer watches no turn (most turns): nothing to do, and no
        // lock taken. A writer that starts waiting right after this look is seen on the
        // driver's next turn, which whoever gives it the turn wakes the driver for.
        if !self.waiting.load(Ordering::SeqCst) && !self.turn_watched.load(Ordering::SeqCst) {
            return;
        }
        // Bounded: each pass either gives the turn to a new waiter, whose grace lies ahead,
        // or finds nobody holding it.
        for _ in 0..4 {
            let expires = {
                let waiters = self.waiters();
                let expires = waiters.turns.expires();
                self.turn_watched.store(expires.is_some(), Ordering::SeqCst);
                expires
            };
            let Some(at) = expires else {
                return;
            };
            let mut timer = self.turn_timer.lock().unwrap_or_else(|e| e.into_inner());
            let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            // A sleep still pending for an earlier turn is left as it is (no timer update per
            // turn): when it fires, it is armed for the turn held then.
            if sleep.is_elapsed() {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return;
            }
            drop(timer);
            self.give_turn(true);
        }
        // Still due after that many passes (a clock jump): look again on the next turn.
        cx.waker().wake_by_ref();
    }

    /// Called by the reader of stream `id` after a read that will not take the link's next
    /// body through: it waits (`pending`), or its room is too small for a read-through
    /// (`room`). If the driver left that body to this reader, the driver is woken to read it
    /// itself. (A read that returned bytes already buffered does not decline: its reader
    /// comes back, and may read the body through then.)
    pub(crate) fn after_read(&self, id: u32, pending: bool, room: usize) {
        if self.deferred_to.load(Ordering::Acquire) != id || !(pending || room < READ_THROUGH_MIN) {
            return;
        }
        if self
            .deferred_to
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.driver.wake();
        }
    }

    /// A read on stream `id` made straight from the link into the caller's buffer, when the
    /// link's next bytes are the body of a data frame on that stream and nothing read before
    /// them is waiting (see `inbound.rs`). `None` when that is not possible right now (the
    /// caller then reads what the driver buffered, or waits for it).
    pub(crate) fn try_read_through(
        &self,
        core: &Core,
        id: u32,
        buf: &mut ReadBuf<'_>,
        waker: &Waker,
    ) -> Option<Poll<Result<(), StreamError>>> {
        if buf.remaining() < READ_THROUGH_MIN {
            return None;
        }
        let io_waker = self.io_waker()?;
        let mut hold = self.inbound.try_hold(&self.driver)?;
        let inbound = hold.get()?;
        if !inbound.may_read_through(id) {
            return None;
        }
        // Under the read side's lock nothing more is parsed, so if the stream has nothing
        // buffered now, the link's next bytes are the first it has not read.
        let ahead = {
            let mut core = core.lock();
            if !core.wait_readable(id, waker) {
                return None;
            }
            // What follows the body is read with it unless the peer is not reading what we
            // send (see `ReadLimits::out_limit`): then only the driver reads on.
            if core.out_bytes() < self.limits.out_limit {
                HEADER_LEN + HEADER_AHEAD
            } else {
                0
            }
        };
        // The link reads into the caller's room as it is: uninitialised room is not zeroed
        // first (except on a link that carries fds, whose `recvmsg` needs it initialised).
        let mut cx = Context::from_waker(&io_waker);
        let through = inbound.read_through(id, &mut cx, buf, ahead, core, now());
        drop(hold);
        match through {
            Through::Read {
                n,
                ended_body,
                drained,
                for_driver,
            } => {
                self.read_through.fetch_add(n as u64, Ordering::Relaxed);
                // After a body, the frames behind it may be on the link with nobody woken
                // for them (unless the read found the link drained: its next bytes wake the
                // driver). Even when the read took the header after the body and found its
                // reader's next body, the driver is woken: this reader may not come back for
                // it, and what stands behind it on the link must not wait for it. (A wake
                // while the driver is already woken costs next to nothing.)
                if for_driver || (ended_body && !drained && self.wake_after_body()) {
                    self.driver.wake();
                }
                // The read may have earned the peer a window update.
                self.send_now(core);
                Some(Poll::Ready(Ok(())))
            }
            // Waits for the driver (its waker is registered with the core above).
            Through::NotHere | Through::Pending => Some(Poll::Pending),
            Through::Driver => {
                self.driver.wake();
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
    pub(crate) fn wake_after_body(&self) -> bool {
        self.multi_thread.load(Ordering::Relaxed) || !self.yielding.load(Ordering::SeqCst)
    }

    // The driver's side.

    /// The driver's read: reads what the link has and feeds every complete frame to the
    /// core. Leaves a body to the reader about to read it through (once per piece of body):
    /// waits for that reader on a multi-thread runtime, yields to it otherwise.
    pub(crate) fn poll_read(&self, core: &Core, cx: &mut Context<'_>, turn: &mut ReadTurn) -> Read {
        if let Some(yielding) = &mut turn.yielding {
            if yielding.as_mut().poll(cx).is_pending() {
                return Read::Nothing;
            }
            turn.yielding = None;
            self.yielding.store(false, Ordering::SeqCst);
        }
        // A reader reading a body through holds the read side; it wakes us when done.
        let Some(mut guard) = self.inbound.for_driver() else {
            return Read::Nothing;
        };
        let Some(inbound) = guard.as_mut() else {
            return Read::Nothing;
        };
        // A reader's read-through counts as liveness too.
        turn.last_read = inbound.last_read;
        match inbound.failed.take() {
            Some(Failed::Violation(v)) => return Read::Violation(v),
            Some(Failed::Io(e)) => return Read::Failed(e),
            None => {}
        }
        // Streams a reader's read parsed (see `Inbound::read_through`).
        if !inbound.accepted.is_empty() {
            return Read::Frames(std::mem::take(&mut inbound.accepted));
        }
        // The core is locked for these checks only when they may need it (output queued, a
        // body a reader may take): small-message turns take no lock before the read.
        if core.may_have_output() && core.lock().out_bytes() >= self.limits.out_limit {
            return Read::Nothing;
        }
        // Waiting for the reader instead of yielding to it (multi-thread), unless another
        // stream is interactive: there the yield, which brings another worker in, serves the
        // small frames queued behind the body (the in-process bench's round trip beside bulk
        // on multi_thread took 2.6-3.1x its idle time waiting, 1.4x yielding).
        let mut wait = self.multi_thread.load(Ordering::Relaxed);
        let defer = inbound.defer_to_reader(|id| {
            let mut core = core.lock();
            wait = wait && !core.beside_interactive(id, now());
            // Noted before the reader is woken, so that it cannot decline unseen.
            self.deferred_to
                .store(if wait { id } else { 0 }, Ordering::Release);
            core.read_through_wanted(id)
        });
        match defer {
            Defer::New(_) if wait => {
                // The reader wakes us once it has read the body through or found it cannot;
                // the grace bounds the wait for a reader that does not come. (Yielding
                // instead would reschedule the driver behind the reader and unpark another
                // worker to steal it: a context switch or two per frame.)
                drop(guard);
                let at = Instant::now() + READER_GRACE;
                let grace = match &mut turn.grace {
                    Some(grace) => {
                        grace.as_mut().reset(at);
                        grace
                    }
                    None => turn.grace.insert(Box::pin(tokio::time::sleep_until(at))),
                };
                let _ = grace.as_mut().poll(cx);
                return Read::Nothing;
            }
            Defer::New(_) => {
                // Back after the tasks already woken (the reader among them) have run.
                drop(guard);
                let mut yielding = Box::pin(tokio::task::yield_now());
                if yielding.as_mut().poll(cx).is_pending() {
                    self.yielding.store(true, Ordering::SeqCst);
                    turn.yielding = Some(yielding);
                }
                return Read::Nothing;
            }
            Defer::Again(id)
                if self.deferred_to.load(Ordering::Acquire) == id
                    && turn
                        .grace
                        .as_mut()
                        .is_some_and(|grace| grace.as_mut().poll(cx).is_pending()) =>
            {
                // The reader has neither come nor declined, and its grace runs.
                return Read::Nothing;
            }
            Defer::No | Defer::Again(_) => {
                // Written only when set: readers load it on every read.
                if wait && self.deferred_to.load(Ordering::Relaxed) != 0 {
                    self.deferred_to.store(0, Ordering::Release);
                }
            }
        }
        match inbound.poll_fill(cx) {
            Poll::Ready(Ok(0)) => Read::Eof,
            Poll::Ready(Ok(_)) => {
                turn.last_read = inbound.last_read;
                // The frames arrived when the read took them: its clock reading serves.
                let at = inbound.last_read.into_std();
                match inbound.parse(&mut core.lock(), at) {
                    // Fds sent without a frame to claim them must not pile up either.
                    Ok(_) if inbound.fds.len() > self.limits.max_fds => {
                        Read::Violation(Violation::TooManyFds {
                            limit: self.limits.max_fds,
                        })
                    }
                    Ok(()) => Read::Frames(std::mem::take(&mut inbound.accepted)),
                    Err(v) => Read::Violation(v),
                }
            }
            Poll::Ready(Err(e)) => Read::Failed(e),
            Poll::Pending => Read::Nothing,
        }
    }

    /// The driver's write: writes the frames the core queued, unless a handle is writing
    /// (it wakes the driver when done). Returns (wrote something, everything sent and
    /// flushed).
    pub(crate) fn poll_write(&self, core: &Core, cx: &mut Context<'_>) -> io::Result<(bool, bool)> {
        let Some(guard) = self.outbound.for_driver() else {
            return Ok((false, false));
        };
        self.send_with(core, cx, guard)
    }

    /// Writes what the core queued, waiting for a handle's write in progress (one frame at
    /// most): for the last frames of a session ending at once (a GoAway after a violation).
    pub(crate) fn send_last(&self, core: &Core, cx: &mut Context<'_>) {
        let _ = self.send_with(core, cx, self.outbound.lock());
    }

    fn send_with(
        &self,
        core: &Core,
        cx: &mut Context<'_>,
        mut guard: MutexGuard<'_, Option<Outbound>>,
    ) -> io::Result<(bool, bool)> {
        let Some(out) = guard.as_mut() else {
            return Ok((false, true));
        };
        // Most turns find nothing queued: the hint spares them the core's lock.
        let sent = out.poll_send(cx, |q| {
            if core.may_have_output() {
                core.lock().take_output(WRITE_BATCH, q);
            }
        });
        drop(guard);
        if matches!(sent, Ok((_, true))) {
            self.give_turn(true);
        }
        self.poll_turn(cx);
        sent
    }

    /// Shuts the write direction down (the peer reads the end of the stream); errors do not
    /// matter any more at that point.
    pub(crate) fn shutdown(&self, cx: &mut Context<'_>) {
        if let Some(out) = self.outbound.lock().as_mut() {
            let _ = out.poll_shutdown(cx);
        }
    }

    /// One read by hand, without yielding to readers: for tests that play the driver.
    #[cfg(test)]
    pub(crate) fn fill_and_parse(&self, core: &Core, cx: &mut Context<'_>) -> Vec<u32> {
        let mut guard = self.inbound.lock();
        let inbound = guard.as_mut().expect("the link is installed");
        assert!(inbound.poll_fill(cx).is_ready(), "the link has bytes");
        inbound
            .parse(&mut core.lock(), now())
            .expect("well-formed frames");
        std::mem::take(&mut inbound.accepted)
    }

    /// Sets whether the driver is yielding to its readers, for tests that play the driver.
    #[cfg(test)]
    pub(crate) fn set_yielding(&self, yielding: bool) {
        self.yielding.store(yielding, Ordering::SeqCst);
    }
}
