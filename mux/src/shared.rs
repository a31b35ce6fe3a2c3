//! The state one session shares between its driver, handles, channels and listeners: the
//! core, the link, the listener table, the channel slots, why and whether it ended, and its
//! tasks. Plain state: no I/O is done here (that is the link's, `io/`), and nothing here
//! imports the handles or the driver above it, so no import reaches back up.

use crate::{
    config::Config,
    error::{CloseReason, Error},
    io::{
        transport::{LinkRead, LinkWrite},
        Core, CoreGuard, Link, ReadLimits,
    },
};
use netchan_mux_proto::Connection;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};
use tokio::sync::{mpsc, Semaphore};
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
    /// The yamux state.
    pub(crate) core: Core,
    /// The byte stream under the session, and everything that touches it.
    pub(crate) link: Link,
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
    pub(crate) fn new(
        config: Config,
        mode: Mode,
        read: Box<dyn LinkRead>,
        write: Box<dyn LinkWrite>,
        fds: bool,
    ) -> Shared {
        let pending = config.pending_limit();
        let side = match mode {
            Mode::Client => netchan_mux_proto::Side::Client,
            Mode::Server => netchan_mux_proto::Side::Server,
        };
        let limits = config.limits();
        let read_limits = ReadLimits {
            out_limit: limits.out_limit,
            max_fds: config.max_received_fds,
        };
        Shared {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            mode,
            core: Core::new(Connection::new(
                side,
                netchan_mux_proto::Limits { fds, ..limits },
            )),
            link: Link::new(read, write, read_limits),
            config,
            listeners: Mutex::new(HashMap::new()),
            next_listener_id: AtomicU64::new(1),
            open_channels: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reason: OnceLock::new(),
            ended: CancellationToken::new(),
            dial_slots: Semaphore::new(pending),
            inbound_slots: Arc::new(Semaphore::new(pending)),
            tasks: TaskTracker::new(),
        }
    }

    /// Locks the yamux state. Callers hold it for one core call and never across `.await`.
    pub(crate) fn core(&self) -> CoreGuard<'_> {
        self.core.lock()
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Starts a graceful close and wakes the driver to carry it out.
    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.link.wake_driver();
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
        // Nothing more is read or written: release the link now, not when the last handle
        // goes.
        self.link.release();
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
            self.shared.link.wake_driver();
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
        self.shared.link.wake_driver();
        // Drop then finds the stream gone and does nothing.
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.shared.core().drop_handle(self.id);
        self.shared.link.forget_writer(self.id);
        self.shared.link.forget_reader(self.id);
        self.shared.link.wake_driver();
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
