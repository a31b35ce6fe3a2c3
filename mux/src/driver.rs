//! The driver task: the session's one task that runs for as long as the session. It has the
//! link (`io/`) move bytes between the byte stream and the yamux core on every turn, and
//! runs the session's timers and its end.
//!
//! - **Reads**: on every turn the driver has the link read what arrived and hand the frames
//!   to the core ([`Link::poll_read`](crate::io::Link::poll_read); readers may read a large
//!   body straight into their own buffers, see `io/`).
//! - **Writes**: on every turn the driver has the link write what the core queued
//!   ([`Link::poll_write`](crate::io::Link::poll_write); handles write themselves when the
//!   link is free).
//! - **Timers**: all of them are the core's (keepalive, the close grace, the flush of the
//!   last frames, the wait for a GoAway after a failed write): the driver sleeps until the
//!   core's earliest deadline ([`Connection::poll_timeout`](netchan_mux_proto::Connection::poll_timeout)),
//!   tells the core when it passed, and acts on what the core says is due ([`Due`]).
//! - **New inbound streams** are handed to the session's handshake callback, which runs each
//!   in a task of its own: per-stream work never blocks the session.
//!
//! Contract: nothing is read from the link unless the driver runs; the session spawns it on
//! its task tracker and it ends (recording the [`CloseReason`]) when the session ends.

use netchan_mux_proto::{Due, GoAwayCode, Violation};

use crate::{
    error::CloseReason,
    io::{now, Read, ReadTurn},
    shared::{Shared, StreamHandle},
    stream::RawStream,
};
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::time::{Instant, Sleep};

/// Rounds of read + write per wake-up before yielding to other tasks.
const ROUNDS: usize = 32;

/// How long a session whose write failed as if the peer had gone (`EPIPE`, `ECONNRESET`)
/// keeps reading for the peer's GoAway before it ends with the write's error (see
/// `Driver::write_failed`).
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Called with every new inbound stream.
pub(crate) type OnInbound = Arc<dyn Fn(RawStream) + Send + Sync>;

/// Finds out why a failed link failed (see `SessionBuilder::explain_end`).
pub(crate) type Explain =
    Box<dyn FnOnce(CloseReason) -> Pin<Box<dyn Future<Output = CloseReason> + Send>> + Send>;

enum State {
    Running,
    /// Closing gracefully (GoAway sent): wait for open channels until the core's close grace
    /// passes ([`Due::CloseGraceOver`]).
    Draining,
    /// Sending what is queued, then shutting the stream down, bounded by the core's flush
    /// deadline ([`Due::FlushOver`]) in case the peer stops reading.
    Finishing {
        reason: CloseReason,
    },
}

pub(crate) struct Driver {
    /// The session, whose link the driver reads and writes.
    shared: Arc<Shared>,
    on_inbound: OnInbound,
    /// The driver's state between its reads, with when bytes last arrived (keepalive).
    read: ReadTurn,
    /// The core's next timer deadline, and the sleep armed for it.
    timer: Option<(std::time::Instant, Pin<Box<Sleep>>)>,
    state: State,
    eof: bool,
    /// Asked for the reason when the link fails, if set.
    explain: Option<Explain>,
    /// The explanation being worked out; the session ends with what it yields.
    explaining: Option<Pin<Box<dyn Future<Output = CloseReason> + Send>>>,
    /// A write failed as if the peer had gone, before we read its GoAway: the error (the
    /// core's [`Due::GoAwayWaitOver`] says until when we read on for the GoAway; see
    /// [`Driver::write_failed`]).
    write_failed: Option<io::Error>,
}

impl Driver {
    pub(crate) fn new(shared: Arc<Shared>, on_inbound: OnInbound) -> Self {
        if let Some(interval) = shared.config.keepalive_interval {
            let timeout = shared.config.keepalive_timeout;
            shared.core().start_keepalive(interval, timeout, now());
        }
        let mut driver = Driver {
            shared,
            on_inbound,
            read: ReadTurn::new(),
            timer: None,
            state: State::Running,
            eof: false,
            explain: None,
            explaining: None,
            write_failed: None,
        };
        driver.arm_timer();
        driver
    }

    pub(crate) fn set_explain(&mut self, explain: Explain) {
        self.explain = Some(explain);
    }

    pub(crate) async fn run(mut self) {
        tracing::debug!("session started");
        let reason = futures::future::poll_fn(|cx| self.poll(cx)).await;
        let reason = self.shared.finish(reason);
        if reason.is_error() {
            tracing::info!(%reason, "session ended");
        } else {
            tracing::debug!(%reason, "session ended");
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(explaining) = &mut self.explaining {
            return explaining.as_mut().poll(cx);
        }
        match self.poll_running(cx) {
            Poll::Ready(reason @ CloseReason::Io(_)) => match self.explain.take() {
                Some(explain) => {
                    self.explaining = Some(explain(reason));
                    self.poll(cx)
                }
                None => Poll::Ready(reason),
            },
            other => other,
        }
    }

    fn poll_running(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        self.shared.link.register_driver(cx.waker());
        if self.write_failed.is_some() {
            return self.poll_write_failed(cx);
        }
        // Whether the previous pass left everything sent: then a pass that reads nothing has
        // nothing to do beyond that read (which registers the link's read interest).
        let mut flushed = false;
        for _ in 0..ROUNDS {
            if self.shared.is_closing() {
                if let State::Running = self.state {
                    tracing::debug!(open = self.shared.open_channels(), "closing");
                    let grace = self.shared.config.close_grace;
                    self.shared.core().close(now(), grace);
                    self.state = State::Draining;
                    self.arm_timer();
                }
            }

            let read = match self.poll_inbound(cx) {
                Ok(progress) => progress,
                Err(End::Violation(v)) => return self.violation(cx, v),
                Err(End::Reason(reason)) => return Poll::Ready(reason),
            };
            if !read && flushed {
                return Poll::Pending;
            }
            let (wrote, idle) = match self.poll_outbound(cx) {
                Ok(progress) => progress,
                Err(e) => return self.write_failed(cx, e),
            };

            match self.poll_timer(cx) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(reason) => return Poll::Ready(reason),
            }

            if let Some(done) = self.poll_end(cx, idle) {
                return done;
            }
            if !read && !wrote {
                return Poll::Pending;
            }
            flushed = idle;
        }
        // Plenty of work: let other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Acts on what the core's timers say is due: `Ok(true)` if that queued output (a Ping),
    /// `Err` if it ends the session.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Result<bool, CloseReason> {
        let mut pinged = false;
        // Bounded: every end timer is reported once, keepalive's Ping once per deadline.
        for _ in 0..8 {
            match self.next_due(cx) {
                None => return Ok(pinged),
                Some(Due::Ping(_)) => {
                    tracing::trace!("link quiet; pinging");
                    pinged = true;
                }
                Some(Due::Dead(quiet)) => {
                    tracing::info!(?quiet, "peer silent for too long");
                    return Err(CloseReason::KeepaliveTimeout { after: quiet });
                }
                Some(Due::CloseGraceOver) => {
                    if let State::Draining = self.state {
                        tracing::debug!(
                            open = self.shared.open_channels(),
                            "close grace expired; cutting open channels"
                        );
                        self.finishing(CloseReason::Local);
                    }
                }
                Some(Due::FlushOver) => {
                    if let State::Finishing { reason } = &self.state {
                        tracing::debug!(
                            "peer did not take our last frames in time; dropping the link"
                        );
                        return Err(reason.clone());
                    }
                }
                // Set only while a failed write waits, whose loop takes it.
                Some(Due::GoAwayWaitOver) => {}
            }
        }
        cx.waker().wake_by_ref();
        Ok(pinged)
    }

    /// What the core's timers say is due, one at a time, once the earliest deadline has
    /// passed; `None` while nothing is (the sleep for the next deadline then registered).
    fn next_due(&mut self, cx: &mut Context<'_>) -> Option<Due> {
        // Bounded: each pass returns, or runs the timers, which re-arm at a later deadline.
        for _ in 0..4 {
            let (_, sleep) = self.timer.as_mut()?;
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let last_read = self.read.last_read.into_std();
            let due = self.shared.core().handle_timeout(now(), last_read);
            self.arm_timer();
            if due.is_some() {
                return due;
            }
        }
        cx.waker().wake_by_ref();
        None
    }

    /// Arms the sleep for the core's next deadline (after anything that may have moved it).
    fn arm_timer(&mut self) {
        let next = self.shared.core().poll_timeout();
        match (next, &mut self.timer) {
            (Some(at), Some((armed, sleep))) => {
                if *armed != at {
                    *armed = at;
                    sleep.as_mut().reset(Instant::from_std(at));
                }
            }
            (Some(at), timer @ None) => *timer = Some((at, Box::pin(sleep(at)))),
            (None, timer) => *timer = None,
        }
    }

    /// Graceful endings: our close once the channels are done, the peer's GoAway once its
    /// streams are done. `None` while the session carries on.
    fn poll_end(&mut self, cx: &mut Context<'_>, idle: bool) -> Option<Poll<CloseReason>> {
        if let State::Running = self.state {
            let code = self.shared.core().goaway_received();
            // A normal GoAway only stops new streams: open ones drain, and the peer ends the
            // link once its side is done (we then read EOF and end with `Peer`).
            match code {
                Some(code) if code != 0 => {
                    tracing::debug!(code, "peer sent go-away with an error code");
                    return Some(Poll::Ready(CloseReason::PeerError { code }));
                }
                _ => {}
            }
        }
        // The close grace and the flush deadline are the core's timers (`poll_timer`).
        if let State::Draining = self.state {
            if self.shared.open_channels() == 0 {
                self.finishing(CloseReason::Local);
            }
        }
        if let State::Finishing { reason } = &self.state {
            if idle || self.eof {
                // Everything is sent: tell the peer the stream ends.
                self.shared.link.shutdown(cx);
                return Some(Poll::Ready(reason.clone()));
            }
        }
        None
    }

    fn finishing(&mut self, reason: CloseReason) {
        let within = self.shared.config.handshake_timeout;
        self.shared.core().flush_by(now(), within);
        self.arm_timer();
        self.state = State::Finishing { reason };
        // Let the finishing state be polled at once (its timer registered).
        self.shared.link.wake_driver();
    }

    /// Answers a violation with a GoAway (best effort, without waiting) and ends.
    fn violation(&mut self, cx: &mut Context<'_>, v: Violation) -> Poll<CloseReason> {
        tracing::info!(violation = %v, "peer violated the protocol");
        self.shared.core().go_away(GoAwayCode::ProtocolError);
        // Waits for a handle's write in progress (one frame at most), so the GoAway is tried.
        self.shared.link.send_last(&self.shared.core, cx);
        Poll::Ready(CloseReason::ProtocolViolation(v))
    }

    /// A write failed. If it failed as if the peer had gone while we have not read a GoAway
    /// from it, the peer may have closed its session gracefully (GoAway, then the link) just
    /// before our write, with its GoAway still unread on our side, possibly not yet even
    /// reported readable. So the session reads on, for at most [`GOAWAY_GRACE`], writing
    /// nothing: a GoAway read then ends it as `Peer`, anything else with the write's error.
    fn write_failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<CloseReason> {
        if !is_gone(&e)
            || !matches!(self.state, State::Running)
            || self.shared.core().goaway_received().is_some()
        {
            return Poll::Ready(self.io_reason(e));
        }
        self.shared.core().await_goaway(now(), GOAWAY_GRACE);
        self.arm_timer();
        self.write_failed = Some(e);
        self.poll_write_failed(cx)
    }

    /// Reads after a failed write, for the peer's GoAway (see [`Driver::write_failed`]).
    fn poll_write_failed(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        for _ in 0..ROUNDS {
            // The link ended or failed: nothing more will come.
            let ended = match self.poll_inbound(cx) {
                Ok(true) => false,
                Ok(false) => break,
                Err(_) => true,
            };
            let goaway = self.shared.core().goaway_received();
            match goaway {
                Some(0) => return Poll::Ready(CloseReason::Peer),
                Some(_) => return Poll::Ready(self.write_error()),
                None if ended => return Poll::Ready(self.write_error()),
                None => {}
            }
        }
        // Bounded: the wait is reported once; a Ping (queued, never written now) once per
        // deadline.
        for _ in 0..8 {
            match self.next_due(cx) {
                None => return Poll::Pending,
                // A peer silent for too long is as gone as the write said.
                Some(Due::GoAwayWaitOver | Due::Dead(_)) => return Poll::Ready(self.write_error()),
                Some(_) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The error of the failed write (see [`Driver::write_failed`]).
    fn write_error(&mut self) -> CloseReason {
        match self.write_failed.take() {
            Some(e) => CloseReason::Io(Arc::new(e)),
            None => CloseReason::Local,
        }
    }

    fn io_reason(&self, e: io::Error) -> CloseReason {
        // The peer closed the session (GoAway 0) and then its end of the link, before it read
        // what we still sent (a channel's FIN, say): its close was graceful all the same.
        if is_gone(&e)
            && matches!(self.state, State::Running)
            && self.shared.core().goaway_received() == Some(0)
        {
            return CloseReason::Peer;
        }
        CloseReason::Io(Arc::new(e))
    }

    /// Why a failed read ends the session: fds lost to a truncated control message have a
    /// reason of their own.
    fn read_error(&self, e: io::Error) -> CloseReason {
        #[cfg(unix)]
        if e.get_ref()
            .is_some_and(|inner| inner.is::<crate::io::transport::unix::Truncated>())
        {
            return CloseReason::FdsTruncated;
        }
        self.io_reason(e)
    }

    /// Why the link ended when the byte stream reached its end.
    fn eof_reason(&self) -> CloseReason {
        if let State::Finishing { reason, .. } = &self.state {
            return reason.clone();
        }
        if !matches!(self.state, State::Running) {
            return CloseReason::Local;
        }
        match self.shared.core().goaway_received() {
            Some(0) => CloseReason::Peer,
            Some(code) => CloseReason::PeerError { code },
            None => CloseReason::Io(Arc::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended without the peer closing the session",
            ))),
        }
    }

    /// Has the link read what arrived and feed it to the core; hands the streams the peer
    /// opened to the handshake callback. `Ok(true)` if bytes arrived.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        if self.eof {
            return Ok(false);
        }
        let accepted = match self
            .shared
            .link
            .poll_read(&self.shared.core, cx, &mut self.read)
        {
            Read::Nothing => return Ok(false),
            Read::Frames(accepted) => accepted,
            Read::Eof => {
                self.eof = true;
                return Err(End::Reason(self.eof_reason()));
            }
            Read::Failed(e) => return Err(End::Reason(self.read_error(e))),
            Read::Violation(v) => return Err(End::Violation(v)),
        };
        for id in accepted {
            let handle = StreamHandle {
                id,
                shared: self.shared.clone(),
            };
            (self.on_inbound)(RawStream::new(handle));
        }
        Ok(true)
    }

    /// Has the link write what the core queued. Returns (wrote something, everything sent
    /// and flushed).
    fn poll_outbound(&mut self, cx: &mut Context<'_>) -> io::Result<(bool, bool)> {
        self.shared.link.poll_write(&self.shared.core, cx)
    }
}

/// How reading ended the session.
enum End {
    Violation(Violation),
    Reason(CloseReason),
}

/// Whether an I/O error says the peer's end of the link is gone.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// A sleep until `at`, an instant of the core's clock.
fn sleep(at: std::time::Instant) -> Sleep {
    tokio::time::sleep_until(Instant::from_std(at))
}
