//! Forwarding calls to an exporter: its call slots (shared fairly among readers), the window
//! of a forwarded read sized from the exporter's round trip, and the stream the reader's call
//! pulls a read's chunks through from the exporter, with its watchdog (see the
//! [parent module](super) for the bounds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use netchan_mux::{self as mux, Session};
use netchan_rpc::{self as rpc, Code, Context, ItemStream, Status};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::conn::ReaderSlot;
use super::registry::ConnId;
use super::{HubOptions, HubState, EXPORT_DIAL_TIMEOUT, MAX_CHUNK_FRAME};
use crate::export::CHUNK_SIZE;
use crate::proto::{peer_gone, window_for_rtt, Chunk, ExportClient, EXPORT_CHANNEL};

/// What the hub keeps per published peer.
#[derive(Clone)]
pub(super) struct PeerHandle {
    /// The exporter's session, to dial its export service for reads.
    pub(super) session: Session,
    /// The exporter's service for `ls` and `stat`: the callback client of its peer link.
    pub(super) export: ExportClient,
    /// The same service on a channel of its own for reads, dialed on the first read (frames
    /// over one chunk are refused there), and the stream window a read wants, sized from the
    /// round trip of that dial.
    /// Dialed again on the next read once its conn has ended (an exporter that broke the
    /// protocol on it loses that channel, not its session).
    pub(super) reads: Arc<tokio::sync::Mutex<Option<(ExportClient, u32)>>>,
    /// Chunks of window beyond the floor that reads of this exporter may still reserve
    /// ([`HubOptions::forward_budget`]).
    pub(super) window_budget: Arc<Semaphore>,
    /// When the hub last received anything from this exporter (a chunk of any read, an
    /// `ls`/`stat` answer), in milliseconds since the hub's epoch.
    pub(super) heard: Arc<AtomicU64>,
    /// Slots for forwarded reads (and ls/stat) to this peer.
    pub(super) calls: Arc<Semaphore>,
    /// The forwarded reads holding those slots, for a newcomer to take an idle one's.
    pub(super) active: Arc<Mutex<Vec<ActiveRead>>>,
}

/// One forwarded read holding a slot of its exporter.
pub(super) struct ActiveRead {
    /// Distinguishes it from the reader's other reads.
    pub(super) id: u64,
    /// The reader's connection.
    pub(super) conn: ConnId,
    /// When the reader last took a chunk of it (or it started), in milliseconds since the
    /// hub's epoch.
    pub(super) took: Arc<AtomicU64>,
    /// Whether a chunk waits for the reader to take it (so the reader, not the exporter,
    /// holds the read up).
    pub(super) blocked: Arc<AtomicBool>,
    /// Cancelled to give its slot to another reader.
    pub(super) stop: CancellationToken,
}

/// How long a read must have taken nothing before a reader waiting for a slot of the same
/// exporter may take it over (when its own reader holds more than its fair share).
const IDLE_BEFORE_PREEMPT: Duration = Duration::from_secs(1);

/// How often a call waiting for a slot looks for an idle read to take it from.
const PREEMPT_CHECK: Duration = Duration::from_millis(250);

/// Takes `peer`'s active-reads list; a poisoned lock still holds a consistent list.
pub(super) fn active_reads(peer: &PeerHandle) -> std::sync::MutexGuard<'_, Vec<ActiveRead>> {
    peer.active
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HubState {
    /// Notes that `peer` was just heard from.
    pub(super) fn heard(&self, peer: &PeerHandle) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        peer.heard.fetch_max(ms, Ordering::Relaxed);
    }

    /// When `peer` was last heard from.
    fn last_heard(&self, peer: &PeerHandle) -> Instant {
        self.epoch + Duration::from_millis(peer.heard.load(Ordering::Relaxed))
    }

    /// The client of `peer`'s export service for reads, dialing its channel if this is the
    /// first read, and the stream window a read of it wants ([`window_for`] the dial's round
    /// trip).
    pub(super) async fn reads_client(
        &self,
        name: &str,
        peer: &PeerHandle,
    ) -> Result<(ExportClient, u32), Status> {
        // A tokio mutex: held across the dial, so that concurrent first reads dial once.
        let mut reads = peer.reads.lock().await;
        if let Some((client, window)) = &*reads {
            if !client.client().is_closed() {
                return Ok((client.clone(), *window));
            }
        }
        let start = Instant::now();
        let ch = dial_peer(name, &peer.session).await?;
        let rtt = start.elapsed();
        let window = window_for(&self.opts, rtt);
        debug!(peer = %name, ?rtt, window, "read window sized from the round trip");
        let client = ExportClient::new(rpc::Client::with_config(
            ch,
            rpc::Config::default()
                .stream_window(self.opts.forward_window.max(1))
                .max_message_size(MAX_CHUNK_FRAME),
        ));
        *reads = Some((client.clone(), window));
        Ok((client, window))
    }

    /// The window of a new read of `peer` that wants `wanted` chunks: the floor
    /// ([`HubOptions::forward_window`]) plus what it can reserve of the exporter's budget,
    /// held until the returned permit is dropped.
    pub(super) fn reserve_window(
        &self,
        peer: &PeerHandle,
        wanted: u32,
    ) -> (u32, Option<OwnedSemaphorePermit>) {
        let floor = self.opts.forward_window.max(1);
        let extra = wanted.saturating_sub(floor);
        // Bounded: each round asks for fewer chunks; racing reservations only shrink it.
        let mut ask = extra.min(peer.window_budget.available_permits() as u32);
        while ask > 0 {
            if let Ok(permit) = peer.window_budget.clone().try_acquire_many_owned(ask) {
                return (floor + ask, Some(permit));
            }
            ask = ask.min(peer.window_budget.available_permits() as u32);
        }
        (floor, None)
    }

    /// Waits up to `busy_wait` for a call slot on `peer`, for connection `conn`. When every
    /// slot is taken and `conn` holds fewer than its fair share of them (the slots divided
    /// among the readers holding some, itself included), the idlest read of a reader over
    /// its share that has taken nothing for [`IDLE_BEFORE_PREEMPT`] is given up for it: a
    /// reader that takes nothing cannot keep others out by holding or re-issuing reads.
    pub(super) async fn slot(
        &self,
        name: &str,
        peer: &PeerHandle,
        conn: ConnId,
    ) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(permit) = peer.calls.clone().try_acquire_owned() {
            return Ok(permit);
        }
        // The place in the semaphore's queue is kept while reads are looked at for one to
        // give up (they may become idle during the wait).
        let acquire = peer.calls.clone().acquire_owned();
        tokio::pin!(acquire);
        let give_up = tokio::time::sleep(self.opts.busy_wait);
        tokio::pin!(give_up);
        let mut look = tokio::time::interval(PREEMPT_CHECK);
        // Bounded by `give_up`.
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    return permit.map_err(|_| peer_gone(name, "it left"));
                }
                () = &mut give_up => {
                    warn!(peer = %name, limit = self.opts.max_reads_per_peer, "busy: refusing a call");
                    return Err(Status::resource_exhausted(format!(
                        "peer {name:?} is busy: {} calls to it are already in flight; try again \
                         later",
                        self.opts.max_reads_per_peer
                    )));
                }
                _ = look.tick() => self.preempt_for(name, peer, conn),
            }
        }
    }

    /// Gives up one idle read of `peer` for connection `conn`, if `conn` is under its fair
    /// share of slots and some reader over its share has a read idle long enough.
    fn preempt_for(&self, name: &str, peer: &PeerHandle, conn: ConnId) {
        let active = active_reads(peer);
        let mut held: HashMap<ConnId, usize> = HashMap::new();
        for read in active.iter() {
            *held.entry(read.conn).or_insert(0) += 1;
        }
        let mine = held.get(&conn).copied().unwrap_or(0);
        let readers = held.len() + usize::from(mine == 0);
        let fair = (self.opts.max_reads_per_peer.max(1) / readers.max(1)).max(1);
        if mine >= fair {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = IDLE_BEFORE_PREEMPT.as_millis() as u64;
        let victim = active
            .iter()
            .filter(|r| held.get(&r.conn).copied().unwrap_or(0) > fair)
            .filter(|r| !r.stop.is_cancelled() && r.blocked.load(Ordering::Relaxed))
            .filter(|r| now.saturating_sub(r.took.load(Ordering::Relaxed)) >= idle_ms)
            .min_by_key(|r| r.took.load(Ordering::Relaxed));
        if let Some(victim) = victim {
            info!(peer = %name, from = victim.conn, to = conn, "giving an idle read's slot to another reader");
            victim.stop.cancel();
        }
    }

    /// Waits for the next item of a forwarded read. Gives up (`None`) only once the exporter
    /// has sent nothing at all, on any of its reads, for `peer_timeout`.
    async fn next_from<S>(&self, peer: &PeerHandle, up: &mut S) -> Option<Option<S::Item>>
    where
        S: Stream + Unpin,
    {
        let limit = self.opts.peer_timeout;
        let mut since = Instant::now();
        // Bounded: every further round needs the exporter to have been heard from meanwhile.
        loop {
            match tokio::time::timeout_at(since + limit, up.next()).await {
                Ok(item) => return Some(item),
                Err(_) => {
                    let last = self.last_heard(peer);
                    if last <= since {
                        return None;
                    }
                    since = last;
                }
            }
        }
    }
}

/// Opens a channel to the export service of the peer `name` over its `session`, within
/// [`EXPORT_DIAL_TIMEOUT`].
async fn dial_peer(name: &str, session: &Session) -> Result<mux::Conn, Status> {
    match tokio::time::timeout(EXPORT_DIAL_TIMEOUT, session.dial(EXPORT_CHANNEL)).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(peer_gone(name, format!("no channel to it: {e}"))),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "peer {name:?} did not open a channel within {EXPORT_DIAL_TIMEOUT:?}"
        ))),
    }
}

/// Rewrites a status from an exporter for the reader: connection loss becomes "peer gone",
/// anything else gets the peer's name in front.
pub(super) fn from_peer(name: &str, s: Status) -> Status {
    match s.code() {
        Code::Unavailable => peer_gone(name, s.message()),
        Code::DeadlineExceeded => {
            Status::deadline_exceeded(format!("peer {name:?} did not answer in time"))
        }
        code => Status::new(code, format!("{name}: {}", s.message())),
    }
}

/// The stream window a read forwarded from an exporter whose round trip is `rtt` wants:
/// twice the chunks that carry `forward_rate` over it (credit comes back in half-window
/// batches, so half a window must cover the bandwidth-delay product), at least
/// `forward_window`. [`HubState::reserve_window`] bounds what a read gets.
pub(super) fn window_for(opts: &HubOptions, rtt: Duration) -> u32 {
    window_for_rtt(opts.forward_rate, rtt, opts.forward_window)
}

/// Whether `s` ended a forwarded read because the exporter produced a message over the reads
/// channel's limit: a protocol error of the exporter, not a departure. An exporter whose rpc
/// layer learnt the hub's limit refuses to send such a chunk and ends the read with
/// `RESOURCE_EXHAUSTED` (an exporter's reads answer that code for nothing else); one that
/// sends it anyway meets the hub's rpc conn, which refuses the frame unread and ends: the
/// status is then our own conn-lost verdict whose source is the rpc layer's
/// [`rpc::Error::FrameTooLarge`]. The check reads the code and that typed source, never the
/// words of a message (a status an exporter sent carries no source).
pub(super) fn oversized_frame(s: &Status) -> bool {
    if s.code() == Code::ResourceExhausted {
        return true;
    }
    let source = std::error::Error::source(s).and_then(|e| e.downcast_ref::<rpc::Error>());
    s.is_conn_lost() && matches!(source, Some(rpc::Error::FrameTooLarge { .. }))
}

/// Checks one chunk of a forwarded read against the protocol: at most [`CHUNK_SIZE`] bytes,
/// at the offset where the previous one ended.
fn check_chunk(name: &str, chunk: &Chunk, expected: u64) -> Result<(), Status> {
    let broke = |what: String| {
        warn!(peer = %name, "protocol error on a forwarded read: {what}");
        Status::internal(format!("peer {name:?} broke the protocol: {what}"))
    };
    if chunk.data.len() > CHUNK_SIZE {
        return Err(broke(format!(
            "it sent a chunk of {} bytes; the limit is {CHUNK_SIZE}",
            chunk.data.len()
        )));
    }
    if chunk.offset != expected {
        return Err(broke(format!(
            "it sent a chunk at offset {} where {expected} was due",
            chunk.offset
        )));
    }
    Ok(())
}

/// A forwarded read: what the reader's stream of it needs besides the exporter's stream.
/// [`Pump::into_stream`] turns it into that stream, which the reader's call polls for each
/// chunk it has credit for, so a chunk goes from the exporter's stream to the reader's call
/// with no task in between; a watchdog task (woken only by its timer and by preemption) ends
/// the read when the reader holds it up too long.
pub(super) struct Pump {
    pub(super) hub: Arc<HubState>,
    pub(super) name: String,
    pub(super) peer: PeerHandle,
    /// Where the next chunk must start.
    pub(super) offset: u64,
    /// The reader's call, to end it when the hub gives up the read.
    pub(super) ctx: Context,
    /// The slots and the window reserved from the exporter's budget, freed when the read
    /// ends.
    pub(super) _slots: (
        OwnedSemaphorePermit,
        ReaderSlot,
        Option<OwnedSemaphorePermit>,
    ),
    /// This read in its exporter's active list (taken out when the read ends).
    pub(super) id: u64,
    /// When the reader last took a chunk (shared with the active list).
    pub(super) took: Arc<AtomicU64>,
    /// Set while a chunk the reader took is not yet sent on, or the reader grants no credit
    /// for the next (shared with the active list).
    pub(super) blocked: Arc<AtomicBool>,
    /// Cancelled when the slot goes to another reader.
    pub(super) stop: CancellationToken,
}

impl Drop for Pump {
    fn drop(&mut self) {
        active_reads(&self.peer).retain(|r| r.id != self.id);
    }
}

/// The state of a forwarded read's stream: the read, the exporter's stream, whether the last
/// item went out, and the guard that ends the watchdog with the stream.
struct Forwarding<S> {
    pump: Pump,
    up: S,
    ended: bool,
    _watchdog: tokio_util::sync::DropGuard,
}

impl Pump {
    /// The reader's stream of this read: the exporter's chunks, checked (size, offset) and
    /// passed on as they arrived, until the read is done or fails. Spawns the read's watchdog,
    /// which ends the reader's call when the slot goes to another reader or the reader takes
    /// nothing for [`HubOptions::reader_stall`], and ends itself with the stream.
    pub(super) fn into_stream<S>(self, up: S) -> ItemStream<Chunk>
    where
        S: Stream<Item = Result<Chunk, Status>> + Unpin + Send + 'static,
    {
        let done = CancellationToken::new();
        tokio::spawn(
            watchdog(
                self.hub.clone(),
                self.name.clone(),
                self.ctx.clone(),
                self.took.clone(),
                self.blocked.clone(),
                self.stop.clone(),
                done.clone(),
            )
            .in_current_span(),
        );
        let state = Forwarding {
            pump: self,
            up,
            ended: false,
            _watchdog: done.drop_guard(),
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.ended {
                return None;
            }
            // Asked for another chunk: the reader took the last one and has credit.
            st.pump.blocked.store(false, Ordering::Relaxed);
            let item = st.pump.next_item(&mut st.up).await;
            st.ended = match &item {
                Ok(chunk) => chunk.eof,
                Err(_) => true,
            };
            let hub = &st.pump.hub;
            st.pump
                .took
                .fetch_max(hub.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            st.pump.blocked.store(!st.ended, Ordering::Relaxed);
            Some((item, st))
        }))
    }

    /// The next item of the read for the reader: the exporter's next chunk once checked, or
    /// why the read ends.
    async fn next_item<S>(&mut self, up: &mut S) -> Result<Chunk, Status>
    where
        S: Stream<Item = Result<Chunk, Status>> + Unpin,
    {
        let (name, hub) = (&self.name, &self.hub);
        let item = match hub.next_from(&self.peer, up).await {
            None => Err(Status::deadline_exceeded(format!(
                "peer {name:?} sent nothing for {:?}",
                hub.opts.peer_timeout
            ))),
            Some(None) => Err(peer_gone(name, "the transfer was cut short")),
            Some(Some(Err(s))) if oversized_frame(&s) => Err(Status::internal(format!(
                "peer {name:?} broke the protocol: it sent a message over the \
                 {MAX_CHUNK_FRAME}-byte limit of a chunk"
            ))),
            Some(Some(Err(s))) => Err(from_peer(name, s)),
            Some(Some(Ok(chunk))) => {
                hub.heard(&self.peer);
                check_chunk(name, &chunk, self.offset).map(|()| chunk)
            }
        };
        match &item {
            Ok(chunk) => self.offset = self.offset.saturating_add(chunk.data.len() as u64),
            Err(s) => debug!(peer = %name, "forwarded read failed: {s}"),
        }
        item
    }
}

/// Watches one forwarded read until `done` (its stream ended): ends the reader's call `ctx`
/// when `stop` gives the slot to another reader, or when the reader has held a chunk up
/// (`blocked`) for `reader_stall` since it last took one (`took`), credit or not.
async fn watchdog(
    hub: Arc<HubState>,
    name: String,
    ctx: Context,
    took: Arc<AtomicU64>,
    blocked: Arc<AtomicBool>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let stall = hub.opts.reader_stall;
    let give_up = |why: Status| {
        debug!(peer = %name, "forwarded read given up: {why}");
        ctx.abort(why);
    };
    let mut check = Instant::now() + stall;
    // Bounded: each round sleeps until a later check (at least the stall after the last
    // take), or ends the watch.
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = stop.cancelled() => return give_up(Status::resource_exhausted(format!(
                "peer {name:?} is busy and you took nothing of this read for {IDLE_BEFORE_PREEMPT:?} \
                 or more: the hub gave its slot to another reader"
            ))),
            () = tokio::time::sleep_until(check) => {}
        }
        let now = Instant::now();
        if !blocked.load(Ordering::Relaxed) {
            check = now + stall;
            continue;
        }
        let since = hub.epoch + Duration::from_millis(took.load(Ordering::Relaxed));
        if now.saturating_duration_since(since) >= stall {
            warn!(peer = %name, ?stall, "the reader took nothing: giving up its read");
            return give_up(Status::deadline_exceeded(format!(
                "you took nothing of this read for {stall:?}; the hub gave it up to free \
                 peer {name:?} for others"
            )));
        }
        check = (since + stall).max(now + Duration::from_millis(1));
    }
}
